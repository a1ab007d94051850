"""A small, readable LoRA that computes and saves exactly what Hugging Face peft 0.21 does.

Read in this order: config.py, targeting.py, layers.py (the forward pass), dora.py, model.py (injection),
peft_model.py (the wrapper), save_load.py (the file format). Requirement IDs (LORA-...) refer to SPEC.md.
"""

from .config import PEFT_SPEC_VERSION, LoraConfig
from .model import LoraModel
from .peft_model import PeftModel, get_peft_model, inject_adapter_in_model
from .save_load import get_peft_model_state_dict, set_peft_model_state_dict

__version__ = "0.2.0"

__all__ = [
    "LoraConfig", "LoraModel", "PeftModel", "get_peft_model", "inject_adapter_in_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "PEFT_SPEC_VERSION",
]
