"""Hypothesis strategies: they draw the structure of a case (model, config, seeds); values come from seeds.

Every draw stays inside what the driver declares: models and target names come from its scope
(conformance/engine/scope.py), config features from its capabilities; `Run.draw` checks the whole case once more.
"""

import functools
import re
from typing import NamedTuple, Optional

from hypothesis import strategies as st

from reference_impl.peft_format import TASK_HEADS

from ..zoo.models import ZOO, ZooModel
from . import scope


class Case(NamedTuple):
    """One example: which model, which adapter config, and the seeds for everything random."""

    model: str
    config: dict
    model_seed: int = 0
    init_seed: int = 0  # torch.manual_seed before wrapping: the adapters' initial values
    values_seed: int = 0  # the adapter values loaded after wrapping
    inputs_seed: int = 0

    def __str__(self) -> str:
        return f"Case(model={self.model!r}, config={self.config}, seeds={self[2:]})"


seeds = st.integers(0, 2**31 - 1)


@st.composite
def lora_configs(draw, zoo_model: ZooModel, driver, kinds: Optional[set] = None, extras: bool = True,
                 overlap: bool = True) -> dict:
    """A LoraConfig dict for `zoo_model`. With extras=False: targets, r, alpha, rslora, dropout, init only. With
    overlap=False, no two pattern keys match the same module (peft's saved file reorders them: LORA-SER-006)."""
    caps = set(driver.capabilities)
    names = scope.targets_in_scope(driver, zoo_model.name, kinds)
    targets = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="targets")
    config = {"target_modules": targets, "r": draw(st.integers(1, 8), label="r"),
              "lora_alpha": draw(st.sampled_from([1, 2, 4, 8, 16, 0.5, 3.0]), label="lora_alpha"),
              "lora_dropout": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]), label="lora_dropout"),
              "init_lora_weights": draw(st.sampled_from([True, False, "gaussian"] if "init_variants" in caps
                                                        else [True]), label="init")}
    if "rslora" in caps:
        config["use_rslora"] = draw(st.booleans(), label="use_rslora")
    if "regex_targets" in caps and draw(st.booleans(), label="as regex"):
        # A regex over full names matching exactly what the list would (suffixes after a dot).
        config["target_modules"] = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
    if not extras:
        return config
    has_embedding = any(name in zoo_model.targets.get("embedding", ()) for name in targets)
    if "dora" in caps and draw(st.booleans(), label="use_dora"):
        config["use_dora"] = True
    elif "lora_bias" in caps and not has_embedding and config["init_lora_weights"] != "gaussian" \
            and _all_biased(zoo_model.name, tuple(targets)) and draw(st.booleans(), label="lora_bias"):
        config["lora_bias"] = True
    if "bias" in caps:
        config["bias"] = draw(st.sampled_from(["none", "none", "lora_only", "all"]), label="bias")
    # Not with bias="all": peft then also saves the wrapper's internal biases (see LORA-KEYS-006).
    if "modules_to_save" in caps and zoo_model.saveable and config.get("bias") != "all" \
            and draw(st.booleans(), label="modules_to_save?"):
        config["modules_to_save"] = [draw(st.sampled_from(zoo_model.saveable), label="modules_to_save")]
    # The task type its users set; a classifier's task type saves the head (LORA-TASK-001), as modules_to_save does.
    if zoo_model.task_type and (zoo_model.task_type not in TASK_HEADS or "modules_to_save" in caps
                                and config.get("bias") != "all") and draw(st.booleans(), label="task_type?"):
        config["task_type"] = zoo_model.task_type
    if "patterns" in caps and draw(st.booleans(), label="patterns?"):
        config.update(draw(_patterns(zoo_model, targets, overlap), label="patterns"))
    # Only models whose blocks sit below the top level: peft <= 0.20 finds no layer index in "h.0.attn" or
    # "blocks.0.fc" even with layers_pattern, and test_layers_to_transform covers those on its own (LORA-MATCH-005).
    nested = all(not name.startswith(zoo_model.layers_pattern + ".") for name in _names(zoo_model.name))
    if "layers" in caps and nested and set(targets) & set(zoo_model.in_blocks) and \
            isinstance(config["target_modules"], list) and draw(st.booleans(), label="layers?"):
        config["layers_to_transform"] = draw(st.lists(st.sampled_from(zoo_model.layers), min_size=1,
                                                      unique=True), label="layers_to_transform")
        if draw(st.booleans(), label="layers_pattern?"):
            config["layers_pattern"] = zoo_model.layers_pattern
    return config


@st.composite
def _patterns(draw, zoo_model: ZooModel, targets: list[str], overlap: bool = True) -> dict:
    """rank_pattern and alpha_pattern. Sometimes two keys match the same module (a target name and one module's
    full name), in either order and independently for r and alpha, so that the first-match rule is exercised
    (LORA-MATCH-009, LORA-MATCH-012)."""
    target = draw(st.sampled_from(targets), label="pattern target")
    keys = [re.escape(target)]
    full_names = [n for n in _names(zoo_model.name) if n.endswith("." + target)]
    if overlap and full_names and draw(st.booleans(), label="overlapping keys?"):
        keys.append(re.escape(draw(st.sampled_from(full_names), label="specific key")))
    rank_keys, alpha_keys = draw(st.permutations(keys), label="r keys"), draw(st.permutations(keys), label="a keys")
    return {"rank_pattern": {key: draw(st.integers(1, 8), label="pattern r") for key in rank_keys},
            "alpha_pattern": {key: draw(st.sampled_from([1, 4, 32]), label="pattern alpha") for key in alpha_keys}}


@functools.lru_cache(maxsize=None)
def _all_biased(model: str, targets: tuple[str, ...]) -> bool:
    """Do all the layers `targets` adapt have a bias? A lora_bias cannot merge into a layer without one (peft
    raises at merge), so such configs are not drawn."""
    from ..zoo.models import build

    adapted = scope.targeted(build(model), {"target_modules": list(targets)}).values()
    return all(getattr(module, "bias", None) is not None for module in adapted)


@functools.lru_cache(maxsize=None)
def _names(model: str) -> list[str]:
    from ..zoo.models import build

    return [name for name, _ in build(model).named_modules()]


@st.composite
def cases(draw, driver, single_layer: Optional[bool] = None, kinds: Optional[set] = None, extras: bool = True,
          model: Optional[str] = None, overlap: bool = True) -> Case:
    """A whole example: a zoo model in the driver's scope, a config for it, and seeds."""
    names = [model] if model else scope.models_in_scope(driver, kinds, single_layer)
    zoo_model = ZOO[draw(st.sampled_from(names), label="model")]
    config = draw(lora_configs(zoo_model, driver, kinds, extras, overlap), label="config")
    return Case(zoo_model.name, config, draw(st.integers(0, 2), label="model_seed"), draw(seeds, label="init_seed"),
                draw(seeds, label="values_seed"), draw(seeds, label="inputs_seed"))


def overlap_candidates(driver) -> list[tuple[str, str]]:
    """(model, target) pairs in the driver's scope where a target name and a module's full name differ."""
    kinds = {"linear", "conv1d"}
    return [(m, t) for m in scope.models_in_scope(driver, kinds, single_layer=False)
            for t in scope.targets_in_scope(driver, m, kinds) if any(n.endswith("." + t) for n in _names(m))]


@st.composite
def overlapping_patterns(draw, driver) -> Case:
    """A case whose rank_pattern and alpha_pattern each hold two keys matching one module: a target name and that
    module's full name, in drawn orders (LORA-MATCH-012, LORA-SER-006)."""
    model, target = draw(st.sampled_from(overlap_candidates(driver)), label="model and target")
    module = draw(st.sampled_from([n for n in _names(model) if n.endswith("." + target)]), label="module")
    keys = [re.escape(target), re.escape(module)]
    ranks = draw(st.lists(st.integers(1, 6), min_size=2, max_size=2, unique=True), label="ranks")
    config = {"target_modules": [target], "r": 8, "lora_alpha": 8,
              "rank_pattern": dict(zip(draw(st.permutations(keys), label="r order"), ranks)),
              "alpha_pattern": dict(zip(draw(st.permutations(keys), label="alpha order"), (2, 32)))}
    return Case(model, config, 0, draw(seeds, label="init_seed"), draw(seeds, label="values_seed"),
                draw(seeds, label="inputs_seed"))
