"""A base for drivers of libraries that have LoRA layers but no injection and no PEFT files (loralib,
torchtune): swap targeted modules for the library's layers, sharing the base parameters (so injection is in
place), keep the originals to hand back on unload, and name the factors as peft does.

A subclass says how to build its layer, where its factors are, what its delta weight is, and how it marks a
layer merged. A config field the library has no equivalent for raises a ValueError naming the field.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reference_impl import peft_format
from reference_impl.peft_format import PREFIX, is_conv1d  # noqa: F401 (the drivers import them from here)

TASK_TYPES = (None, *peft_format.TASK_TYPES)
# Fields a swap driver always accepts, and fields it accepts only at peft's default value.
ACCEPTED = {"r", "lora_alpha", "target_modules", "task_type", "peft_type", "inference_mode",
            "base_model_name_or_path", "revision", "fan_in_fan_out"}
DEFAULTS = {"lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "lora_bias": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None}


class SwapDriver:
    name = version = ""
    capabilities: frozenset = frozenset()
    honoured: set = set()  # DEFAULTS fields this library can take other values for

    # --- what a subclass provides -----------------------------------------------------------------------------

    def make_layer(self, module: nn.Module, config: dict, path: str) -> nn.Module: ...

    def factors(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """The layer's LoRA tensors by peft key suffix ("lora_A.weight", "lora_embedding_A", ...)."""

    def delta(self, layer: nn.Module) -> torch.Tensor:
        """s * B A in the layout of the layer's stored weight."""

    def set_merged(self, layer: nn.Module, merged: bool) -> None: ...

    def freeze(self, model: nn.Module, config: dict) -> None: ...

    def peft_config(self, model: nn.Module) -> dict:
        """The adapter_config.json this library's users would write."""

    # --- injection -----------------------------------------------------------------------------------------

    def supports(self, model: nn.Module, config: dict):
        """The driver's scope (conformance.api): the config fields this library has an equivalent for."""
        try:
            self.checked(config, "default")
        except ValueError as error:
            return str(error)
        return None

    def checked(self, config: dict, adapter_name: str) -> dict:
        if adapter_name != "default":
            raise ValueError(f"{self.name} holds one adapter per layer: only adapter_name='default'")
        for key, value in config.items():
            if key not in ACCEPTED and key not in self.honoured and not (key in DEFAULTS and value == DEFAULTS[key]):
                raise ValueError(f"{self.name} has no equivalent of {key}={value!r}")
        if config.get("task_type") not in TASK_TYPES:  # it goes into adapter_config.json, which peft validates
            raise ValueError(f"task_type {config['task_type']!r} is not one of peft's: {TASK_TYPES[1:]}")
        targets = config.get("target_modules")
        if not isinstance(targets, (list, tuple, set)):
            raise ValueError(f"target_modules must be a list of names for {self.name}, got {targets!r}")
        return {"r": 8, "lora_alpha": 8, "task_type": None, **DEFAULTS, **config, "target_modules": sorted(targets)}

    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> nn.Module:
        config = self.checked(config, adapter_name)
        targets = config["target_modules"]
        originals = {}
        for path, module in list(model.named_modules()):
            if path and (path in targets or any(path.endswith("." + t) for t in targets)):
                layer = self.make_layer(module, config, path)
                self.take_base(layer, module)
                layer.train(module.training)
                originals[path] = module
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
        if not originals:
            raise ValueError(f"Target modules {targets} not found in the base model")
        model.swap_originals, model.swap_config = originals, config  # what unload and save need
        self.freeze(model, config)
        return model

    def take_base(self, layer: nn.Module, module: nn.Module) -> None:
        """The new layer computes with the base module's weight and bias: shared, not copied."""
        layer.weight = module.weight
        if getattr(module, "bias", None) is not None:
            layer.bias = module.bias
        layer.to(device=module.weight.device, dtype=module.weight.dtype)  # as a user would: one dtype

    def lora_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {path: model.get_submodule(path) for path in model.swap_originals}

    # --- adapter tensors -----------------------------------------------------------------------------------

    def adapter_state_dict(self, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        out, layers = {}, self.lora_layers(model)
        for path, layer in layers.items():
            out.update({f"{PREFIX}{path}.{suffix}": p for suffix, p in self.factors(layer).items()})
            if model.swap_config["bias"] == "lora_only" and getattr(layer, "bias", None) is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = layer.bias
        if model.swap_config["bias"] == "all":
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    owner = name[:-5]
                    out[PREFIX + (f"{owner}.base_layer.bias" if owner in layers else name)] = param
        return out

    def load_adapter_state_dict(self, model: nn.Module, state_dict: dict, adapter_name: str = "default") -> None:
        live = self.adapter_state_dict(model)
        unexpected = sorted(set(state_dict) - set(live))
        if unexpected:
            raise ValueError(f"keys {self.name} has no tensor for: {unexpected[:5]}")
        with torch.no_grad():
            for key, value in state_dict.items():
                live[key].copy_(value)

    # --- merge and unload ----------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> None:
        for layer in self.lora_layers(model).values():
            if not getattr(layer, "swap_merged", False):
                layer.weight.data += self.delta(layer)
                layer.swap_merged = True
                self.set_merged(layer, True)

    def unmerge(self, model: nn.Module) -> None:
        for layer in self.lora_layers(model).values():
            if getattr(layer, "swap_merged", False):
                layer.weight.data -= self.delta(layer)
                layer.swap_merged = False
                self.set_merged(layer, False)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        self.merge(model)
        return self.unload(model)

    def unload(self, model: nn.Module) -> nn.Module:
        for path, original in model.swap_originals.items():
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, original)  # it shares the (possibly merged) weight
        del model.swap_originals, model.swap_config
        return model

    def trainable_parameters(self, model: nn.Module) -> tuple[int, int]:
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # --- what these libraries do not have ------------------------------------------------------------------

    def add_adapter(self, model, config, adapter_name):
        raise NotImplementedError(f"{self.name} holds one adapter per layer")

    def set_adapter(self, model, adapter_name):
        raise NotImplementedError(f"{self.name} holds one adapter per layer")

    def delete_adapter(self, model, adapter_name):
        raise NotImplementedError(f"{self.name} holds one adapter per layer")

    def disable_adapter(self, model):
        raise NotImplementedError(f"{self.name} has no way to disable an adapter")

    # --- PEFT files ----------------------------------------------------------------------------------------

    def save(self, model: nn.Module, directory: str, adapter_name: str = "default") -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict(model).items()}
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {"peft_type": "LORA", **self.peft_config(model)}
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def load(self, base_model: nn.Module, directory: str, adapter_name: str = "default",
             is_trainable: bool = False) -> nn.Module:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        config = {k: v for k, v in config.items() if k in ACCEPTED or k in DEFAULTS}
        model = self.wrap(base_model, config)
        self.load_adapter_state_dict(model, load_file(Path(directory) / "adapter_model.safetensors"))
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model
