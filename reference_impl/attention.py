"""LoRA on torch's nn.MultiheadAttention (CLIP- and ViT-style models built on it).

torch's attention reads its weights directly (F.multi_head_attention_forward), so there is no Linear to wrap for
the fused q/k/v in-projection, and out_proj's own forward is never called. One adapter therefore has two pairs of
factors: A (r, d) and B (3d, r) on in_proj_weight, saved as '<path>.lora_A.weight', and a Linear adapter on
out_proj, saved as '<path>.base_layer.out_proj.lora_A.weight'. The attention computes with

    in_proj_weight + s B A,        out_proj.weight + 2 s B' A'

The 2 is peft 0.21.2's: it writes W + s B' A' into out_proj and then merges out_proj's adapter once more
(tuners/lora/layer.py:2076-2089; upstream PR huggingface/peft#3774 removes the second add). Only the first of the
two adds carries a gradient, so gradients are those of W + s B' A' taken at W + 2 s B' A'. Spec: LORA-MHA-001..003.
"""

import torch
from torch import nn

from .config import LoraConfig
from .layers import Linear
from .parameters import parameter_replaced


class MultiheadAttention(Linear):
    """The in-projection adapter (this layer) and out_proj's (a Linear LoRA layer inside the base module)."""

    def __init__(self, base_layer: nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention.")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")
        super().__init__(base_layer)
        base_layer.out_proj = Linear(base_layer.out_proj)
        # peft swaps both weights out and back in around every forward pass, which re-registers them after the
        # biases; named_parameters() then lists each bias first. Same order here (LORA-KEYS-009).
        for module, name in ((base_layer, "in_proj_weight"), (base_layer.out_proj.base_layer, "weight")):
            module._parameters[name] = module._parameters.pop(name)

    @property
    def out_proj(self) -> Linear:
        return self.base_layer.out_proj

    def feature_sizes(self) -> tuple[int, int]:
        return self.base_layer.embed_dim, 3 * self.base_layer.embed_dim

    def adapted_weight(self) -> nn.Parameter:
        return self.base_layer.in_proj_weight

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig, upcast_half: bool,
                    initialize: bool = True) -> None:
        """Both pairs of factors. When the layer is created, peft draws out_proj's initial values twice (once as
        it wraps out_proj, once more after the in-projection's); the second draw is kept. Spec: LORA-INIT-003."""
        if config.use_dora:
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
        if not self.r:
            self.out_proj.add_adapter(name, r, lora_alpha, config, upcast_half, initialize)
        super().add_adapter(name, r, lora_alpha, config, upcast_half, initialize)
        self.out_proj.add_adapter(name, r, lora_alpha, config, upcast_half, initialize)

    def forward(self, query: torch.Tensor, *args, **kwargs):
        """The attention with the active adapters' deltas in its weights; returns (output, attention weights) in
        the query's dtype. Spec: LORA-MHA-001."""
        if self.row_adapters is not None:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")
        if self.disabled and self.merged_adapters:
            self.unmerge()
        active = [name for name in self.active_adapters if name in self.r]
        if self.disabled or self.merged_adapters or not active:
            output, weights = self.base_layer(query, *args, **kwargs)
        else:
            in_weight, out_weight = self.adapted_weight(), self.out_proj.base_layer.weight
            for name in active:
                in_weight = in_weight + self.delta_weight(name)
                out_delta = self.out_proj.delta_weight(name)
                out_weight = out_weight + out_delta + out_delta.detach()  # peft's second add carries no gradient
            with parameter_replaced(self.base_layer, "in_proj_weight", in_weight), \
                    parameter_replaced(self.out_proj.base_layer, "weight", out_weight):
                output, weights = self.base_layer(query, *args, **kwargs)
        return output.to(query.dtype), None if weights is None else weights.to(query.dtype)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold both deltas in, out_proj's twice as in the forward pass. Spec: LORA-MHA-003."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            super().merge([name], safe_merge)
            self.out_proj.merge([name], safe_merge)
            self.out_proj.base_layer.weight.data += self.out_proj.delta_weight(name)

    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            self.out_proj.base_layer.weight.data -= self.out_proj.delta_weight(name)
        self.out_proj.unmerge()
        super().unmerge()
