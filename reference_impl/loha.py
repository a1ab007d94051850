"""LoHa: the weight delta is the Hadamard (elementwise) product of two rank-r products (Hyeon-Woo et al. 2022,
"FedPara", eq. 2; LyCORIS):

    delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r              w?_a (out, r), w?_b (r, in)

so its rank can reach r^2 with 4 r (out + in) parameters. A conv's weight is flattened to (out, in/groups * kernel),
or, with use_effective_conv2d and a kernel larger than 1, each product is a CP decomposition over a core t (r, r,
*kernel) ("Proposition 3"): rebuild[p, q, k, l] = sum_ij t[i, j, k, l] w?_a[i, p] w?_b[j, q].
Saved keys: '<module path>.hada_w1_a', ..., '.hada_t1', '.hada_t2'. Spec area LOHA; the layer mechanics
(dropouts, merging) are in delta_layer.py. Facts from peft 0.21.2 tuners/loha.
"""

import math
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from . import config_checks
from .config import TunerConfig
from .delta_layer import DeltaLayer, check_supported, kaiming


@dataclass
class LyCORISConfig(TunerConfig):
    """The fields LoHa and LoKr share (peft's LycorisConfig and its subclasses). Spec: LOHA-CFG-001, LOKR-CFG-001."""

    r: int = 8  # the rank of each factor product
    alpha: float = 8  # scaling = alpha / r (no rsLoRA variant)
    rank_dropout: float = 0.0  # train mode: zero each output row of the delta with this probability
    module_dropout: float = 0.0  # train mode: skip the adapter for a whole pass with this probability
    use_effective_conv2d: bool = False  # CP-decompose conv kernels larger than 1
    init_weights: bool = True  # True: the delta starts at zero (one factor zero); False: every factor random
    layers_to_transform: Union[int, list[int], None] = None  # as in LoraConfig
    layers_pattern: Union[str, list[str], None] = None  # the name of the layer list, for the index
    rank_pattern: dict = field(default_factory=dict)  # regex -> r
    alpha_pattern: dict = field(default_factory=dict)  # regex -> alpha

    def __post_init__(self):
        self.check_and_convert()
        owner = type(self).__name__
        config_checks.expect("r", self.r, type(self.r) is int and self.r > 0, "a positive integer", owner)
        config_checks.check_number("alpha", self.alpha, owner)
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            config_checks.check_number(name, value, owner)
            config_checks.expect(name, value, 0.0 <= value <= 1.0, "in [0, 1]", owner)
        config_checks.expect("use_effective_conv2d", self.use_effective_conv2d,
                             isinstance(self.use_effective_conv2d, bool), "true or false", owner)
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        config_checks.check_layers_pattern(self)


@dataclass
class LoHaConfig(LyCORISConfig):
    peft_type: str = "LOHA"  # the method

    def __post_init__(self):
        super().__post_init__()
        config_checks.expect("init_weights", self.init_weights, isinstance(self.init_weights, bool), "true or false",
                             type(self).__name__)


class LoHaLayer(DeltaLayer):
    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def factor_shapes(self, r: int, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
        """Spec: LOHA-INIT-001 (keys and shapes)."""
        out, kernel = self.base_layer.weight.shape[0], self.kernel()
        if self.uses_cp(config):
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            return {"hada_w1_a": (r, out), "hada_w1_b": (r, self.in_per_group()), "hada_w2_a": (r, out),
                    "hada_w2_b": (r, self.in_per_group()), "hada_t1": core, "hada_t2": core}
        flat_in = self.in_per_group() * math.prod(kernel)
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat_in), "hada_w2_a": (out, r), "hada_w2_b": (r, flat_in)}

    def initial_values(self, name: str, config: LoHaConfig) -> None:
        """True: w2_b = 0 (so the delta is 0), the others kaiming uniform; False: all kaiming uniform; the cores
        last. Spec: LOHA-INIT-001."""
        kaiming(self.hada_w1_a[name], self.hada_w1_b[name], self.hada_w2_a[name])
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[name])
        else:
            kaiming(self.hada_w2_b[name])
        if name in self.hada_t1:
            kaiming(self.hada_t1[name], self.hada_t2[name])

    def method_delta(self, name: str) -> torch.Tensor:
        """Spec: LOHA-FWD-001, LOHA-FWD-002 (CP)."""
        scale = torch.tensor(self.scaling[name])
        if name in self.hada_t1:
            first = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1[name], self.hada_w1_b[name], self.hada_w1_a[name])
            second = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2[name], self.hada_w2_b[name], self.hada_w2_a[name])
            return first * second * scale
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return (first * second) * scale

    def rank_dropout_rescales(self, name: str) -> bool:
        return True


def make_layer(module: nn.Module, path: str, config: LoHaConfig) -> LoHaLayer:
    """Spec: LOHA-MATCH-001 (Linear, Conv1d, Conv2d; GPT-2's Conv1D and embeddings are refused)."""
    check_supported(module, path, "LoHa")
    return LoHaLayer(module)

