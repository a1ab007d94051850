"""What a config value may be: checked once, when the config is built (its __post_init__), so that the math never
has to. Errors name the config class, the field, the value and what is allowed. The fields every method shares
(targets, layers, patterns, task_type) are checked by check_shared_types / check_shared_values.

Spec: LORA-CFG-002, LORA-ERR-001, IA3-CFG-001, LOHA-CFG-001, LOKR-CFG-001; peft's own combination checks with
peft's messages (lora/config.py:1036-1113).
"""

import math
import re
from typing import Any

from .peft_format import TASK_TYPES

# A config dataclass of config.py (LoraConfig, or another method's): config.py imports this module, not the reverse.
Config = Any

BIAS_MODES = ("none", "all", "lora_only")


def _is_names(value) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _is_indices(value) -> bool:
    return isinstance(value, (list, tuple)) and all(type(i) is int and i >= 0 for i in value)


def expect(field_name: str, value: Any, ok: bool, allowed: str, owner: str = "LoraConfig") -> None:
    if not ok:
        raise ValueError(f"{owner}.{field_name} must be {allowed}, got {value!r}")


def check_shared_types(config) -> None:
    """The types of the fields every method has: targets, modules_to_save, layers and patterns (where the method
    has them). Spec: LORA-ERR-001."""
    owner = type(config).__name__
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        expect(name, value, value is None or isinstance(value, str) or _is_names(value),
                "None, a regex string or a list of module names", owner)
    expect("modules_to_save", config.modules_to_save, config.modules_to_save is None or
            _is_names(config.modules_to_save), "None or a list of module names", owner)
    if hasattr(config, "layers_to_transform"):
        layers = config.layers_to_transform
        expect("layers_to_transform", layers, layers is None or (isinstance(layers, int) and not isinstance(
            layers, bool)) or (isinstance(layers, list) and all(type(i) is int for i in layers)),
            "None, a layer index or a list of layer indices", owner)
        pattern = config.layers_pattern
        expect("layers_pattern", pattern, pattern is None or isinstance(pattern, str) or _is_names(pattern),
                "None, a string or a list of strings", owner)
    for name in ("rank_pattern", "alpha_pattern"):
        if hasattr(config, name):
            expect(name, getattr(config, name), isinstance(getattr(config, name), dict), "a dict {regex: value}",
                    owner)
    expect("inference_mode", config.inference_mode, isinstance(config.inference_mode, bool), "true or false", owner)


def check_shared_values(config) -> None:
    """The values of the shared fields: task_type, regexes, pattern values. Spec: LORA-CFG-002, LORA-CFG-003."""
    owner = type(config).__name__
    expect("task_type", config.task_type, config.task_type is None or config.task_type in TASK_TYPES,
            f"None or one of {TASK_TYPES}", owner)
    for name in ("rank_pattern", "alpha_pattern"):
        for key, value in getattr(config, name, {}).items():
            _check_regex(f"{name} key", key, owner)
            check_number(f"{name}[{key!r}]", value, owner)
            expect(f"{name}[{key!r}]", value, value > 0 and (name == "alpha_pattern" or type(value) is int),
                    "a positive integer" if name == "rank_pattern" else "positive", owner)
    for name in ("target_modules", "exclude_modules"):
        if isinstance(getattr(config, name), str):
            _check_regex(name, getattr(config, name), owner)


def check_types(config: Config) -> None:
    """Every field's type, before anything is converted. Spec: LORA-ERR-001."""
    check_shared_types(config)
    expect("target_parameters", config.target_parameters, config.target_parameters is None or
            _is_names(config.target_parameters), "None or a list of parameter names")
    tokens = config.trainable_token_indices
    expect("trainable_token_indices", tokens, tokens is None or _is_indices(tokens) or (
        isinstance(tokens, dict) and all(isinstance(k, str) and _is_indices(v) for k, v in tokens.items())),
        "None, a list of token indices or {module name: list of token indices}")
    for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
        expect(name, getattr(config, name), isinstance(getattr(config, name), bool), "true or false")


def check_values(config: Config) -> None:
    """Reject values peft would reject later (or never): fail at construction, naming the field.
    Spec: LORA-CFG-002, LORA-ERR-001."""
    r = config.r
    expect("r", r, type(r) is int and r > 0, "a positive integer")
    check_number("lora_alpha", config.lora_alpha)
    expect("lora_alpha", config.lora_alpha, config.lora_alpha > 0, "positive (scaling = lora_alpha / r)")
    dropout = config.lora_dropout
    check_number("lora_dropout", dropout)
    expect("lora_dropout", dropout, 0.0 <= dropout < 1.0, "in [0, 1)")
    expect("bias", config.bias, config.bias in BIAS_MODES, f"one of {BIAS_MODES}")
    init = config.init_lora_weights
    expect("init_lora_weights", init, isinstance(init, bool) or (isinstance(init, str) and init.lower() == "gaussian"),
            "True, False or 'gaussian'")
    check_shared_values(config)


def check_combinations(config: Config) -> None:
    """peft's own __post_init__ checks, with peft's messages (peft 0.21.2 lora/config.py:1036-1113)."""
    if config.is_regex_target and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if config.is_regex_target and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
    check_layers_pattern(config)
    if config.lora_bias and config.use_dora:
        raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise ValueError(
            "The argument lora_bias=True is only supported with init_lora_weights=True or False, "
            f"got init_lora_weights={config.init_lora_weights} instead."
        )


def check_layers_pattern(config) -> None:
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")


def check_number(name: str, value: Any, owner: str = "LoraConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")


def _check_regex(name: str, pattern: Any, owner: str = "LoraConfig") -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"{owner}.{name} must be a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{owner}.{name} {pattern!r} is not a valid regular expression: {error}") from None
