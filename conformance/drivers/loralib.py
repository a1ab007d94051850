"""The driver for microsoft/LoRA's `loralib` (0.1.2): the original LoRA layers, proven through the same door.

loralib has layers (lora.Linear, lora.Embedding) and `mark_only_lora_as_trainable`, but no injection, no
config, no PEFT files and one adapter per layer. This driver supplies the rest, the way a loralib user would:
it swaps targeted modules for loralib layers that share the base parameters (so injection is in place), keeps
the original modules to hand back on unload, and maps loralib's `<path>.lora_A` to peft's keys
(research: shared/research/third_party_libs.md §5.1). What loralib cannot do is declared, not faked:
a config field it has no equivalent for raises a ValueError naming the field.
"""

import json
from pathlib import Path

import loralib
import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "base_model.model."
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Fields this driver can honour, and the values it accepts for them.
SUPPORTED = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "task_type",
             "peft_type", "inference_mode", "base_model_name_or_path", "revision"}
DEFAULTS = {"use_rslora": False, "use_dora": False, "init_lora_weights": True, "lora_bias": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "exclude_modules": None}


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


class LoralibDriver:
    name = "loralib"
    version = getattr(loralib, "__version__", "0.1.2")
    capabilities = frozenset({"linear", "conv1d", "embedding", "dropout", "bias", "merge", "unload",
                              "save_load", "cuda"})

    # --- injection -------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> nn.Module:
        config = self._checked(config, adapter_name)
        targets = config["target_modules"]
        originals = {}
        for path, module in list(model.named_modules()):
            if path and (path in targets or any(path.endswith("." + t) for t in targets)):
                originals[path] = module
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, self._lora_layer(module, config, path))
        if not originals:
            raise ValueError(f"Target modules {sorted(targets)} not found in the base model")
        loralib.mark_only_lora_as_trainable(model, bias=config["bias"])
        model.loralib_originals, model.loralib_config = originals, config  # what unload and save need
        return model

    def _checked(self, config: dict, adapter_name: str) -> dict:
        if adapter_name != "default":
            raise ValueError("loralib holds one adapter per layer: only adapter_name='default'")
        for key, value in config.items():
            if key not in SUPPORTED and not (key in DEFAULTS and value == DEFAULTS[key]):
                raise ValueError(f"loralib has no equivalent of {key}={value!r}")
        if config.get("task_type") not in TASK_TYPES:  # it goes into adapter_config.json, which peft validates
            raise ValueError(f"task_type {config['task_type']!r} is not one of peft's: {TASK_TYPES[1:]}")
        targets = config.get("target_modules")
        if not isinstance(targets, (list, tuple, set)):
            raise ValueError(f"target_modules must be a list of names for loralib, got {targets!r}")
        return {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", **config,
                "target_modules": sorted(targets)}

    def _lora_layer(self, module: nn.Module, config: dict, path: str) -> nn.Module:
        """A loralib layer sharing `module`'s parameters (no copy)."""
        r, alpha = config["r"], config["lora_alpha"]
        device = next(module.parameters()).device
        if isinstance(module, nn.Embedding):
            layer = loralib.Embedding(module.num_embeddings, module.embedding_dim, r=r, lora_alpha=alpha,
                                      merge_weights=False, padding_idx=module.padding_idx)
        elif isinstance(module, nn.Linear) or _is_conv1d(module):
            in_features, out_features = module.weight.shape if _is_conv1d(module) else (
                module.in_features, module.out_features)
            layer = loralib.Linear(in_features, out_features, r=r, lora_alpha=alpha,
                                   lora_dropout=config["lora_dropout"], fan_in_fan_out=_is_conv1d(module),
                                   merge_weights=False, bias=module.bias is not None)
        else:
            raise ValueError(f"Target module {path} ({type(module).__name__}) is not supported by loralib")
        layer.weight = module.weight  # Conv1D stores (in, out): what fan_in_fan_out=True expects
        if getattr(module, "bias", None) is not None:
            layer.bias = module.bias
        layer.to(device=device, dtype=module.weight.dtype)  # as a user would: the model's dtype throughout
        layer.train(module.training)  # loralib's train() returns None, so not chained
        return layer

    # --- adapter tensors ---------------------------------------------------------------------------------

    def adapter_state_dict(self, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        out = {}
        bias = model.loralib_config["bias"]
        for path, module in model.named_modules():
            if isinstance(module, loralib.LoRALayer) and hasattr(module, "lora_A"):
                embedding = isinstance(module, loralib.Embedding)
                for letter in "AB":
                    suffix = f"lora_embedding_{letter}" if embedding else f"lora_{letter}.weight"
                    out[f"{PREFIX}{path}.{suffix}"] = getattr(module, f"lora_{letter}")
                if bias == "lora_only" and getattr(module, "bias", None) is not None:
                    out[f"{PREFIX}{path}.base_layer.bias"] = module.bias
        if bias == "all":
            lora_paths = {p for p, m in model.named_modules() if isinstance(m, loralib.LoRALayer)}
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    owner = name[:-5]
                    out[PREFIX + (f"{owner}.base_layer.bias" if owner in lora_paths else name)] = param
        return out

    def load_adapter_state_dict(self, model: nn.Module, state_dict: dict, adapter_name: str = "default") -> None:
        live = self.adapter_state_dict(model)
        unexpected = sorted(set(state_dict) - set(live))
        if unexpected:
            raise ValueError(f"keys loralib has no tensor for: {unexpected[:5]}")
        with torch.no_grad():
            for key, value in state_dict.items():
                live[key].copy_(value)

    # --- merge and unload --------------------------------------------------------------------------------

    def _lora_layers(self, model):
        return [m for m in model.modules() if isinstance(m, loralib.LoRALayer) and hasattr(m, "lora_A")]

    def _delta(self, layer) -> torch.Tensor:
        delta = layer.lora_B @ layer.lora_A
        transposed = isinstance(layer, loralib.Embedding) or layer.fan_in_fan_out
        return (delta.T if transposed else delta) * layer.scaling

    def merge(self, model: nn.Module) -> None:
        for layer in self._lora_layers(model):
            if not layer.merged:
                layer.weight.data += self._delta(layer)
                layer.merged = True  # loralib's own flag: its forward then skips the LoRA branch

    def unmerge(self, model: nn.Module) -> None:
        for layer in self._lora_layers(model):
            if layer.merged:
                layer.weight.data -= self._delta(layer)
                layer.merged = False

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        self.merge(model)
        return self.unload(model)

    def unload(self, model: nn.Module) -> nn.Module:
        for path, original in model.loralib_originals.items():
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, original)  # it shares the (possibly merged) weight
        del model.loralib_originals, model.loralib_config
        return model

    # --- everything loralib does not have ----------------------------------------------------------------

    def add_adapter(self, model, config, adapter_name):
        raise NotImplementedError("loralib holds one adapter per layer")

    def set_adapter(self, model, adapter_name):
        raise NotImplementedError("loralib holds one adapter per layer")

    def delete_adapter(self, model, adapter_name):
        raise NotImplementedError("loralib holds one adapter per layer")

    def disable_adapter(self, model):
        raise NotImplementedError("loralib has no way to disable an adapter")

    def trainable_parameters(self, model: nn.Module) -> tuple[int, int]:
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # --- PEFT files ----------------------------------------------------------------------------------------

    def save(self, model: nn.Module, directory: str, adapter_name: str = "default") -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict(model).items()}
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        config = model.loralib_config
        conv1d = any(_is_conv1d(m) for m in model.loralib_originals.values())
        peft_config = {"peft_type": "LORA", "r": config["r"], "lora_alpha": config["lora_alpha"],
                       "lora_dropout": config["lora_dropout"], "target_modules": config["target_modules"],
                       "bias": config["bias"], "fan_in_fan_out": conv1d, "task_type": config.get("task_type"),
                       "inference_mode": True, **DEFAULTS}
        (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True))

    def load(self, base_model: nn.Module, directory: str, adapter_name: str = "default",
             is_trainable: bool = False) -> nn.Module:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        config = {k: v for k, v in config.items() if k in SUPPORTED or k in DEFAULTS}
        model = self.wrap(base_model, config)
        self.load_adapter_state_dict(model, load_file(Path(directory) / "adapter_model.safetensors"))
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model
