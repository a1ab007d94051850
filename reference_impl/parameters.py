"""target_parameters: LoRA on a bare nn.Parameter, such as a mixture-of-experts block that stores every expert's
weight in one 3-d tensor (transformers' GPT-OSS, Llama 4, Qwen3-MoE experts).

For a parameter W of shape (E, X, Y), E experts, A is (r*E, Y) and B is (X, r*E), and expert e's delta is

    delta[e] = s * B[:, e::E] @ A[e*r:(e+1)*r]          (A's rows are expert-major, B's columns expert-minor)

A module that says `is_transposed = True` gets A (r*E, X), B (Y, r*E) and delta[e] transposed. A 2-d parameter
(out, in) is adapted like an nn.Linear weight: delta = s * B A. During a forward pass the module computes with
W + the active adapters' deltas; W itself changes only when merged. Several parameters of one module nest: the
first one targeted is innermost, so its keys read '<module>.base_layer.lora_A.weight'.
Spec: LORA-TPARAM-001..004.
"""

import contextlib

import torch
from torch import nn

from .config import LoraConfig
from .layers import Linear, LoraLayer, construct


class ParamLayer(Linear):
    """LoRA on the parameter `parameter_name` of the module it wraps (peft's lora.ParamWrapper)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        self.parameter_name = parameter_name
        super().__init__(base_layer)
        self.fan_in_fan_out = False

    def owner(self) -> nn.Module:
        """The module that holds the parameter, below any other ParamLayers of the same module."""
        module = self.base_layer
        while isinstance(module, ParamLayer):
            module = module.base_layer
        return module

    def adapted_weight(self) -> nn.Parameter:
        return getattr(self.owner(), self.parameter_name)

    def transposed(self) -> bool:
        """Some expert modules store (E, out, in) and say so (`is_transposed = True`)."""
        return getattr(self.owner(), "is_transposed", False)

    def feature_sizes(self) -> tuple[int, int]:
        """(in, out) of the factors: (Y, X) of an (E, X, Y) parameter ((X, Y) if the module is_transposed), and
        (in, out) of a 2-d (out, in) one."""
        shape = tuple(self.adapted_weight().shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only "
                             "2d and 3d are supported.")
        self.num_experts = shape[0] if len(shape) == 3 else 1
        if len(shape) == 2:
            return shape[1], shape[0]
        return (shape[1], shape[2]) if self.transposed() else (shape[2], shape[1])

    def make_factors(self, r: int, lora_bias: bool, initialize: bool = True) -> tuple[nn.Module, nn.Module]:
        rows = r * self.num_experts
        return (construct(nn.Linear, self.in_features, rows, bias=False, initialize=initialize),
                construct(nn.Linear, rows, self.out_features, bias=False, initialize=initialize))

    def factor_shapes(self, r: int) -> dict[str, tuple]:
        rows = r * self.num_experts
        return {"lora_A.weight": (rows, self.in_features), "lora_B.weight": (self.out_features, rows)}

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig, upcast_half: bool,
                    initialize: bool = True) -> None:
        """As for a Linear layer, with r * E rows. What cannot be factored out of a weight is refused: dropout
        (it acts on the input), DoRA, lora_bias. Spec: LORA-TPARAM-004."""
        for field_name, used in (("lora_dropout != 0", config.lora_dropout), ("use_dora=True", config.use_dora),
                                 ("lora_bias=True", config.lora_bias)):
            if used:
                raise ValueError(f"lora.ParamWrapper does not work with {field_name}.")
        super().add_adapter(name, r, lora_alpha, config, upcast_half, initialize)

    def expert_factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e, B_e) for every expert: (E, r, in) and (E, out, r)."""
        E = self.num_experts
        return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)

    def delta_from_factors(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B A in the parameter's own shape. Spec: LORA-TPARAM-001."""
        if self.num_experts == 1 and self.adapted_weight().dim() == 2:
            return B @ A
        A_e, B_e = self.expert_factors(A, B)
        delta = B_e @ A_e  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed() else delta

    def fold_operands(self, A: torch.Tensor, B: torch.Tensor):
        return (B, A) if self.adapted_weight().dim() == 2 else None

    def forward(self, x, *args, **kwargs):
        """The wrapped module computed with W + the active adapters' deltas. Spec: LORA-TPARAM-001."""
        if self.row_adapters is not None:
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches yet.")
        if self.disabled and self.merged_adapters:
            self.unmerge()
        active = [name for name in self.active_adapters if name in self.r]
        if self.disabled or self.merged_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        with parameter_replaced(self.owner(), self.parameter_name, self.weight_with_adapters(active)):
            return self.base_layer(x, *args, **kwargs)

    def weight_with_adapters(self, active: list[str]) -> torch.Tensor:
        """W + sum of the active deltas. With one adapter on an expert stack, W + s B_e A_e in one baddbmm, as
        peft computes it (no delta-sized temporary)."""
        weight = self.adapted_weight()
        if len(active) == 1 and weight.dim() == 3:
            A_e, B_e = self.expert_factors(*self.factors(active[0]))
            left, right = (A_e.transpose(1, 2), B_e.transpose(1, 2)) if self.transposed() else (B_e, A_e)
            return torch.baddbmm(weight, left.to(weight.dtype), right.to(weight.dtype), alpha=self.scaling[active[0]])
        delta = self.delta_weight(active[0])
        for name in active[1:]:
            delta = delta + self.delta_weight(name)
        return weight + delta


@contextlib.contextmanager
def parameter_replaced(module: nn.Module, name: str, value: torch.Tensor):
    """Inside the block, `module.<name>` is the tensor `value` (gradients flow through it) instead of its
    parameter; the parameter is put back afterwards."""
    original = module._parameters.pop(name)
    setattr(module, name, value)
    try:
        yield
    finally:
        delattr(module, name)
        module._parameters[name] = original


def targeted_parameters(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(module path, parameter name) for each parameter whose '<module path>.<name>' equals a target or ends with
    '.' + target, in model order; module paths as in the unadapted model. Spec: LORA-TPARAM-002."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) or ".lora_" in path:
            continue
        plain = path.replace(".base_layer", "")
        for name, _ in module.named_parameters(recurse=False):
            key = f"{plain}.{name}" if plain else name
            if key in targets or any(key.endswith("." + target) for target in targets):
                found.append((plain, name))
    return found


def layer_for(model: nn.Module, path: str, name: str):
    """The ParamLayer adapting parameter `name` of the module at `path`, or None."""
    module = model.get_submodule(path)
    while isinstance(module, ParamLayer):
        if module.parameter_name == name:
            return module
        module = module.base_layer
    return None
