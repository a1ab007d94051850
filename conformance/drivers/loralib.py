"""The driver for microsoft/LoRA's `loralib` (0.1.2): the original LoRA layers, proven through the same door.

loralib has layers (lora.Linear, lora.Embedding) and `mark_only_lora_as_trainable`, but no injection, no config,
no PEFT files and one adapter per layer; conformance.drivers.swap supplies those the way a loralib user would.
loralib's `<path>.lora_A` is peft's `<path>.lora_A.weight` (shared/research/third_party_libs.md §5.1).
"""

import loralib
import torch
from torch import nn

from .swap import SwapDriver, is_conv1d


class LoralibDriver(SwapDriver):
    name = "loralib"
    version = getattr(loralib, "__version__", "0.1.2")
    capabilities = frozenset({"autograd", "linear", "conv1d", "embedding", "dropout", "bias", "merge", "unload",
                              "save_load", "cuda"})
    honoured = {"lora_dropout", "bias"}

    def make_layer(self, module: nn.Module, config: dict, path: str) -> nn.Module:
        r, alpha = config["r"], config["lora_alpha"]
        if isinstance(module, nn.Embedding):
            return loralib.Embedding(module.num_embeddings, module.embedding_dim, r=r, lora_alpha=alpha,
                                     merge_weights=False, padding_idx=module.padding_idx)
        if isinstance(module, nn.Linear) or is_conv1d(module):
            # GPT-2's Conv1D stores its weight (in, out), which is what fan_in_fan_out=True expects
            in_features, out_features = module.weight.shape if is_conv1d(module) else (
                module.in_features, module.out_features)
            return loralib.Linear(in_features, out_features, r=r, lora_alpha=alpha,
                                  lora_dropout=config["lora_dropout"], fan_in_fan_out=is_conv1d(module),
                                  merge_weights=False, bias=module.bias is not None)
        raise ValueError(f"Target module {path} ({type(module).__name__}) is not supported by loralib")

    def factors(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        if isinstance(layer, loralib.Embedding):
            return {"lora_embedding_A": layer.lora_A, "lora_embedding_B": layer.lora_B}
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}

    def delta(self, layer: nn.Module) -> torch.Tensor:
        delta = layer.lora_B @ layer.lora_A
        transposed = isinstance(layer, loralib.Embedding) or layer.fan_in_fan_out
        return (delta.T if transposed else delta) * layer.scaling

    def set_merged(self, layer: nn.Module, merged: bool) -> None:
        layer.merged = merged  # loralib's own flag: its forward then skips the LoRA branch

    def freeze(self, model: nn.Module, config: dict) -> None:
        loralib.mark_only_lora_as_trainable(model, bias=config["bias"])

    def peft_config(self, model: nn.Module) -> dict:
        """loralib writes no config: the LoRA fields peft needs, from what the driver was given."""
        config = model.swap_config
        conv1d = any(is_conv1d(m) for m in model.swap_originals.values())
        return {key: config[key] for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                                             "task_type", "use_rslora", "use_dora", "init_lora_weights",
                                             "lora_bias", "modules_to_save", "layers_to_transform",
                                             "layers_pattern", "rank_pattern", "alpha_pattern")} | {
            "fan_in_fan_out": conv1d, "inference_mode": True}
