"""LoKr: the weight delta is a Kronecker product (Yeh et al. 2023, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", section 3.2; LyCORIS):

    delta = kron(w1, w2) * alpha / r        w1 (a, c), w2 (b, d): out = a * b, in = c * d

with (a, b) = factorization(out) and (c, d) = factorization(in). w2 is stored whole when r >= max(b, d) / 2 and
as w2_a @ w2_b (rank r) otherwise; w1 is stored whole unless decompose_both and r < max(a, c) / 2. A conv's w2
carries the kernel: whole (b, d, *kernel), a CP decomposition with use_effective_conv2d (t2, as in loha.py), or
w2_b (r, d * kernel) flattened. Saved keys: '<module path>.lokr_w1' or '.lokr_w1_a'/'.lokr_w1_b', and likewise for
w2, plus '.lokr_t2'. Spec area LOKR; the layer mechanics are in delta_layer.py. Facts from peft 0.21.2 tuners/lokr.
"""

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from . import config_checks
from .delta_layer import DeltaLayer, check_supported, kaiming
from .loha import LyCORISConfig


@dataclass
class LoKrConfig(LyCORISConfig):
    init_weights: Union[bool, str] = True  # True: w1 = 0; "lycoris": w2 = 0 (LyCORIS' own choice); False: random
    decompose_both: bool = False  # store w1 as w1_a @ w1_b too, when r is small enough
    decompose_factor: int = -1  # factorization's bound on the smaller factor; -1: as close to sqrt as possible
    rank_dropout_scale: bool = False  # rank_dropout divides the kept rows by the share kept
    peft_type: str = "LOKR"  # the method

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        init = self.init_weights
        config_checks.expect("init_weights", init, isinstance(init, bool) or init == "lycoris",
                             "True, False or 'lycoris'", owner)
        for name in ("decompose_both", "rank_dropout_scale"):
            config_checks.expect(name, getattr(self, name), isinstance(getattr(self, name), bool), "true or false",
                                 owner)
        factor = self.decompose_factor
        config_checks.expect("decompose_factor", factor, type(factor) is int and (factor == -1 or factor > 0),
                             "-1 or a positive integer", owner)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n, m as large as allowed: a divisor `factor` of the dimension is taken as
    it is (m = factor, even when larger than n); otherwise m walks up the divisors while m < n and m <= factor
    (no bound for -1). 24 -> (4, 6), 16 -> (4, 4), 7 -> (1, 7); (128, 4) -> (4, 32). Spec: LOKR-KEYS-001."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if divisor > bound:
            break
        m, n = divisor, dimension // divisor
    return (m, n) if m <= n else (n, m)


class LoKrLayer(DeltaLayer):
    containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.rank_dropout_scale: dict[str, bool] = {}

    def factor_shapes(self, r: int, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
        """Spec: LOKR-KEYS-001."""
        a, b = factorization(self.base_layer.weight.shape[0], config.decompose_factor)
        c, d = factorization(self.in_per_group(), config.decompose_factor)
        kernel = self.kernel()
        shapes = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)} if config.decompose_both and r < max(a, c) / 2 \
            else {"lokr_w1": (a, c)}
        if r >= max(b, d) / 2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif self.uses_cp(config):
            shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d),
                          lokr_t2=(r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        return shapes

    def initial_values(self, name: str, config: LoKrConfig) -> None:
        """Drawn w1 first, then w2, then the core: True zeroes w1 (or w1_a), "lycoris" zeroes w2 (or w2_b), False
        zeroes nothing; everything else kaiming uniform. Spec: LOKR-INIT-001."""
        init = config.init_weights
        first = nn.init.zeros_ if init is True else kaiming  # how w1 (or w1_a) starts
        if name in self.lokr_w1:
            first(self.lokr_w1[name])
        else:
            first(self.lokr_w1_a[name])
            kaiming(self.lokr_w1_b[name])
        if name in self.lokr_w2:
            (nn.init.zeros_ if init == "lycoris" else kaiming)(self.lokr_w2[name])
        elif init == "lycoris":  # w2_b is zeroed before w2_a is drawn
            nn.init.zeros_(self.lokr_w2_b[name])
            kaiming(self.lokr_w2_a[name])
        else:
            kaiming(self.lokr_w2_a[name], self.lokr_w2_b[name])
        if name in self.lokr_t2:
            kaiming(self.lokr_t2[name])

    def method_delta(self, name: str) -> torch.Tensor:
        """Spec: LOKR-FWD-001."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        if w2.dim() == 4:  # a conv kernel: w1 gets two unit dimensions to match
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()) * self.scaling[name]

    def rank_dropout_rescales(self, name: str) -> bool:
        return self.rank_dropout_scale[name]

    def add_adapter(self, name: str, r: int, alpha: float, config: LoKrConfig, upcast_half: bool,
                    initialize: bool = True) -> None:
        self.rank_dropout_scale[name] = config.rank_dropout_scale
        super().add_adapter(name, r, alpha, config, upcast_half, initialize)


def make_layer(module: nn.Module, path: str, config: LoKrConfig) -> LoKrLayer:
    """Spec: LOKR-MATCH-001 (Linear, Conv1d, Conv2d; GPT-2's Conv1D and embeddings are refused)."""
    check_supported(module, path, "LoKr")
    return LoKrLayer(module)
