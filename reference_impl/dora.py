"""DoRA: the adapted weight W + s*BA is split into a learned magnitude m and a direction,

    W_dora = m * (W + s*BA) / ||W + s*BA||      (one norm per output feature, treated as a constant)

Spec: LORA-INIT-008 (magnitude init), LORA-FWD-008 (forward), LORA-GRAD-003 (detached norm), LORA-MERGE-006.
Paper: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5 and §4.3 (detached norm).
All weights here are seen "out first", (out_features, in_features, ...), through `layer.out_first`.
"""

import torch
from torch import nn


class Magnitude(nn.Module):
    """The learned magnitude m, held as a module's `weight` so that parameter names are peft's
    (`...lora_magnitude_vector.<adapter>.weight`); the saved key drops ".weight" (LORA-KEYS-005, LORA-KEYS-009)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(value)


def _norm(layer, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta|| per output feature, shaped like the magnitude ((out,), or (1, out, 1, ...) for conv)."""
    combined = layer.out_first(weight) + delta
    norm = combined.flatten(1).norm(dim=1).to(combined.dtype)
    return norm.view(1, -1, *[1] * (combined.dim() - 2)) if combined.dim() > 2 else norm


def initial_magnitude(layer, name: str) -> torch.Tensor:
    """m starts at ||W + s*BA||, which is ||W|| when B starts at zero."""
    A, B = layer.factors(name)
    return _norm(layer, layer.dense_weight(), layer.scaling[name] * layer.delta_from_factors(A, B)).detach()


def _scale(layer, name: str, dtype: torch.dtype) -> torch.Tensor:
    """m / ||W + s*BA||, the norm detached so that it gets no gradient (DoRA §4.3)."""
    A, B = layer.factors(name)
    lora_weight = layer.delta_from_factors(A, B).detach().to(dtype)
    norm = _norm(layer, layer.dense_weight().to(dtype), layer.scaling[name] * lora_weight).detach()
    return layer.lora_magnitude_vector[name].weight / norm


def adapted_output(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The layer output with a DoRA adapter, from the plain base output `result`.

    Linear/conv: result + (m/n - 1) * (W x) + (m/n) * s * B A x, where W x is the base output without its bias.
    With dropout active, W x is recomputed on the dropped input (peft 0.21.2 variants.py:242-246).
    Embedding: (m/n) * (result + s * A.T[x] @ B.T), no dropout."""
    if layer.is_embedding:  # no input to cast: the norm is taken in the adapter's dtype (float32 on a half base)
        A, B = layer.factors(name)
        scale = _scale(layer, name, A.dtype)
        return scale * result + scale * (layer.lookup(x, A.T) @ B.T) * layer.scaling[name]
    scale = _scale(layer, name, x.dtype)
    dropout = layer.lora_dropout[name]
    if layer.training and not isinstance(dropout, torch.nn.Identity):
        x = dropout(x)
        base = layer.base_output_without_bias(x)
    else:
        bias = layer.broadcast_bias()
        base = result if bias is None else result - bias
    lora = layer.lora_B[name](layer.lora_A[name](x))
    # result + (the DoRA term), in this order: in half precision the order of the additions shows in the last bit
    return result + ((scale - 1) * base + scale * lora * layer.scaling[name])


def _factor(layer, name: str, norm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """m / norm as a column that broadcasts against the out-first weight."""
    factor = layer.lora_magnitude_vector[name].weight / norm
    return factor.flatten().view(-1, *[1] * (weight.dim() - 1))


def merged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """(m / ||W + s*BA||) * (W + s*BA). The norm is that of the forward pass: taken on the base weight without
    adapters merged earlier, and kept for unmerge."""
    delta = layer.delta_weight(name)
    base_weight = weight.clone()
    for earlier in reversed(layer.merged_adapters):
        base_weight = layer.unmerged_weight(earlier, base_weight)
    norm = _norm(layer, base_weight, layer.out_first(delta)).detach()
    layer.dora_merge_norms[name] = norm
    factor = _factor(layer, name, norm, weight)
    return layer.out_first(factor * layer.out_first(weight + delta)).to(weight.dtype)


def unmerged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    factor = _factor(layer, name, layer.dora_merge_norms[name], weight)
    return (layer.out_first(layer.out_first(weight) / factor) - layer.delta_weight(name)).to(weight.dtype)
