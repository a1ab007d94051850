"""What a driver can run: the capabilities a case uses, and the driver's own scope.

One rule decides whether an example applies to a driver, for every test (drawn or fixed) and every golden case:
the capabilities the case uses (its config's features and the kinds of layer it targets) must be declared, and the
driver's optional `supports(model, config)` hook must not refuse it. An example outside the scope is never drawn;
a fixed one is reported "not applicable" with the reason.
"""

import copy
from functools import lru_cache
from typing import Optional

from torch import nn

from reference_impl.peft_format import TASK_HEADS, is_conv1d
from reference_impl.quantized import is_quantized_linear

from .. import api
from ..zoo import models

# A config field at a value other than peft's default needs the capability named here.
FEATURES = {
    "use_dora": ("dora", lambda v: bool(v)),
    "use_rslora": ("rslora", lambda v: bool(v)),
    "init_lora_weights": ("init_variants", lambda v: v is not True),
    "rank_pattern": ("patterns", lambda v: bool(v)),
    "alpha_pattern": ("patterns", lambda v: bool(v)),
    "layers_to_transform": ("layers", lambda v: v is not None),
    "target_modules": ("regex_targets", lambda v: isinstance(v, str)),
    "exclude_modules": ("regex_targets", lambda v: v is not None),
    "bias": ("bias", lambda v: v not in (None, "none")),
    "lora_bias": ("lora_bias", lambda v: bool(v)),
    "modules_to_save": ("modules_to_save", lambda v: bool(v)),
    "task_type": ("modules_to_save", lambda v: v in TASK_HEADS),  # the task's heads are modules to save
    "target_parameters": ("target_parameters", lambda v: bool(v)),
    "trainable_token_indices": ("trainable_tokens", lambda v: bool(v)),
}


QUANTIZED_KINDS = {"Linear4bit": models.BNB_4BIT, "Linear8bitLt": models.BNB_8BIT}


def features(config: dict, adapter_name: str = "default") -> set[str]:
    """The capabilities a config's non-default values need."""
    needed = {capability for key, (capability, used) in FEATURES.items() if key in config and used(config[key])}
    method = config.get("peft_type", "LORA")
    if method != "LORA":  # a method's own fields need nothing more than the method: its tests draw them
        needed.add(method.lower())
    return needed | ({"multi_adapter"} if adapter_name != "default" else set())


def layer_kind(module: nn.Module) -> Optional[str]:
    """The capability that covers adapting `module`: linear, conv1d (GPT-2's), embedding, conv2d,
    multihead_attention, bnb_4bit, bnb_8bit (bitsandbytes' layers, asked before nn.Linear, their base class);
    None if LoRA cannot adapt it."""
    kind = QUANTIZED_KINDS.get(type(module).__name__) if is_quantized_linear(module) else None
    if kind:
        return kind
    if is_conv1d(module):
        return models.CONV1D
    if isinstance(module, nn.Linear):
        return models.LINEAR
    if isinstance(module, nn.Embedding):
        return models.EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return models.CONV2D
    if isinstance(module, nn.MultiheadAttention):
        return models.ATTENTION
    return None


def targeted(model: nn.Module, config: dict) -> dict[str, nn.Module]:
    """The modules `config` adapts in `model`, by peft's matching rules (as reference_impl applies them)."""
    from reference_impl import METHODS
    from reference_impl.targeting import is_excluded, matches_target, resolve_targets

    method = METHODS[config.get("peft_type", "LORA")]
    fields = {k: v for k, v in config.items() if k in method.config_class.__dataclass_fields__}
    resolved = method.config_class(**fields)
    resolve_targets(model, resolved, method.default_targets)
    return {name: module for name, module in model.named_modules()
            if name and matches_target(name, resolved) and not is_excluded(name, resolved)}


def adapts_a_shared_weight(model: nn.Module, config: dict) -> bool:
    """Does `config` adapt a layer whose weight another module uses too (embed_tokens with a tied lm_head)?
    Merging puts the delta into the shared weight, so the other module changes as well: peft does so (and warns),
    and the merge-equals-unmerged requirements leave such cases out (LORA-MERGE-002, LORA-MERGE-010)."""
    modules_by_weight: dict[int, set[int]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            modules_by_weight.setdefault(weight.data_ptr(), set()).add(id(module))
    return any(len(modules_by_weight.get(module.weight.data_ptr(), ())) > 1
               for module in targeted(model, config).values() if isinstance(getattr(module, "weight", None),
                                                                           nn.Parameter))


def needed(model: nn.Module, config: dict, adapter_name: str = "default") -> set[str]:
    """Every capability a case uses: its features and the kinds of layer it adapts."""
    kinds = {layer_kind(module) for module in targeted(model, config).values()}
    return features(config, adapter_name) | (kinds - {None})


def out_of_scope(driver, model: nn.Module, config: dict, adapter_name: str = "default") -> Optional[str]:
    """Why `driver` cannot run `config` on `model`, or None. The driver's hook sees a copy of each."""
    missing = sorted(needed(model, config, adapter_name) - set(driver.capabilities))
    if missing:
        return f"{driver.name} does not declare {', '.join(missing)}"
    return api.supports(driver, copy.deepcopy(model), copy.deepcopy(config))


@lru_cache(maxsize=None)
def _probe(driver, model_name: str, target: str, method: str = "LORA") -> Optional[str]:
    model = models.build(model_name)
    config = {"target_modules": [target]} if method == "LORA" else {"peft_type": method, "target_modules": [target]}
    try:
        if not targeted(model, config):
            return f"{model_name} has no module named {target!r}"
        return out_of_scope(driver, model, config)
    except ValueError as error:  # the target matches nothing adaptable
        return str(error)


def targets_in_scope(driver, model_name: str, kinds: Optional[set] = None, method: str = "LORA") -> list[str]:
    """The zoo model's target names, of the given layer kinds, that the driver runs on their own (with `method`)."""
    zoo = models.ZOO[model_name]
    names = {name for kind, names in zoo.targets.items() if kinds is None or kind in kinds for name in names}
    return sorted(name for name in names if _probe(driver, model_name, name, method) is None)


def models_in_scope(driver, kinds: Optional[set] = None, single_layer: Optional[bool] = None) -> list[str]:
    """Zoo models with at least one target in the driver's scope."""
    return [name for name, zoo in sorted(models.ZOO.items())
            if zoo.drawn and zoo.available and (single_layer is None or zoo.single_layer == single_layer)
            and targets_in_scope(driver, name, kinds)]


def first_case(driver, kinds: Optional[set] = None, models_first: tuple = ()) -> Optional[tuple[str, str]]:
    """A fixed (model, target) in the driver's scope, for tests that need one rather than a draw: the models named
    in `models_first` are tried before the others, in order."""
    ordered = [m for m in models_first if m in models.ZOO] + [m for m in sorted(models.ZOO) if m not in models_first]
    for name in ordered:
        if models.ZOO[name].single_layer or not models.ZOO[name].drawn or not models.ZOO[name].available:
            continue
        targets = targets_in_scope(driver, name, kinds)
        if targets:
            return name, targets[0]
    return None
