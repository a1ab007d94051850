"""What the layers of every method share (LoRA, IA3, LoHa, LoKr): a frozen base layer, named adapters, which of
them run, which are merged, and the switch that turns them all off.

model.py injects, activates, merges, unloads and saves through this interface only, so a method is one module with
its config and layers (ia3.py, loha.py, lokr.py; LoRA in layers.py).
"""

from typing import Optional

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """A base layer with adapters. Subclasses name the ParameterDicts that hold their tensors in `containers`, in
    peft's order: the saved key of a tensor is '<module path>.<container>' (the adapter name left out)."""

    containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer  # registered first: named_parameters() lists it before the adapters, as in peft
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: Optional[list[str]] = None  # LoRA only: an adapter per batch row (mixed_batch.py)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads it through the layer (ViT's patch embedding asks
        `projection.weight.dtype`), as it can in peft. Not a parameter of this module."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias, for model code that reads it through the layer (torch's attention reads
        `out_proj.bias`), as it can in peft. Not a parameter of this module."""
        return self.base_layer.bias

    def has_adapter(self, name: str) -> bool:
        return any(name in getattr(self, c) for c in self.containers)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's tensors under their saved key suffixes."""
        return {c: getattr(self, c)[name] for c in self.containers if name in getattr(self, c)}

    def delete_adapter(self, name: str) -> None:
        for c in self.containers:
            getattr(self, c).pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def running_adapters(self) -> list[str]:
        """The active adapters this layer has, when they run unmerged; none when disabled or merged. A disabled,
        merged layer unmerges for good first (peft does so in every method's forward). Spec: LORA-FWD-007."""
        if self.disabled and self.merged_adapters:
            self.unmerge()
        if self.disabled or self.merged_adapters:
            return []
        return [name for name in self.active_adapters if self.has_adapter(name)]

    def move_adapter(self, name: str, upcast_half: bool) -> None:
        """Put the new adapter's tensors on the base weight's device and dtype, then, as peft's PeftModel does,
        upcast fp16/bf16 ones to fp32 (their values keep the half-precision rounding). Spec: LORA-INIT-006."""
        weight = self.base_layer.weight
        for c in self.containers:
            container = getattr(self, c)
            if name in container:
                tensor = container[name].data.to(device=weight.device, dtype=weight.dtype)
                if upcast_half and tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor = tensor.float()
                container[name] = nn.Parameter(tensor)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError
