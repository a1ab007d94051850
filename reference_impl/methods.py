"""The PEFT methods reference_impl implements, by the peft_type adapter_config.json names: LoRA (layers.py),
IA3 (ia3.py), LoHa (loha.py), LoKr (lokr.py). Each method supplies its config class, the layer it puts on a
module, how an adapter is added to that layer, and its default targets; model.py does the rest for all of them.
A model holds adapters of one method, as in peft (peft_model.py: "Cannot combine adapters with different peft types").
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from . import delta_layer, ia3, loha, lokr
from .adapter_layer import AdapterLayer
from .attention import MultiheadAttention
from .config import LoraConfig
from .layers import Conv, Embedding, Linear, LoraLayer, warn_fan_in_fan_out
from .peft_format import is_conv1d
from .quantized import QuantizedLinear, is_quantized_linear
from .targeting import DEFAULT_TARGETS, pattern_value

SUPPORTED_BY_LORA = ("`torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, "
                     "`torch.nn.Conv3d`, `transformers.pytorch_utils.Conv1D` and `torch.nn.MultiheadAttention`")


def make_lora_layer(module: nn.Module) -> Optional[LoraLayer]:
    """The LoRA class for a base module, or None if LoRA cannot adapt it. Spec: LORA-MATCH-007, QLORA-FWD-001."""
    if is_quantized_linear(module):  # bitsandbytes' layers subclass nn.Linear: asked first
        return QuantizedLinear(module)
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttention(module)
    if isinstance(module, nn.Embedding):
        return Embedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv(module)
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return Linear(module)
    return None


def make_lora(module: nn.Module, name: str, config: LoraConfig) -> AdapterLayer:
    layer = make_lora_layer(module)
    if layer is None:
        raise ValueError(f"Target module {name} ({type(module).__name__}) is not supported. Currently, only "
                         f"{SUPPORTED_BY_LORA} are supported.")
    return layer


def attach_lora(layer, adapter_name: str, path: str, config: LoraConfig, upcast_half: bool, initialize: bool) -> None:
    """A LoRA adapter with the rank and alpha its module's patterns give. Spec: LORA-MATCH-009, LORA-INIT-*."""
    warn_fan_in_fan_out(layer.base_layer, config)
    r = pattern_value(path, config.rank_pattern, config.r)
    alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
    layer.add_adapter(adapter_name, r, alpha, config, upcast_half, initialize)


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_class: type
    make_layer: Callable[..., AdapterLayer]  # (module, its path, config) -> a new layer, or an error
    attach: Callable[..., None]  # (layer, adapter_name, path, config, upcast_half, initialize)
    default_targets: dict[str, set[str]]  # model_type -> target_modules when the config gives None
    prepare: Callable[[nn.Module, Any], None] = lambda model, config: None  # fill defaults after targets


METHODS = {m.peft_type: m for m in (
    Method("LORA", LoraConfig, make_lora, attach_lora, DEFAULT_TARGETS),
    Method("IA3", ia3.IA3Config, ia3.make_layer, ia3.attach, ia3.DEFAULT_TARGETS, ia3.prepare),
    Method("LOHA", loha.LoHaConfig, loha.make_layer, delta_layer.attach, DEFAULT_TARGETS),
    Method("LOKR", lokr.LoKrConfig, lokr.make_layer, delta_layer.attach, DEFAULT_TARGETS),
)}


def method_of(config) -> Method:
    return METHODS[config.peft_type]


def config_from_dict(data: dict[str, Any], ignore_unknown_keys: bool = False):
    """The config adapter_config.json describes, of the class its peft_type names (LoRA when absent).
    Spec: LORA-LOAD-006, IA3-SER-001, LOHA-SER-001, LOKR-SER-001."""
    peft_type = data.get("peft_type", "LORA")
    method: Optional[Method] = METHODS.get(peft_type)
    if method is None:
        raise ValueError(f"peft_type is {peft_type!r}; reference_impl implements {sorted(METHODS)}")
    return method.config_class.from_dict(data, ignore_unknown_keys)
