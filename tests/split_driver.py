"""splitlora: a small LoRA library of the kind real users plug in, and its driver.

It adapts GPT-2's c_attn and c_fc (not c_proj, nor anything else), keeps c_attn's adapter split in three (q, k and
v, each with its own A, drawn separately, and its third of B: what a library with separate attention projections
does), cannot unload, disable or hold a second adapter, and computes in float32 only. Its driver declares that
scope (`supports`) and that layout (`layout`), and the suite gives it "pass" or "not applicable" everywhere but
where it really departs from peft: three copies of A are three times as many trainable A parameters
(LORA-PARAM-001, -002, GOLD-008), and its adapter_config.json holds only the fields it knows (LORA-SER-005).
docs/plug-in-your-library.md walks through it.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conformance.api import NoExactMapping

SUPPORTED = ("c_attn", "c_fc")
PARTS = {"c_attn": ("q", "k", "v"), "c_fc": ("",)}  # c_attn's output is [q | k | v]
from reference_impl import peft_format
from reference_impl.peft_format import PREFIX


# --- the library ------------------------------------------------------------------------------------------------

class Adapter(nn.Module):
    """base(x) + concat over parts of (dropout(x) A_p^T) B_p^T * alpha / r, on a GPT-2 Conv1D (weight (in, out))."""

    def __init__(self, base_layer: nn.Module, parts: tuple, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer, self.parts, self.scaling, self.merged = base_layer, parts, alpha / r, False
        in_features, out_features = base_layer.weight.shape
        device = base_layer.weight.device
        self.lora_a = nn.ParameterDict({p or "a": nn.Parameter(_kaiming(r, in_features, device)) for p in parts})
        self.lora_b = nn.ParameterDict({p or "b": nn.Parameter(torch.zeros(out_features // len(parts), r,
                                                                           device=device)) for p in parts})
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def factors(self):
        return [(self.lora_a[p or "a"], self.lora_b[p or "b"]) for p in self.parts]

    def delta(self) -> torch.Tensor:
        """s * B A as (out, in), the parts stacked."""
        return torch.cat([b @ a for a, b in self.factors()]) * self.scaling

    def forward(self, x):
        out = self.base_layer(x)
        if self.merged:
            return out
        h = self.dropout(x).to(self.lora_a[self.parts[0] or "a"].dtype)
        lora = torch.cat([(h @ a.T) @ b.T for a, b in self.factors()], dim=-1) * self.scaling
        return (out + lora).to(out.dtype)


def _kaiming(rows: int, columns: int, device) -> torch.Tensor:
    """A fresh A: each part draws its own, so a new c_attn adapter has three different A (no peft form)."""
    a = torch.empty(rows, columns, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def _matches(name: str, targets) -> bool:
    return name in targets or any(name.endswith("." + t) for t in targets)


def _own_keys(path: str, parts: tuple) -> list[tuple[str, str]]:
    """(A key, B key) per part, as splitlora names them."""
    return [(f"{path}.{p}.lora_a" if p else f"{path}.lora_a", f"{path}.{p}.lora_b" if p else f"{path}.lora_b")
            for p in parts]


# --- the driver -------------------------------------------------------------------------------------------------

class SplitLayout:
    """peft's `<path>.lora_A.weight` / `.lora_B.weight` <-> splitlora's per-part `lora_a` / `lora_b`."""

    def to_driver(self, model, tensors: dict) -> dict:
        out = {}
        for key, value in tensors.items():
            path, _, suffix = key.removeprefix(PREFIX).rpartition(".lora_")
            parts = PARTS.get(path.rsplit(".", 1)[-1])
            if parts is None or suffix not in ("A.weight", "B.weight"):
                out[key] = value  # no mapping: the driver refuses it when loading
                continue
            pieces = [value] * len(parts) if suffix == "A.weight" else value.chunk(len(parts))
            for (a_key, b_key), piece in zip(_own_keys(path, parts), pieces):
                out[a_key if suffix == "A.weight" else b_key] = piece
        return out

    def to_peft(self, model, tensors: dict) -> dict:
        out, paths = {}, {k.rsplit(".lora_", 1)[0] for k in tensors}
        for path in sorted({p.removesuffix(".q").removesuffix(".k").removesuffix(".v") for p in paths}):
            parts = PARTS[path.rsplit(".", 1)[-1]]
            keys = _own_keys(path, parts)
            a_copies = [tensors[a] for a, _ in keys]
            if not all(torch.equal(a_copies[0], a) for a in a_copies[1:]):
                raise NoExactMapping(f"{path}: the q, k and v copies of lora_A differ; peft's c_attn has one A")
            out[f"{PREFIX}{path}.lora_A.weight"] = a_copies[0]
            out[f"{PREFIX}{path}.lora_B.weight"] = torch.cat([tensors[b] for _, b in keys])
        return out


ACCEPTED = {"target_modules": None, "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": True,
            "fan_in_fan_out": True, "bias": "none", "task_type": None, "peft_type": "LORA", "inference_mode": False}
TASK_TYPES = (None, *peft_format.TASK_TYPES)


class SplitLoraDriver:
    name, version = "splitlora", "1.0"
    capabilities = frozenset({"conv1d", "autograd", "dropout", "merge", "save_load"})
    layout = SplitLayout()

    def supports(self, model: nn.Module, config: dict):
        """None when splitlora can run `config` on `model`, else why not."""
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {torch.float32}:
            return f"splitlora computes in float32 only, not {', '.join(sorted(str(d) for d in dtypes))}"
        targets = config.get("target_modules") or ["c_attn"]
        if not isinstance(targets, list):
            return "splitlora takes target_modules as a list of names"
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name and _matches(name, targets)}
        if leaves - set(SUPPORTED):
            return f"splitlora adapts {' and '.join(SUPPORTED)} only, not {', '.join(sorted(leaves - set(SUPPORTED)))}"
        return None

    def _checked(self, config: dict, adapter_name: str) -> dict:
        if adapter_name != "default":
            raise NotImplementedError("splitlora holds one adapter")
        for key, value in config.items():
            if key not in ACCEPTED:
                raise ValueError(f"splitlora has no {key!r} (got {value!r})")
        config = {**ACCEPTED, **config}
        if not isinstance(config["r"], int) or config["r"] <= 0:
            raise ValueError(f"r must be a positive integer, got {config['r']!r}")
        if not 0 <= config["lora_dropout"] < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {config['lora_dropout']!r}")
        for key in ("init_lora_weights", "bias"):
            if config[key] != ACCEPTED[key]:
                raise ValueError(f"splitlora supports only {key}={ACCEPTED[key]!r}, got {config[key]!r}")
        if config["task_type"] not in TASK_TYPES:
            raise ValueError(f"task_type {config['task_type']!r} is not one of peft's")
        config["target_modules"] = sorted(config["target_modules"] or ["c_attn"])
        return config

    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> nn.Module:
        config = self._checked(config, adapter_name)
        targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, config["target_modules"])]
        if not targets:
            raise ValueError(f"target_modules {config['target_modules']} match no module")
        for name, module in targets:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in SUPPORTED or type(module).__name__ != "Conv1D":
                raise ValueError(f"splitlora cannot adapt {name} ({type(module).__name__})")
        model.requires_grad_(False)
        for name, module in targets:
            parent, _, child = name.rpartition(".")
            adapter = Adapter(module, PARTS[child], config["r"], config["lora_alpha"], config["lora_dropout"])
            setattr(model.get_submodule(parent), child, adapter)
        model.splitlora_config = config
        return model

    def _adapters(self, model) -> dict[str, Adapter]:
        return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}

    def adapter_state_dict(self, model, adapter_name: str = "default") -> dict:
        out = {}
        for path, adapter in self._adapters(model).items():
            for (a_key, b_key), (a, b) in zip(_own_keys(path, adapter.parts), adapter.factors()):
                out[a_key], out[b_key] = a, b
        return out

    def load_adapter_state_dict(self, model, state_dict: dict, adapter_name: str = "default") -> None:
        live = self.adapter_state_dict(model)
        unknown = sorted(set(state_dict) - set(live))
        if unknown:
            raise ValueError(f"splitlora has no tensor for {unknown[:4]}")
        with torch.no_grad():
            for key, value in state_dict.items():
                if not torch.isfinite(value).all():
                    raise ValueError(f"{key} holds NaN or Inf")
                live[key].copy_(value)

    def save(self, model, directory: str, adapter_name: str = "default") -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.layout.to_peft(model, {k: v.detach().cpu().contiguous() for k, v in
                                              self.adapter_state_dict(model).items()})
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {**model.splitlora_config, "inference_mode": True, "fan_in_fan_out": True}  # GPT-2 Conv1D: (in, out)
        for key, value in (("use_rslora", False), ("use_dora", False), ("lora_bias", False), ("rank_pattern", {}),
                           ("alpha_pattern", {}), ("layers_to_transform", None), ("modules_to_save", None)):
            config[key] = value  # what splitlora always computes with, said explicitly for peft
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))

    def load(self, base_model, directory: str, adapter_name: str = "default", is_trainable: bool = False):
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        config = {k: v for k, v in config.items() if k in ACCEPTED}
        model = self.wrap(base_model, config)
        tensors = load_file(Path(directory) / "adapter_model.safetensors")
        self.load_adapter_state_dict(model, self.layout.to_driver(model, tensors))
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def merge(self, model) -> None:
        for adapter in self._adapters(model).values():
            if not adapter.merged:
                adapter.base_layer.weight.data += adapter.delta().T.to(adapter.base_layer.weight.dtype)
                adapter.merged = True

    def unmerge(self, model) -> None:
        for adapter in self._adapters(model).values():
            if adapter.merged:
                adapter.base_layer.weight.data -= adapter.delta().T.to(adapter.base_layer.weight.dtype)
                adapter.merged = False

    def trainable_parameters(self, model) -> tuple[int, int]:
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def merge_and_unload(self, model):
        raise NotImplementedError("splitlora cannot unload")

    def unload(self, model):
        raise NotImplementedError("splitlora cannot unload")

    def add_adapter(self, model, config, adapter_name):
        raise NotImplementedError("splitlora holds one adapter")

    def set_adapter(self, model, adapter_name):
        raise NotImplementedError("splitlora holds one adapter")

    def delete_adapter(self, model, adapter_name):
        raise NotImplementedError("splitlora holds one adapter")

    def disable_adapter(self, model):
        raise NotImplementedError("splitlora cannot disable its adapter")
