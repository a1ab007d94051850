"""What LoHa and LoKr share (peft's "LyCORIS-like" adapters): each adapter builds a full-size weight delta from its
small factors, and the layer computes

    y = base(x) + op(x, delta)          op: F.linear, or the base conv's own convolution
    delta = method_delta * alpha / r    (loha.py: a Hadamard product; lokr.py: a Kronecker product)

In train mode, module_dropout skips an adapter for a whole forward pass with that probability, and rank_dropout
zeroes rows (output features) of the delta. Merging adds the delta to the weight; unmerging subtracts it.
Spec areas LOHA and LOKR. Facts from peft 0.21.2 tuners/lycoris_utils.py and tuners/loha, tuners/lokr layer.py.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_layer import AdapterLayer
from .targeting import pattern_value

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class DeltaLayer(AdapterLayer):
    """A Linear, Conv1d or Conv2d with adapters that each add a weight delta. Subclasses build the factors
    (`create`, `initial_values`) and the delta from them (`method_delta`)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        for name in self.containers:
            setattr(self, name, nn.ParameterDict())
        self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout = {}, {}, {}, {}, {}

    def add_adapter(self, name: str, r: int, alpha: float, config, upcast_half: bool, initialize: bool = True) -> None:
        """Factors of rank r, zeros when values are about to be loaded (no RNG draws), else peft's initial values,
        drawn in peft's order. Spec: LOHA-INIT-001, LOKR-INIT-001."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name], self.module_dropout[name] = config.rank_dropout, config.module_dropout
        for container, shape in self.factor_shapes(r, config).items():
            getattr(self, container)[name] = nn.Parameter(torch.zeros(shape))
        if initialize:
            self.initial_values(name, config)
        self.move_adapter(name, upcast_half)

    def factor_shapes(self, r: int, config) -> dict[str, tuple[int, ...]]:
        """The containers this adapter uses on this layer, with their shapes."""
        raise NotImplementedError

    def initial_values(self, name: str, config) -> None:
        raise NotImplementedError

    def method_delta(self, name: str) -> torch.Tensor:
        """The delta times the scaling, in any shape holding the base weight's number of elements."""
        raise NotImplementedError

    def rank_dropout_rescales(self, name: str) -> bool:
        """Whether rank_dropout divides the kept rows by the share kept."""
        raise NotImplementedError

    def delta_weight(self, name: str, apply_rank_dropout: bool = False) -> torch.Tensor:
        """The delta shaped like the base weight. Spec: LOHA-FWD-001, LOKR-FWD-001."""
        weight = self.method_delta(name).reshape(self.base_layer.weight.shape)
        if apply_rank_dropout:
            keep = (torch.rand(weight.size(0)) > self.rank_dropout[name]).to(weight.dtype)
            keep = keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
            if self.rank_dropout_rescales(name):
                keep = keep / keep.mean()
            weight = weight * keep
        return weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Spec: LOHA-FWD-001, LOKR-FWD-001 (and module_dropout: one draw per adapter per pass in train mode)."""
        dtype = x.dtype
        names = self.running_adapters()
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            if not self.training or torch.rand(1) > self.module_dropout[name]:
                delta = self.delta_weight(name, apply_rank_dropout=self.training and bool(self.rank_dropout[name]))
                result = result + self.apply_delta(x.to(delta.dtype), delta)
        return result.to(dtype)

    def apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """op(x, delta): the base layer's operation with the delta as weight and no bias.
        Spec: LOHA-FWD-001, LOKR-FWD-001."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, delta)
        conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
        return conv(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """W += delta. Spec: LOHA-MERGE-001, LOKR-MERGE-001."""
        weight = self.base_layer.weight
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if not self.has_adapter(name) or name in self.merged_adapters:
                continue
            if safe_merge:
                merged = weight.data.clone()
                merged += self.delta_weight(name)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.data = merged
            else:
                weight.data += self.delta_weight(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W -= delta, last merged first. Spec: LOHA-MERGE-001, LOKR-MERGE-001."""
        while self.merged_adapters:
            self.base_layer.weight.data -= self.delta_weight(self.merged_adapters.pop())

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for settings in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout):
            settings.pop(name, None)

    # --- shapes ------------------------------------------------------------------------------------------------
    def uses_cp(self, config) -> bool:
        """use_effective_conv2d decomposes the kernel (CP, "Proposition 3" of FedPara) only for convs whose kernel
        is larger than 1."""
        base = self.base_layer
        return isinstance(base, (nn.Conv1d, nn.Conv2d)) and config.use_effective_conv2d \
            and any(k != 1 for k in base.kernel_size)

    def kernel(self) -> tuple[int, ...]:
        base = self.base_layer
        return tuple(base.kernel_size) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else ()

    def in_per_group(self) -> int:
        base = self.base_layer
        return base.in_features if isinstance(base, nn.Linear) else base.in_channels // base.groups


def kaiming(*tensors: torch.Tensor) -> None:
    """nn.Linear's default init (kaiming uniform, a = sqrt(5)), one tensor after the other."""
    for tensor in tensors:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def check_supported(module: nn.Module, path: str, method: str) -> None:
    """peft's TypeError for a layer LoHa and LoKr cannot take. Spec: LOHA-MATCH-001, LOKR-MATCH-001."""
    if not isinstance(module, SUPPORTED):
        raise TypeError(f"Target module {path} of type {type(module).__name__} not supported, currently only "
                        f"adapters for Conv2d, Conv1d, Linear are supported ({method})")


def attach(layer: DeltaLayer, adapter_name: str, path: str, config, upcast_half: bool, initialize: bool) -> None:
    """An adapter with the rank and alpha its module's patterns give (LoRA's rule). Spec: LOHA-MATCH-001."""
    r = pattern_value(path, config.rank_pattern, config.r)
    alpha = pattern_value(path, config.alpha_pattern, config.alpha)
    layer.add_adapter(adapter_name, r, alpha, config, upcast_half, initialize)
