"""LoRA layers: a frozen base layer plus named low-rank adapters,

    y = base(x) + B(A(dropout(x))) * scaling,    scaling = lora_alpha / r  (lora_alpha / sqrt(r) with rsLoRA)

Spec areas: INIT (shapes, initial values), FWD (forward), MERGE (merging.py). Attribute names (`base_layer`,
`lora_A`, `lora_B`, `lora_embedding_A`, ...) are peft's, because the saved keys are built from them.
Papers: Hu et al. 2021, "LoRA", eq. 3; Kalajdzievski 2023, "rsLoRA".
"""

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dora, mixed_batch
from .adapter_layer import AdapterLayer
from .config import LoraConfig
from .merging import Merging
from .peft_format import is_conv1d, scaling


class LoraLayer(Merging, AdapterLayer):
    """A base layer and its adapters. forward() is the formula; the layer types (Linear, Conv, Embedding) supply
    the hooks declared below it: how factors are built and stored, how an adapter's output is added, and what the
    delta weight B A looks like in the base weight's layout."""

    is_embedding = False  # an embedding looks its factor A up instead of multiplying by it (DoRA asks)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x) plus every active adapter's output, in the base output's dtype.
        Spec: LORA-FWD-001, LORA-FWD-005, LORA-FWD-007, LORA-MULTI-004."""
        if self.row_adapters is not None:  # model(..., adapter_names=[...]): an adapter per row
            return mixed_batch.lora_layer_forward(self, x, *args, **kwargs)
        if self.disabled and self.merged_adapters:
            self.unmerge()  # peft 0.21.2 layer.py:1079: a disabled, merged layer unmerges for good (LORA-FWD-007)
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged_adapters:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.r:
                x = self.adapter_input(name, x)  # stays cast for the adapters after it, as in peft
                result = self.adapter_output(name, x, result)
        return result.to(result_dtype)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The LoRA formula: result + B(A(dropout(x))) * scaling; DoRA rescales it (dora.py).
        Spec: LORA-FWD-001, LORA-FWD-004 (dropout on the LoRA branch only), LORA-FWD-009 (conv)."""
        if name in self.lora_magnitude_vector:
            return dora.adapted_output(self, name, x, result)
        return result + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    # --- hooks each layer type defines -----------------------------------------------------------------------
    def adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x as the adapter takes it (Linear casts it to the adapter's dtype)."""
        return x

    def factor_containers(self) -> tuple:
        """The dicts that hold each adapter's A and B, by adapter name."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors A (r, in, ...) and B (out, r, ...) of adapter `name`."""
        raise NotImplementedError

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig, upcast_half: bool,
                    initialize: bool = True) -> None:
        """Create adapter `name`: factors with peft's initial values (or zeros, drawing nothing, when
        initialize=False because values are about to be loaded). Spec: LORA-INIT-001..005."""
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters under their saved key suffixes (lora_A.weight, ...). Spec: LORA-KEYS-001..006."""
        raise NotImplementedError

    def factor_shapes(self, r: int) -> dict[str, tuple]:
        """Every saved key suffix an adapter of rank r may have here (lora_B.bias and DoRA's magnitude included),
        with its shape: what a file must hold to fit this layer. Spec: LORA-INIT-001."""
        raise NotImplementedError

    def delta_from_factors(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B A, out first: (out, in, ...)."""
        raise NotImplementedError

    def out_first(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight seen as (out_features, in_features, ...); its own inverse."""
        return weight

    def adapted_weight(self) -> nn.Parameter:
        """The parameter the adapters change (merging writes into it; new adapters take its device and dtype)."""
        return self.base_layer.weight

    def adapter_dtype(self) -> Optional[torch.dtype]:
        """The dtype a new adapter is moved to (then upcast from half precision): the base weight's."""
        return self.adapted_weight().dtype

    def dense_weight(self) -> torch.Tensor:
        """The base weight as the float tensor the layer computes with (a quantized layer dequantizes it), in the
        stored layout. DoRA's norm reads it."""
        return self.adapted_weight()

    def fold_operands(self, A: torch.Tensor, B: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(left, right) with left @ right = B A in the stored weight's layout, for merging in one addmm_; None
        where no single matrix product gives it (conv)."""
        return None

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the base bias (DoRA recomputes it on the dropped input)."""
        raise NotImplementedError

    def broadcast_bias(self) -> Optional[torch.Tensor]:
        """The base bias shaped to broadcast against the layer output, or None."""
        raise NotImplementedError

    # --- adapter bookkeeping -----------------------------------------------------------------------------------
    def __init__(self, base_layer: nn.Module, factors: dict[str, nn.Module]):
        super().__init__(base_layer)
        # Registered in peft's order, so that named_parameters() lists the same names in the same order
        # (optimizer checkpoints index parameters by position). LORA-KEYS-009.
        self.lora_dropout = nn.ModuleDict()
        for name, container in factors.items():
            setattr(self, name, container)
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA only: adapter name -> dora.Magnitude
        self.r, self.lora_alpha, self.scaling, self.lora_bias = {}, {}, {}, {}
        self.dora_merge_norms: dict[str, torch.Tensor] = {}

    def has_adapter(self, name: str) -> bool:
        return name in self.r

    def _add_settings(self, name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        """Rank, scaling and dropout of a new adapter. Spec: LORA-FWD-002 (scaling), LORA-FWD-004 (dropout)."""
        self.r[name], self.lora_alpha[name], self.lora_bias[name] = r, lora_alpha, config.lora_bias
        self.scaling[name] = scaling(lora_alpha, r, config.use_rslora)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def _finish_adapter(self, name: str, config: LoraConfig, upcast_half: bool) -> None:
        """Move the new adapter to the base weight's device and dtype, add DoRA's magnitude, then (as peft does
        in PeftModel) upcast fp16/bf16 adapters to fp32: their initial values keep the half-precision rounding.
        Spec: LORA-INIT-006, LORA-INIT-008."""
        weight = self.adapted_weight()
        dtype = self.adapter_dtype()
        self._convert(name, device=weight.device, dtype=dtype)
        if config.use_dora:
            self.lora_magnitude_vector[name] = dora.Magnitude(dora.initial_magnitude(self, name))
        if upcast_half and dtype in (torch.float16, torch.bfloat16):
            self._convert(name, dtype=torch.float32)

    def _convert(self, name: str, **to) -> None:
        for container in (*self.factor_containers(), self.lora_magnitude_vector):
            if name in container:
                item = container[name]
                container[name] = item.to(**to) if isinstance(item, nn.Module) else nn.Parameter(item.to(**to))

    def delete_adapter(self, name: str) -> None:
        for container in (self.lora_dropout, self.lora_magnitude_vector, *self.factor_containers()):
            if name in container:
                del container[name]
        for settings in (self.r, self.lora_alpha, self.scaling, self.lora_bias):
            settings.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]


class Linear(LoraLayer):
    """LoRA for nn.Linear, and for GPT-2's Conv1D, whose weight is stored transposed (fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer, {"lora_A": nn.ModuleDict(), "lora_B": nn.ModuleDict()})
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = self.feature_sizes()

    def feature_sizes(self) -> tuple[int, int]:
        shape = tuple(self.base_layer.weight.shape)
        return shape if self.fan_in_fan_out else shape[::-1]

    def adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.lora_A[name].weight.dtype)

    def factor_containers(self):
        return self.lora_A, self.lora_B

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """lora_A.weight, lora_B.weight[, lora_B.bias, lora_magnitude_vector]. Spec: LORA-KEYS-001, LORA-KEYS-005."""
        tensors = {f"lora_A.{key}": p for key, p in self.lora_A[name].named_parameters()}
        tensors.update({f"lora_B.{key}": p for key, p in self.lora_B[name].named_parameters()})
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return tensors

    def make_factors(self, r: int, lora_bias: bool, initialize: bool = True) -> tuple[nn.Module, nn.Module]:
        return (construct(nn.Linear, self.in_features, r, bias=False, initialize=initialize),
                construct(nn.Linear, r, self.out_features, bias=lora_bias, initialize=initialize))

    def factor_shapes(self, r: int) -> dict[str, tuple]:
        A, B = self.make_factors(r, lora_bias=True, initialize=False)  # draws nothing from the RNG
        return {"lora_A.weight": tuple(A.weight.shape), "lora_B.weight": tuple(B.weight.shape),
                "lora_B.bias": tuple(B.bias.shape), "lora_magnitude_vector": (self.out_features,)}

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig, upcast_half: bool,
                    initialize: bool = True) -> None:
        """Spec: LORA-INIT-001 (shapes), LORA-INIT-002..005 (values, bit-exact for a given torch seed)."""
        self._add_settings(name, r, lora_alpha, config)
        # Both constructors draw their default init from the global RNG, A first: peft draws in this order.
        self.lora_A[name], self.lora_B[name] = self.make_factors(r, config.lora_bias, initialize)
        init = config.init_lora_weights
        # True: A as nn.Linear inits it (kaiming uniform). "gaussian": A ~ N(0, 1/r). B = 0 either way.
        if init is not False and initialize:
            A, B = self.lora_A[name], self.lora_B[name]
            if init is True:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
            if B.bias is not None:
                nn.init.zeros_(B.bias)
        self._finish_adapter(name, config, upcast_half)

    def out_first(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def delta_from_factors(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A  # (out, in)

    def fold_operands(self, A: torch.Tensor, B: torch.Tensor):
        return (A.T, B.T) if self.fan_in_fan_out else (B, A)  # (BA)^T = A^T B^T for Conv1D's (in, out)

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.out_first(self.dense_weight()).to(x.dtype))

    def broadcast_bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias


class Conv(Linear):
    """LoRA for nn.Conv1d/2d/3d: A is a conv like the base (kernel, stride, padding; dilation and groups left at
    1, as in peft), B a 1x1 conv with the base's groups. Spec: LORA-FWD-009."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd):
        super().__init__(base_layer)
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")

    def feature_sizes(self) -> tuple[int, int]:
        return self.base_layer.in_channels, self.base_layer.out_channels

    def make_factors(self, r: int, lora_bias: bool, initialize: bool = True) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        if r % base.groups:
            raise ValueError(f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. "
                             "Currently, support is limited to conv layers where the rank is divisible by groups.")
        ones = (1,) * (base.weight.dim() - 2)
        A = construct(type(base), self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False,
                      initialize=initialize)
        B = construct(type(base), r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias,
                      initialize=initialize)
        return A, B

    def delta_from_factors(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B @ A reshaped to the base weight, (out, in / groups, *kernel). With groups > 1 this is how peft reads
        the factors for DoRA's norm (B viewed as (-1, r)): not the grouped conv's own delta, but such a layer is
        never merged, so the norm is its only use."""
        r = A.shape[0]
        return (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(self.base_layer.weight.shape)

    def fold_operands(self, A: torch.Tensor, B: torch.Tensor):
        return None

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        super().merge(adapter_names, safe_merge)

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return base._conv_forward(x, base.weight.to(x.dtype), None)

    def broadcast_bias(self) -> Optional[torch.Tensor]:
        bias = self.base_layer.bias
        return None if bias is None else bias.view(-1, *[1] * (self.base_layer.weight.dim() - 2))


class Embedding(LoraLayer):
    """LoRA for nn.Embedding: A (r, vocab) is looked up like an embedding table, then projected by B (dim, r)."""

    is_embedding = True
    rounds_delta_on_merge = True  # see Merging.add_delta

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer, {"lora_embedding_A": nn.ParameterDict(), "lora_embedding_B": nn.ParameterDict()})
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + (A.T[x] @ B.T) * s, with no dropout and no input cast, as in peft. Spec: LORA-FWD-003."""
        if name in self.lora_magnitude_vector:
            return dora.adapted_output(self, name, x, result)
        A, B = self.factors(name)
        return result + (self.lookup(x, A.T) @ B.T) * self.scaling[name]

    def lookup(self, tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Embed with the base layer's options (padding_idx only changes gradients)."""
        base = self.base_layer
        return F.embedding(tokens, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def factor_containers(self):
        return self.lora_embedding_A, self.lora_embedding_B

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def factor_shapes(self, r: int) -> dict[str, tuple]:
        return {"lora_embedding_A": (r, self.in_features), "lora_embedding_B": (self.out_features, r),
                "lora_magnitude_vector": (self.out_features,)}

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """Saved without ".weight": lora_embedding_A, lora_embedding_B. Spec: LORA-KEYS-002."""
        tensors = {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return tensors

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig, upcast_half: bool,
                    initialize: bool = True) -> None:
        """Spec: LORA-INIT-001, LORA-INIT-002: init True or "gaussian" gives A = 0 and B ~ N(0, 1)."""
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported for Embedding.")
        self._add_settings(name, r, lora_alpha, config)
        start = torch.randn if initialize else torch.zeros
        self.lora_embedding_A[name] = nn.Parameter(start(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(start(self.out_features, r))
        if config.init_lora_weights is not False and initialize:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])
        self._finish_adapter(name, config, upcast_half)

    def out_first(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # the table is (vocab, dim)

    def delta_from_factors(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A  # (dim, vocab)

    def fold_operands(self, A: torch.Tensor, B: torch.Tensor):
        return A.T, B.T  # the table is (vocab, dim)


def construct(cls, *args, initialize: bool = True, **kwargs) -> nn.Module:
    """cls(*args) with its default random init, or, for values about to be loaded, zeros drawn from nothing."""
    if initialize:
        return cls(*args, **kwargs)
    module = cls(*args, device="meta", **kwargs)  # shapes only: a meta init allocates and draws nothing
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(torch.zeros(param.shape)))
    return module


def warn_fan_in_fan_out(base_layer: nn.Module, config: LoraConfig) -> None:
    """peft corrects fan_in_fan_out per layer type, warns, and saves the last correction. Spec: LORA-CFG-004."""
    if isinstance(base_layer, nn.Linear) and config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.")
        config.fan_in_fan_out = False
    elif is_conv1d(base_layer) and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                      "Setting fan_in_fan_out to True.")
        config.fan_in_fan_out = True
