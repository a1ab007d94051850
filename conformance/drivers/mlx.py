"""The driver for mlx-lm (0.32.2, Apple's MLX, run on the CPU): its LoRALinear computes inside a torch model.

mlx-lm stores the factors transposed against peft (lora_a (in, r), lora_b (r, out)) and an absolute `scale`
instead of lora_alpha; its adapter files are `adapters.safetensors` plus an mlx `adapter_config.json`
(third_party_libs.md §5.3). Each targeted nn.Linear gets a bridge that runs mlx-lm's layer on the input
(copied to MLX and back), so the torch model around it still runs; the torch base layer is kept in place.
What MLX cannot do inside torch is declared, not faked: no torch autograd (so no gradient checks), no CUDA,
and dropout draws MLX's random numbers, not torch's. `save` writes mlx-lm's own files and converts them
(`mlx_to_peft`); `load` converts the other way (`peft_to_mlx`), the two mappings under test.
"""

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import torch
from mlx_lm.tuner.lora import LoRALinear
from safetensors.torch import load_file, save_file
from torch import nn

from reference_impl import peft_format

from .swap import PREFIX, SwapDriver

try:
    from importlib.metadata import version as _version
    VERSION = _version("mlx-lm")
except Exception:  # pragma: no cover
    VERSION = "unknown"


def _to_mx(tensor: torch.Tensor) -> mx.array:
    return mx.array(tensor.detach().float().cpu().numpy())


def _to_torch(array: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(array.astype(mx.float32)))


class MlxBridge(nn.Module):
    """A torch module that runs mlx-lm's LoRALinear; `base_layer` is the original nn.Linear, untouched."""

    def __init__(self, base_layer: nn.Linear, r: int, scale: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        linear = mlx_nn.Linear(base_layer.in_features, base_layer.out_features, bias=base_layer.bias is not None)
        linear.weight = _to_mx(base_layer.weight)
        if base_layer.bias is not None:
            linear.bias = _to_mx(base_layer.bias)
        self.mlx = LoRALinear.from_base(linear, r=r, dropout=dropout, scale=scale)
        self.merged = False

    @property
    def weight(self):  # what the swap driver's merge arithmetic reads and writes
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        self.mlx.train(self.training)
        return _to_torch(self.mlx(_to_mx(x))).to(device=x.device, dtype=x.dtype)


class MlxDriver(SwapDriver):
    name = "mlx"
    version = VERSION
    capabilities = frozenset({"linear", "rslora", "merge", "unload", "save_load"})
    honoured = {"lora_dropout", "use_rslora"}

    def supports(self, model: nn.Module, config: dict):
        if any(p.is_meta for p in model.parameters()):
            return "mlx-lm copies the base weights into MLX arrays, and a model on the meta device has none"
        return super().supports(model, config)

    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> nn.Module:
        config = self.checked(config, adapter_name)
        targets, originals = config["target_modules"], {}
        r, alpha = config["r"], config["lora_alpha"]
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer (mlx-lm's scale is lora_alpha / r), got {r!r}")
        scale = peft_format.scaling(alpha, r, config["use_rslora"])
        for path, module in list(model.named_modules()):
            if path and (path in targets or any(path.endswith("." + t) for t in targets)):
                if type(module) is not nn.Linear:
                    raise ValueError(f"Target module {path} ({type(module).__name__}) is not supported: mlx-lm's "
                                     "LoRALinear wraps linear layers only")
                originals[path] = module
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, MlxBridge(module, r, scale, config["lora_dropout"]))
        if not originals:
            raise ValueError(f"Target modules {targets} not found in the base model")
        model.swap_originals, model.swap_config = originals, config
        model.requires_grad_(False)  # MLX trains its own arrays; nothing in torch is trainable
        return model

    def adapter_state_dict(self, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Copies, not live tensors (the values live in MLX), transposed to peft's (r, in) and (out, r)."""
        out = {}
        for path, bridge in self.lora_layers(model).items():
            out[f"{PREFIX}{path}.lora_A.weight"] = _to_torch(bridge.mlx.lora_a).T.contiguous()
            out[f"{PREFIX}{path}.lora_B.weight"] = _to_torch(bridge.mlx.lora_b).T.contiguous()
        return out

    def load_adapter_state_dict(self, model: nn.Module, state_dict: dict, adapter_name: str = "default") -> None:
        layers = self.lora_layers(model)
        for key, value in state_dict.items():
            path, _, tensor = key.removeprefix(PREFIX).rpartition(".lora_")
            if path not in layers:
                raise ValueError(f"key {key}: no mlx LoRA layer at {path!r}")
            name = {"A.weight": "lora_a", "B.weight": "lora_b"}.get(tensor)
            if name is None:
                raise ValueError(f"key {key}: mlx-lm has no such tensor")
            current = getattr(layers[path].mlx, name)
            if tuple(value.T.shape) != tuple(current.shape):
                raise ValueError(f"key {key}: shape {tuple(value.shape)}, expected {tuple(current.shape[::-1])}")
            setattr(layers[path].mlx, name, _to_mx(value.T))

    def delta(self, bridge: MlxBridge) -> torch.Tensor:
        """mlx-lm's own fuse(): weight + (scale * lora_b.T) @ lora_a.T."""
        return _to_torch(bridge.mlx.fuse().weight).to(bridge.weight.dtype) - bridge.weight.detach().cpu()

    def set_merged(self, bridge: MlxBridge, merged: bool) -> None:
        bridge.merged = merged

    def unmerge(self, model: nn.Module) -> None:
        for bridge in self.lora_layers(model).values():
            if bridge.merged:
                delta = (bridge.mlx.scale * _to_torch(bridge.mlx.lora_b).T) @ _to_torch(bridge.mlx.lora_a).T
                bridge.weight.data -= delta.to(bridge.weight.dtype)
                bridge.merged = bridge.swap_merged = False

    def trainable_parameters(self, model: nn.Module) -> tuple[int, int]:
        """The LoRA arrays train in MLX (none after a frozen load); counted as peft counts its adapters."""
        lora = sum(t.numel() for t in self.adapter_state_dict(model).values())
        return (0 if getattr(model, "mlx_frozen", False) else lora), sum(p.numel() for p in model.parameters()) + lora

    # --- files: mlx-lm's own, converted ----------------------------------------------------------------------

    def save(self, model: nn.Module, directory: str, adapter_name: str = "default") -> None:
        with tempfile.TemporaryDirectory() as native:
            self.save_native(model, native)
            mlx_to_peft(native, directory)

    def save_native(self, model: nn.Module, directory: str) -> None:
        """What mlx-lm writes: adapters.safetensors (`<path>.lora_a` (in, r), `.lora_b` (r, out)) and its config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for path, bridge in self.lora_layers(model).items():
            arrays[f"{path}.lora_a"], arrays[f"{path}.lora_b"] = bridge.mlx.lora_a, bridge.mlx.lora_b
        mx.save_safetensors(str(directory / "adapters.safetensors"), arrays)  # as mlx-lm saves adapters
        config = model.swap_config
        scales = {bridge.mlx.scale for bridge in self.lora_layers(model).values()}
        (directory / "adapter_config.json").write_text(json.dumps({
            "fine_tune_type": "lora", "lora_parameters": {"rank": config["r"], "scale": scales.pop(),
                                                          "dropout": config["lora_dropout"],
                                                          "keys": config["target_modules"]}}, indent=2))

    def load(self, base_model: nn.Module, directory: str, adapter_name: str = "default",
             is_trainable: bool = False) -> nn.Module:
        with tempfile.TemporaryDirectory() as native:
            peft_to_mlx(directory, native)
            parameters = json.loads((Path(native) / "adapter_config.json").read_text())["lora_parameters"]
            rank, scale = parameters["rank"], parameters["scale"]
            model = self.wrap(base_model, {"r": rank, "lora_alpha": scale * rank, "target_modules": parameters["keys"],
                                           "lora_dropout": parameters["dropout"]})
            arrays = mx.load(str(Path(native) / "adapters.safetensors"))
        layers = self.lora_layers(model)
        unknown = sorted(k for k in arrays if k.rpartition(".lora_")[0] not in layers)
        if unknown:  # mlx-lm's load_adapters refuses weights for modules it did not wrap
            raise ValueError(f"{directory}: tensors for modules that are not adapted: {unknown[:4]}")
        for path, bridge in layers.items():
            for letter in "ab":
                array, current = arrays[f"{path}.lora_{letter}"], getattr(bridge.mlx, f"lora_{letter}")
                if array.shape != current.shape:
                    raise ValueError(f"{directory}: lora_{letter} of {path} has shape {array.shape}, expected "
                                     f"{current.shape}")
                setattr(bridge.mlx, f"lora_{letter}", array)
        model.mlx_frozen = not is_trainable
        model.eval()
        return model


def mlx_to_peft(native: str, directory: str) -> None:
    """mlx-lm adapter files -> a PEFT directory: factors transposed, lora_alpha = scale * rank."""
    config = json.loads((Path(native) / "adapter_config.json").read_text())["lora_parameters"]
    tensors = {}
    for key, array in mx.load(str(Path(native) / "adapters.safetensors")).items():
        path, _, letter = key.rpartition(".lora_")
        tensors[f"{PREFIX}{path}.lora_{letter.upper()}.weight"] = _to_torch(array).T.contiguous()
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(tensors, Path(directory) / "adapter_model.safetensors", metadata={"format": "pt"})
    (Path(directory) / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config["rank"], "lora_alpha": config["scale"] * config["rank"],
        "lora_dropout": config["dropout"], "target_modules": config["keys"], "use_rslora": False}, indent=2))


def peft_to_mlx(directory: str, native: str) -> None:
    """A PEFT directory -> mlx-lm adapter files: scale = lora_alpha / r (alpha / sqrt(r) with rsLoRA). A peft
    feature mlx-lm cannot express (patterns, DoRA, bias, ...) is refused by name."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{key} has no mlx-lm equivalent: one rank and scale per adapter")
    for key in ("use_dora", "lora_bias", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{key}={config[key]!r} has no mlx-lm equivalent")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r} has no mlx-lm equivalent")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    scale = peft_format.scaling(alpha, r, config.get("use_rslora", False))
    tensors = load_file(Path(directory) / "adapter_model.safetensors")
    arrays = {}
    for key, tensor in tensors.items():
        path, _, rest = key.removeprefix(PREFIX).rpartition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            raise ValueError(f"{key}: mlx-lm has no such tensor")
        arrays[f"{path}.lora_{rest[0].lower()}"] = _to_mx(tensor.T.contiguous())
    Path(native).mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(Path(native) / "adapters.safetensors"), arrays)
    (Path(native) / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "lora_parameters": {"rank": r, "scale": scale,
                                                      "dropout": config.get("lora_dropout", 0.0),
                                                      "keys": config.get("target_modules")}}))
