"""LoraConfig: the fields of peft's adapter_config.json that plain LoRA uses, what each does, and peft's defaults.
The checks every value goes through at construction are in config_checks.py.

Spec areas: CFG (fields, defaults, validation) and SER (what adapter_config.json holds).
Reference: peft 0.21.2 `tuners/lora/config.py` and `config.py` (facts only; see SPEC.md).
"""

import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional, Union

from . import config_checks

# The peft release whose file format and numbers this package reproduces.
PEFT_SPEC_VERSION = "0.21.2"


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
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}

Targets = Union[str, list[str], set[str], tuple[str, ...], None]


class ConfigFile:
    """adapter_config.json for a config dataclass of any method: its fields plus `peft_only_fields`, sorted.
    Spec: LORA-SER-003, LORA-LOAD-006, LORA-CFG-008, IA3-SER-001, LOHA-SER-001, LOKR-SER-001."""

    # Fields of peft's config for features this package does not implement: written with peft's defaults so that
    # the file has exactly peft's keys, and any other value refused on load.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        """The content of adapter_config.json: sets as sorted lists, keys sorted."""
        out = {**self.peft_only_fields, **asdict(self)}
        for key, value in out.items():
            if isinstance(value, set):
                out[key] = sorted(value)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], ignore_unknown_keys: bool = False):
        """Build a config from adapter_config.json content. A key no peft release we know writes is an error
        (peft warns and ignores it) unless ignore_unknown_keys. Spec: LORA-LOAD-006, LORA-CFG-008, LORA-ERR-002."""
        own_type = cls.__dataclass_fields__["peft_type"].default
        if data.get("peft_type", own_type) != own_type:
            raise ValueError(f"peft_type is {data['peft_type']!r}; {cls.__name__} reads only {own_type!r}")
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key in cls.peft_only_fields and value != cls.peft_only_fields[key]:
                raise ValueError(
                    f"{key}={value!r} selects a peft feature this implementation does not have; "
                    f"it supports only {key}={cls.peft_only_fields[key]!r}"
                )
        unknown = sorted(set(data) - known - set(cls.peft_only_fields))
        if unknown and not ignore_unknown_keys:
            raise ValueError(f"unknown keys {unknown} (not a {cls.__name__} field of peft "
                             f"{PEFT_SPEC_VERSION}); peft would ignore them: pass ignore_unknown_keys=True to do so")
        if unknown:
            warnings.warn(f"adapter_config.json: ignoring unknown keys {unknown}", UserWarning, stacklevel=2)
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class TunerConfig(ConfigFile):
    """The fields of peft's PeftConfig and the targeting fields, for the methods other than LoRA (ia3.py, loha.py,
    lokr.py); each adds its own and sets peft_type. The same meaning and defaults as in LoraConfig."""

    target_modules: Targets = None  # names, one regex, "all-linear" or None (the architecture's default)
    exclude_modules: Targets = None  # modules never adapted, by the same rules
    modules_to_save: Optional[list[str]] = None  # modules trained and saved in full
    task_type: Optional[str] = None  # one of peft_format.TASK_TYPES
    inference_mode: bool = False  # written True by save_pretrained
    base_model_name_or_path: Optional[str] = None  # where the base came from (informational)
    revision: Optional[str] = None  # the base model's revision (informational)
    auto_mapping: Optional[dict] = None  # peft's record of a custom model class (informational)
    peft_version: str = f"{PEFT_SPEC_VERSION}@reference_impl"  # "<release>@<producer>", as in LoraConfig

    def check_and_convert(self) -> None:
        """The shared checks, then name lists as sets (as peft keeps them)."""
        config_checks.check_shared_types(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple, set)):
                setattr(self, name, set(getattr(self, name)))
        config_checks.check_shared_values(self)


@dataclass
class LoraConfig(ConfigFile):
    """The LoRA hyper-parameters, named and defaulted exactly as peft names them.

    Spec: LORA-CFG-001 (defaults), LORA-CFG-002 (validation), LORA-CFG-003 (task_type).
    """

    r: int = 8  # the rank: A is (r, in), B is (out, r)
    lora_alpha: float = 8  # scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)
    target_modules: Targets = None  # names (matched as dotted suffixes), one regex (fullmatch), "all-linear", or None:
    #                                 the architecture's default (targeting.DEFAULT_TARGETS)
    exclude_modules: Targets = None  # modules never adapted, by the same rules
    target_parameters: Optional[list[str]] = None  # bare parameters to adapt ("experts.down_proj"), by the same
    #                                                suffix rule as target_modules (parameters.py)
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input, in train mode
    fan_in_fan_out: bool = False  # weight stored (in, out); set per layer from its type (GPT-2's Conv1D: True)
    bias: str = "none"  # which biases train and are saved: "none", "all", "lora_only" (those of adapted layers)
    use_rslora: bool = False  # rank-stabilised scaling, lora_alpha / sqrt(r)
    modules_to_save: Optional[list[str]] = None  # modules trained and saved in full (a classifier head, lm_head)
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None  # embedding rows trained alone
    #                     (new tokens): a list for the input embedding, or {module name: rows} (trainable_tokens.py)
    init_lora_weights: Union[bool, str] = True  # True: A kaiming, B = 0; "gaussian": A ~ N(0, 1/r); False: random B
    layers_to_transform: Union[int, list[int], None] = None  # only these layer indices are adapted
    layers_pattern: Union[str, list[str], None] = None  # the name of the layer list ("h", "layers"), for the index
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> r for the modules it matches
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> lora_alpha for the modules it matches
    use_dora: bool = False  # DoRA: a learned magnitude per output feature rescales W + s B A (dora.py)
    lora_bias: bool = False  # lora_B gets a bias too
    task_type: Optional[str] = None  # one of peft_format.TASK_TYPES; classifier tasks save their head in full
    inference_mode: bool = False  # written True by save_pretrained; a loaded adapter is frozen unless is_trainable
    base_model_name_or_path: Optional[str] = None  # where the base came from (informational, as in peft)
    revision: Optional[str] = None  # the base model's revision (informational)
    peft_type: str = "LORA"  # the method; only LoRA here
    auto_mapping: Optional[dict] = None  # peft's record of a custom model class (informational)
    # "<release>@<producer>" is peft's own spelling for "not exactly this release" (peft config.py, dev builds).
    peft_version: str = f"{PEFT_SPEC_VERSION}@reference_impl"

    peft_only_fields: ClassVar[dict[str, Any]] = PEFT_ONLY_FIELDS

    def __post_init__(self):
        """The boundary where bad values stop (config_checks.py): nothing later re-checks them."""
        config_checks.check_types(self)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        config_checks.check_values(self)
        config_checks.check_combinations(self)

    @property
    def is_regex_target(self) -> bool:
        return isinstance(self.target_modules, str)
