"""Hypothesis strategies: they draw the structure of a case (model, config, seeds); values come from seeds.

Every draw stays inside what the driver declares (its capabilities), and always targets at least one module.
"""

import functools
import re
from typing import NamedTuple, Optional

from hypothesis import strategies as st

from .models import ZOO, ZooModel


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


def models(capabilities: frozenset[str], single_layer: Optional[bool] = None, kinds: Optional[set] = None):
    """Zoo models with at least one targetable layer kind the driver supports (restricted to `kinds`)."""
    usable = set(capabilities) if kinds is None else set(capabilities) & set(kinds)
    names = [m.name for m in ZOO.values() if set(m.targets) & usable
             and (single_layer is None or m.single_layer == single_layer)]
    return st.sampled_from(sorted(names)).map(ZOO.get)


@st.composite
def lora_configs(draw, zoo_model: ZooModel, capabilities: frozenset[str], kinds: Optional[set] = None,
                 extras: bool = True) -> dict:
    """A LoraConfig dict for `zoo_model`. With extras=False: targets, r, alpha, rslora, dropout, init only."""
    caps = set(capabilities)
    usable = [kind for kind in zoo_model.targets if kind in caps and (kinds is None or kind in kinds)]
    names = sorted({name for kind in usable for name in zoo_model.targets[kind]})
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
    has_embedding = any(kind == "embedding" for kind in usable if set(zoo_model.targets[kind]) & set(targets))
    if "dora" in caps and draw(st.booleans(), label="use_dora"):
        config["use_dora"] = True
    elif "lora_bias" in caps and not has_embedding and config["init_lora_weights"] != "gaussian" \
            and draw(st.booleans(), label="lora_bias"):
        config["lora_bias"] = True
    if "bias" in caps:
        config["bias"] = draw(st.sampled_from(["none", "none", "lora_only", "all"]), label="bias")
    # Not with bias="all": peft then also saves the wrapper's internal biases (see LORA-KEYS-006).
    if "modules_to_save" in caps and zoo_model.saveable and config.get("bias") != "all" \
            and draw(st.booleans(), label="modules_to_save?"):
        config["modules_to_save"] = [draw(st.sampled_from(zoo_model.saveable), label="modules_to_save")]
    if "patterns" in caps and draw(st.booleans(), label="patterns?"):
        key = re.escape(draw(st.sampled_from(targets), label="pattern key"))
        config["rank_pattern"] = {key: draw(st.integers(1, 8), label="pattern r")}
        config["alpha_pattern"] = {key: draw(st.sampled_from([1, 4, 32]), label="pattern alpha")}
    # Only models whose blocks sit below the top level: peft <= 0.20 finds no layer index in "h.0.attn" or
    # "blocks.0.fc" even with layers_pattern, and test_layers_to_transform covers those on its own (LORA-MATCH-005).
    nested = all(not name.startswith(zoo_model.layers_pattern + ".") for name in _module_names(zoo_model))
    if "layers" in caps and nested and set(targets) & set(zoo_model.in_blocks) and \
            isinstance(config["target_modules"], list) and draw(st.booleans(), label="layers?"):
        config["layers_to_transform"] = draw(st.lists(st.sampled_from(zoo_model.layers), min_size=1,
                                                      unique=True), label="layers_to_transform")
        if draw(st.booleans(), label="layers_pattern?"):
            config["layers_pattern"] = zoo_model.layers_pattern
    return config


def _module_names(zoo_model: ZooModel) -> list[str]:
    return _names(zoo_model.name)


@functools.lru_cache(maxsize=None)
def _names(model: str) -> list[str]:
    from .models import build

    return [name for name, _ in build(model).named_modules()]


@st.composite
def cases(draw, capabilities: frozenset[str], single_layer: Optional[bool] = None, kinds: Optional[set] = None,
          extras: bool = True, model: Optional[str] = None) -> Case:
    """A whole example: a zoo model the driver can adapt, a config for it, and seeds."""
    zoo_model = ZOO[model] if model else draw(models(capabilities, single_layer, kinds), label="model")
    config = draw(lora_configs(zoo_model, capabilities, kinds, extras), label="config")
    return Case(zoo_model.name, config, draw(st.integers(0, 2), label="model_seed"), draw(seeds, label="init_seed"),
                draw(seeds, label="values_seed"), draw(seeds, label="inputs_seed"))
