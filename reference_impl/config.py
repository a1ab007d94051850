"""LoraConfig: the fields of peft's adapter_config.json that plain LoRA uses, their defaults and checks.

Spec areas: CFG (fields, defaults, validation) and SER (what adapter_config.json holds).
Reference: peft 0.21.2 `tuners/lora/config.py` and `config.py` (facts only; see SPEC.md).
"""

import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

# The peft release whose file format and numbers this package reproduces.
PEFT_SPEC_VERSION = "0.21.2"

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")

# peft's LoraConfig has fields for features outside plain LoRA (LoftQ, EVA, QALoRA, ...). We write them with
# peft's defaults so that our adapter_config.json has exactly the keys peft writes, and refuse any other value
# on load rather than silently computing something else (LORA-CFG-008).
PEFT_ONLY_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}

Targets = Union[str, list[str], set[str], tuple[str, ...], None]


@dataclass
class LoraConfig:
    """The LoRA hyper-parameters, named and defaulted exactly as peft names them.

    Spec: LORA-CFG-001 (defaults), LORA-CFG-002 (validation), LORA-CFG-003 (task_type).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Targets = None
    exclude_modules: Targets = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    peft_type: str = "LORA"
    auto_mapping: Optional[dict] = None
    # "<release>@<producer>" is peft's own spelling for "not exactly this release" (peft config.py, dev builds).
    peft_version: str = f"{PEFT_SPEC_VERSION}@reference_impl"

    def __post_init__(self):
        _check_types(self)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        _check_values(self)
        _check_combinations(self)

    @property
    def is_regex_target(self) -> bool:
        return isinstance(self.target_modules, str)

    def to_dict(self) -> dict[str, Any]:
        """The content of adapter_config.json: peft's 41 keys, sets as sorted lists. Spec: LORA-SER-003."""
        out = {**PEFT_ONLY_FIELDS, **asdict(self)}
        for key, value in out.items():
            if isinstance(value, set):
                out[key] = sorted(value)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], ignore_unknown_keys: bool = False) -> "LoraConfig":
        """Build a config from adapter_config.json content. A key no peft release we know writes is an error
        (peft warns and ignores it) unless ignore_unknown_keys. Spec: LORA-LOAD-006, LORA-CFG-008, LORA-ERR-002."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type is {data['peft_type']!r}; only 'LORA' is supported")
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key in PEFT_ONLY_FIELDS and value != PEFT_ONLY_FIELDS[key]:
                raise ValueError(
                    f"{key}={value!r} selects a peft feature outside plain LoRA; "
                    f"this implementation supports only {key}={PEFT_ONLY_FIELDS[key]!r}"
                )
        unknown = sorted(set(data) - known - set(PEFT_ONLY_FIELDS))
        if unknown and not ignore_unknown_keys:
            raise ValueError(f"unknown keys {unknown} (not a LoraConfig field of peft "
                             f"{PEFT_SPEC_VERSION}); peft would ignore them: pass ignore_unknown_keys=True to do so")
        if unknown:
            warnings.warn(f"adapter_config.json: ignoring unknown keys {unknown}", UserWarning, stacklevel=2)
        return cls(**{key: value for key, value in data.items() if key in known})


def _is_names(value) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _expect(field_name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LoraConfig.{field_name} must be {allowed}, got {value!r}")


def _check_types(config: LoraConfig) -> None:
    """Every field's type, before anything is converted. Spec: LORA-ERR-001."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        _expect(name, value, value is None or isinstance(value, str) or _is_names(value),
                "None, a regex string or a list of module names")
    _expect("modules_to_save", config.modules_to_save, config.modules_to_save is None or
            _is_names(config.modules_to_save), "None or a list of module names")
    layers = config.layers_to_transform
    _expect("layers_to_transform", layers, layers is None or (isinstance(layers, int) and not isinstance(
        layers, bool)) or (isinstance(layers, list) and all(type(i) is int for i in layers)),
        "None, a layer index or a list of layer indices")
    pattern = config.layers_pattern
    _expect("layers_pattern", pattern, pattern is None or isinstance(pattern, str) or _is_names(pattern),
            "None, a string or a list of strings")
    for name in ("rank_pattern", "alpha_pattern"):
        _expect(name, getattr(config, name), isinstance(getattr(config, name), dict), "a dict {regex: value}")
    for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        _expect(name, getattr(config, name), isinstance(getattr(config, name), bool), "true or false")


def _check_values(config: LoraConfig) -> None:
    """Reject values peft would reject later (or never): fail at construction, naming the field.
    Spec: LORA-CFG-002, LORA-ERR-001."""
    r = config.r
    _expect("r", r, type(r) is int and r > 0, "a positive integer")
    _check_number("lora_alpha", config.lora_alpha)
    _expect("lora_alpha", config.lora_alpha, config.lora_alpha > 0, "positive (scaling = lora_alpha / r)")
    dropout = config.lora_dropout
    _check_number("lora_dropout", dropout)
    _expect("lora_dropout", dropout, 0.0 <= dropout < 1.0, "in [0, 1)")
    _expect("bias", config.bias, config.bias in BIAS_MODES, f"one of {BIAS_MODES}")
    init = config.init_lora_weights
    _expect("init_lora_weights", init, isinstance(init, bool) or (isinstance(init, str) and init.lower() == "gaussian"),
            "True, False or 'gaussian'")
    _expect("task_type", config.task_type, config.task_type is None or config.task_type in TASK_TYPES,
            f"None or one of {TASK_TYPES}")
    for name in ("rank_pattern", "alpha_pattern"):
        for key, value in getattr(config, name).items():
            _check_regex(f"{name} key", key)
            _check_number(f"{name}[{key!r}]", value)
            _expect(f"{name}[{key!r}]", value, value > 0 and (name == "alpha_pattern" or type(value) is int),
                    "a positive integer" if name == "rank_pattern" else "positive")
    if isinstance(config.target_modules, str):
        _check_regex("target_modules", config.target_modules)
    if isinstance(config.exclude_modules, str):
        _check_regex("exclude_modules", config.exclude_modules)


def _check_combinations(config: LoraConfig) -> None:
    """peft's own __post_init__ checks, with peft's messages (peft 0.21.2 lora/config.py:1036-1113)."""
    if config.is_regex_target and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if config.is_regex_target and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
    if config.lora_bias and config.use_dora:
        raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise ValueError(
            "The argument lora_bias=True is only supported with init_lora_weights=True or False, "
            f"got init_lora_weights={config.init_lora_weights} instead."
        )


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"LoraConfig.{name} must be a finite number, got {value!r}")


def _check_regex(name: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"LoraConfig.{name} must be a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"LoraConfig.{name} {pattern!r} is not a valid regular expression: {error}") from None
