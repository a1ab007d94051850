"""A small, readable LoRA that computes and saves exactly what Hugging Face peft 0.21 does.

Read in this order: layers.py (the formula and the layer contract), config.py (each field, peft's defaults),
targeting.py (which modules get an adapter), merging.py, dora.py, model.py (injection), peft_model.py (the
wrapper), save_load.py (what is saved, and loading). peft_format.py holds the format facts every reader and writer
shares; config_checks.py the checks every config value passes once. mixed_batch.py (an adapter per batch row),
weighted.py (add_weighted_adapter), parameters.py (target_parameters), attention.py (nn.MultiheadAttention) and
trainable_tokens.py (trainable_token_indices) each hold one feature; quantized.py is LoRA on bitsandbytes'
4-bit and 8-bit layers (QLoRA). Other methods: methods.py lists them;
adapter_layer.py is what every method's layer shares; ia3.py, loha.py and lokr.py (the last two on delta_layer.py)
each hold one method. Requirement IDs (LORA-..., QLORA-..., IA3-..., LOHA-..., LOKR-...) refer to SPEC.md.
"""

from . import peft_format
from .config import PEFT_ONLY_FIELDS, PEFT_SPEC_VERSION, LoraConfig
from .ia3 import IA3Config
from .loha import LoHaConfig
from .lokr import LoKrConfig
from .methods import METHODS, config_from_dict, make_lora_layer
from .model import TunerModel
from .peft_model import PeftModel, get_peft_model, inject_adapter_in_model, with_task_heads
from .save_load import get_peft_model_state_dict, read_weights, set_peft_model_state_dict
from .targeting import matches_target, pattern_value, resolve_targets, unmatched_pattern_keys

__version__ = "0.2.0"

__all__ = [
    "LoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "METHODS", "config_from_dict", "TunerModel",
    "PeftModel", "get_peft_model", "inject_adapter_in_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "PEFT_SPEC_VERSION", "peft_format",
    # For tools that inspect adapters without loading them (conformance/adapter_kit/check_adapter.py): which modules
    # a config selects, with which rank, what layer LoRA would put there, what a file holds.
    "make_lora_layer", "matches_target", "pattern_value", "resolve_targets", "unmatched_pattern_keys",
    "with_task_heads", "read_weights", "PEFT_ONLY_FIELDS",
]
