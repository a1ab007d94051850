"""The driver for torchtune (0.6.1): its LoRALinear swapped in for any nn.Linear (the "generic" mode).

torchtune has LoRALinear, disable_adapter, set_trainable_params and get_merged_lora_ckpt, but no injection by
name and a PEFT writer only for its Llama family (tests/meta/test_torchtune_llama.py drives that one); the generic
keys map one to one: `<path>.lora_a.weight` is peft's `<path>.lora_A.weight` (third_party_libs.md §5.2).
Pins: torchao==0.17.0 (0.18 removed torchao.dtypes.nf4tensor, which torchtune 0.6.1 imports).
"""

import math

import torch
import torchtune
from torch import nn
from torchtune.modules.peft import LoRALinear, disable_adapter, get_adapter_params, get_merged_lora_ckpt
from torchtune.modules.peft import set_trainable_params

from .swap import PREFIX, SwapDriver


def peft_to_tune_adapter_weights(state_dict: dict, num_heads: int, num_kv_heads: int, dim: int) -> dict:
    """The inverse of torchtune's tune_to_peft_adapter_weights, which torchtune does not ship: peft's Llama
    names back to torchtune's, and q/k lora_B rows from HF's half-split RoPE layout back to Meta's interleaved
    one (third_party_libs.md §5.2)."""
    from torchtune.models.convert_weights import _FROM_HF, get_mapped_key

    head_dim = dim // num_heads
    names = {hf.replace(".weight", f".{peft}.weight"): tune.replace(".weight", f".{ours}.weight")
             for hf, tune in _FROM_HF.items() if tune for peft, ours in (("lora_A", "lora_a"), ("lora_B", "lora_b"))}
    out = {}
    for key, value in state_dict.items():
        name = get_mapped_key(key.removeprefix(PREFIX), names)
        heads = num_heads if ".q_proj." in name else num_kv_heads if ".k_proj." in name else None
        if heads and ".lora_b." in name:
            rank = value.shape[-1]
            value = value.view(heads, 2, head_dim // 2, rank).transpose(1, 2).reshape(heads * head_dim, rank)
        out[name] = value
    return out


class TorchtuneDriver(SwapDriver):
    name = "torchtune"
    version = torchtune.__version__
    capabilities = frozenset({"autograd", "linear", "dropout", "merge", "unload", "save_load", "disable", "cuda"})
    honoured = {"lora_dropout"}

    def make_layer(self, module: nn.Module, config: dict, path: str) -> nn.Module:
        if type(module) is not nn.Linear:
            raise ValueError(f"Target module {path} ({type(module).__name__}) is not supported: torchtune's "
                             "LoRALinear replaces nn.Linear only")
        return LoRALinear(module.in_features, module.out_features, rank=config["r"], alpha=config["lora_alpha"],
                          dropout=config["lora_dropout"], use_bias=module.bias is not None)

    def factors(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": layer.lora_a.weight, "lora_B.weight": layer.lora_b.weight}

    def delta(self, layer: nn.Module) -> torch.Tensor:
        return (layer.alpha / layer.rank) * layer.lora_b.weight @ layer.lora_a.weight

    def set_merged(self, layer: nn.Module, merged: bool) -> None:
        layer.disabled = merged  # LoRALinear has no merged state: with the delta in the weight, skip the branch

    def freeze(self, model: nn.Module, config: dict) -> None:
        set_trainable_params(model, get_adapter_params(model))

    def disable_adapter(self, model: nn.Module):
        return disable_adapter(model)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """torchtune's own merge: get_merged_lora_ckpt folds (alpha/rank) B A into each weight."""
        config = model.swap_config
        merged = get_merged_lora_ckpt(dict(model.state_dict()), rank=config["r"], alpha=config["lora_alpha"])
        model = self.unload(model)
        with torch.no_grad():
            for name, tensor in model.state_dict(keep_vars=True).items():
                tensor.copy_(merged[name])
        return model

    def peft_config(self, model: nn.Module) -> dict:
        """What torchtune's tune_to_peft_adapter_config writes: these four keys and no others."""
        config = model.swap_config
        return {"r": config["r"], "lora_alpha": config["lora_alpha"], "target_modules": config["target_modules"]}


class TorchtuneQLoRADriver(TorchtuneDriver):
    """torchtune's QLoRA: LoRALinear(quantize_base=True) in place of each bitsandbytes NF4 Linear4bit target. The
    base weight is quantized again by torchao's NF4 (to_nf4 of the float weight bitsandbytes computes with: blocks
    of 64, the block scales quantized to int8 in blocks of up to 256), so the base computes a little otherwise
    than bitsandbytes' and the suite compares what the adapter adds (`base_quantizer`). Float32 runs only:
    torchtune computes the adapter in the input's dtype, peft in float32. No merge: torchtune merges only
    unquantized checkpoints (get_merged_lora_ckpt)."""

    name = "torchtune-qlora"
    capabilities = frozenset({"autograd", "bnb_4bit", "dropout", "save_load", "disable", "unload"})
    base_quantizer = "torchao NF4 (torchtune LoRALinear(quantize_base=True))"

    def supports(self, model: nn.Module, config: dict):
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes != {torch.float32}:
            return f"{self.name} runs float32 bases only (torchtune computes the adapter in the input's dtype)"
        targets = config.get("target_modules") or ()
        for path, module in model.named_modules():
            if path.rpartition(".")[2] in targets and getattr(module.weight, "quant_type", "nf4") != "nf4":
                return f"{self.name} quantizes with NF4 only, {path} is {module.weight.quant_type}"
        return super().supports(model, config)

    def make_layer(self, module: nn.Module, config: dict, path: str) -> nn.Module:
        from torchao.dtypes.nf4tensor import to_nf4

        from reference_impl.quantized import dequantized

        if type(module).__name__ != "Linear4bit":
            raise ValueError(f"Target module {path} ({type(module).__name__}) is not supported: {self.name} "
                             "replaces bitsandbytes Linear4bit layers")
        dense = dequantized(module).float()
        blocks = dense.numel() // 64
        scales = math.gcd(blocks, 256)  # torchao needs the block count divisible by the scale block size
        layer = LoRALinear(module.in_features, module.out_features, rank=config["r"], alpha=config["lora_alpha"],
                           dropout=config["lora_dropout"], use_bias=module.bias is not None, quantize_base=True,
                           block_size=64, scaler_block_size=scales)
        layer.weight = nn.Parameter(to_nf4(dense, block_size=64, scaler_block_size=scales), requires_grad=False)
        return layer

    def trainable_parameters(self, model: nn.Module) -> tuple[int, int]:
        """torchtune has no counter; the driver counts as peft does: the bitsandbytes layers left in the model hold
        packed 4-bit weights (two values per byte), torchao's NF4Tensor reports its unpacked numel."""
        from reference_impl.quantized import parameter_count

        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(parameter_count(p) for p in params)

    def take_base(self, layer: nn.Module, module: nn.Module) -> None:
        if module.bias is not None:
            layer.bias = module.bias
        layer.to(device=module.weight.device)
