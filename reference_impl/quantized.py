"""LoRA on bitsandbytes' quantized linear layers, the base of QLoRA (Dettmers et al. 2023, "QLoRA"):
`Linear4bit` (NF4 or FP4 codes in blocks of 64, the block scales optionally quantized again: double quantization)
and `Linear8bitLt` (int8 rows, one float scale per row).

The base layer keeps its quantized weight and runs its own kernel; the adapter is an ordinary LoRA beside it, in
float32 whatever the base computes in (created in the 4-bit layer's compute dtype, then upcast from half precision
as every adapter is; an 8-bit layer gives no float dtype, so its adapter is created in float32):

    y = base(x) + (B(A(dropout(x.to(A.dtype)))) * scaling).to(base(x).dtype)

Where this differs from layers.Linear, as in peft 0.21.2 (tuners/lora/bnb.py):
- each adapter's output is cast to the base output's dtype before it is added (layers.Linear adds, then casts once);
- the weight holds no float values to change: merging dequantizes it, adds the delta in float32 and quantizes the
  sum again with the layer's own settings, so a merged layer computes with the quantized sum (within a
  quantization step of the unmerged output) and unmerging quantizes a third time: neither is exact.
Parameter counts count each byte of a packed 4-bit weight as two parameters, as peft does.
Spec: QLORA-*. bitsandbytes is imported only once a model holds one of these layers.
"""

import torch
from torch import nn

from . import dora
from .layers import Linear

QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit or Linear8bitLt (by name: bitsandbytes need not be installed to ask)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in QUANTIZED_LINEARS


def parameter_count(param: torch.Tensor) -> int:
    """The parameters a tensor stands for: a Params4bit stores two 4-bit values per byte of its storage dtype.
    Spec: QLORA-PARAM-001."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer computes with, (out, in): 4-bit in the dtype it was quantized from,
    8-bit in float32."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB  # set by the first forward, else not
    return bnbf.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def requantized(layer: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    """`dense` quantized as the layer's weight is (same codes, block size and storage), on the layer's device."""
    import bitsandbytes as bnb

    old = layer.weight
    if type(old).__name__ == "Params4bit":
        new = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=old.module)
    else:
        new = bnb.nn.Int8Params(dense.cpu(), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
    return new.to(old.device)  # moving a float Params4bit / Int8Params to a device quantizes it


class QuantizedLinear(Linear):
    """LoRA on a bitsandbytes Linear4bit or Linear8bitLt. Spec: QLORA-FWD-001, QLORA-MERGE-001."""

    def feature_sizes(self) -> tuple[int, int]:
        return self.base_layer.in_features, self.base_layer.out_features  # the stored weight is packed

    def adapter_dtype(self):
        """4-bit: the compute dtype (so a bf16 compute dtype rounds the initial values before the float32 upcast);
        8-bit: none, the adapter stays as created, float32. Spec: QLORA-INIT-001."""
        return getattr(self.base_layer, "compute_dtype", None)

    def dense_weight(self) -> torch.Tensor:
        return dequantized(self.base_layer)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The adapter's term in float32, cast to the base output's dtype, then added (DoRA: the sum cast)."""
        if name in self.lora_magnitude_vector:
            return dora.adapted_output(self, name, x, result).to(result.dtype)
        lora = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
        return result + lora.to(result.dtype)

    def weight_to_change(self, copy: bool) -> torch.Tensor:
        """Merging dequantizes (always a fresh tensor). Spec: QLORA-MERGE-001."""
        return self.dense_weight()

    def store_weight(self, weight: torch.Tensor) -> None:
        """Quantize the merged (or unmerged: QLORA-MERGE-002) float weight again with the layer's settings."""
        self.base_layer.weight = requantized(self.base_layer, weight)
        self.forget_int8_state()

    def add_delta(self, name: str, weight: torch.Tensor, sign: int, round_delta: bool) -> torch.Tensor:
        """W ± s B A as a new float32 tensor. Not Merging's fused addmm_: the sum is quantized again, and another
        rounding of it can move a weight into the next quantization step."""
        delta = self.delta_weight(name)
        return weight + delta if sign > 0 else weight - delta

    def forget_int8_state(self) -> None:
        """Linear8bitLt caches the old weight's int8 matrices and scales in `state`; its next forward reloads them
        from the new weight."""
        state = getattr(self.base_layer, "state", None)
        if state is not None:
            state.reset_grads()


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """What QLoRA recipes do to a transformers model loaded in 4 or 8 bits before wrapping it, as peft's
    prepare_model_for_kbit_training does it (peft 0.21.2, utils/other.py), so that training through the reference
    computes what training through peft computes:
    - every parameter frozen;
    - every float16 / bfloat16 parameter except packed 4-bit weights cast to float32 (norms, embeddings, lm_head:
      the hidden states then flow in float32 and each quantized layer casts to its compute dtype and back);
    - with `gradient_checkpointing`: the input embeddings' output made to require grad, then reentrant
      checkpointing turned on. Checkpointing re-runs each block in the backward pass, and the reentrant kind passes
      no gradient into a block whose inputs need none: without the first step the adapters inside get none.
    Spec: QLORA-PREP-001."""
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()
    if gradient_checkpointing:
        model.enable_input_require_grads()
        # peft passes no use_reentrant, so torch's default applies: True (with a warning), said here explicitly.
        # transformers 5 renamed the method (the old name warns); 4.x has only the old one.
        kind = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kind)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kind)
    return model
