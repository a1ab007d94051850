"""Merging: folding an adapter's delta, s * B A, into the base weight, and taking it out again.

Spec area MERGE. A mixin of LoraLayer (layers.py), whose hooks it uses: factors, delta_from_factors, out_first
(the stored weight's layout) and fold_operands.
"""

from typing import Optional

import torch

from . import dora


class Merging:
    # On a half-precision weight peft rounds the float32 delta to the weight's dtype before adding it when it unmerges,
    # merges safely or merges an Embedding, and adds it unrounded otherwise (LORA-MERGE-009). Embedding sets True.
    rounds_delta_on_merge = False

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * (B @ A), shaped like the base weight; fp16/bf16 factors on CPU are multiplied in fp32.
        Spec: LORA-MERGE-001."""
        A, B = self.factors(name)
        dtype = B.dtype
        if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        return (self.out_first(self.delta_from_factors(A, B)) * self.scaling[name]).to(dtype)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weight; safe_merge checks for NaN/Inf first. Spec: LORA-MERGE-005."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            weight = self.merged_weight(name, self.weight_to_change(copy=safe_merge),
                                        round_delta=safe_merge or self.rounds_delta_on_merge)
            bias = self.lora_bias_after_merge(name, sign=1)
            if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self.store_weight(weight)
            if bias is not None:
                self.base_layer.bias.data = bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take merged adapters out again, last merged first. Spec: LORA-MERGE-003."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.store_weight(self.unmerged_weight(name, self.weight_to_change(copy=False)))
            bias = self.lora_bias_after_merge(name, sign=-1)
            if bias is not None:
                self.base_layer.bias.data = bias

    def weight_to_change(self, copy: bool) -> torch.Tensor:
        """The weight values merging starts from (a copy for safe_merge: a failed NaN check leaves the layer as it
        was). A quantized layer dequantizes (quantized.py)."""
        data = self.adapted_weight().data
        return data.clone() if copy else data

    def store_weight(self, weight: torch.Tensor) -> None:
        """Make `weight` the layer's weight. A quantized layer quantizes it again (quantized.py)."""
        self.adapted_weight().data = weight

    def merged_weight(self, name: str, weight: torch.Tensor, round_delta: bool = False) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.merged_weight(self, name, weight)
        return self.add_delta(name, weight, sign=1, round_delta=round_delta)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.unmerged_weight(self, name, weight)
        return self.add_delta(name, weight, sign=-1, round_delta=True)

    def add_delta(self, name: str, weight: torch.Tensor, sign: int, round_delta: bool) -> torch.Tensor:
        """weight += sign * delta_weight(name), in place. Where the layout and dtypes allow, the same sum in one
        addmm_ (no temporary of the weight's size): 5.6x faster on full GPT-2 (merge_and_unload, r=8 on c_attn and
        c_proj: 21 ms against 119 ms, docs/benchmarks.md), and in fp32 within the `merge` tolerance of peft's
        add (LORA-MERGE-001)."""
        A, B = self.factors(name)
        operands = self.fold_operands(A, B)
        if operands is not None and weight.dtype == A.dtype == B.dtype and weight.device == A.device:
            return weight.addmm_(*operands, alpha=sign * self.scaling[name])
        delta = self.delta_weight(name)
        return weight.add_(delta.to(weight.dtype) if round_delta else delta, alpha=sign)

    def lora_bias_after_merge(self, name: str, sign: int) -> Optional[torch.Tensor]:
        """With lora_bias, merging also adds s * B.bias to the base bias. Spec: LORA-MERGE-007."""
        if not self.lora_bias[name]:
            return None
        if getattr(self.base_layer, 'bias', None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        bias = self.base_layer.bias.data
        return (bias + sign * self.lora_B[name].bias * self.scaling[name]).to(bias.dtype)  # the base keeps its dtype
