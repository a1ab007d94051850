"""peft's format facts in one place: what every writer and reader of a peft LoRA adapter has to agree on.

Used by reference_impl, the conformance suite, the drivers, the golden fixtures and check-adapter, so that each fact
is written once. Facts of peft 0.21.2 (utils/save_and_load.py, tuners/lora, peft_model.py), not its code.
"""

import math
import re
from pathlib import Path
from typing import Optional

from torch import nn

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
DEFAULT_ADAPTER = "default"

# A saved key is PREFIX + the module path in the wrapped model + a tensor name, never the adapter's name:
# "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" (LORA-KEYS-001). A model injected without the
# PeftModel wrapper (inject_adapter_in_model) saves the same keys without PREFIX (LORA-KEYS-004).
PREFIX = "base_model.model."

# The tensor names after the module path: Linear, Conv1D and conv layers have lora_A.weight, lora_B.weight (and
# lora_B.bias with lora_bias); embeddings have lora_embedding_A/B without ".weight"; DoRA adds
# lora_magnitude_vector (LORA-KEYS-002, -005, -006).
LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
                "lora_magnitude_vector")
_LORA_KEY = re.compile(r"^(?P<path>.+?)\.(?P<tensor>" + "|".join(re.escape(t) for t in LORA_TENSORS) + ")$")
# In memory the adapter's name sits inside the key ("lora_A.default.weight"); saved keys must not carry it.
_NAMED_KEY = re.compile(r"\.(lora_A|lora_B)\.(?P<name>[^.]+)\.(weight|bias)$|\.(lora_embedding_[AB])\.(?P<emb>[^.]+)$")

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The heads a task type trains and saves in full, appended to every adapter's modules_to_save
# (peft_model.py:1830, 2680, 2915). Names absent from the model are simply not found.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def split_key(key: str) -> Optional[tuple[str, str]]:
    """(module path, tensor name) of a LoRA key with the prefix removed, or None for any other tensor."""
    match = _LORA_KEY.match(key)
    return (match["path"], match["tensor"]) if match else None


def keeps_adapter_name(key: str) -> bool:
    """Does a key carry an adapter name, as in memory ('lora_A.default.weight') and never in a saved file?"""
    return _NAMED_KEY.search(key) is not None


def adapter_directory(directory, adapter_name: str) -> Path:
    """The default adapter lives in the directory itself, any other in a subfolder named after it (LORA-SER-004)."""
    return Path(directory) if adapter_name == DEFAULT_ADAPTER else Path(directory) / adapter_name


def scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). LORA-FWD-002."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D`: a Linear whose weight is stored (in, out), so peft adapts it with
    fan_in_fan_out = True (LORA-CFG-004). Tested by name, so that transformers need not be imported."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
