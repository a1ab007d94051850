"""Reading golden fixtures: where they are, their cases, their stored base models, and their integrity against
FIXTURES.lock. Needs no peft."""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from reference_impl.peft_format import adapter_directory

from .. import models

LOCK_NAME = "FIXTURES.lock"
ENV_ROOT = "PEFT_CONFORMANCE_FIXTURES"
SECOND = "second"  # the name of the second adapter in the two-adapter cases
COMBINED = "combined"  # the name of the adapter add_weighted_adapter makes in the weighted cases (v3 on)


@dataclass
class Case:
    """A case as stored on disk."""

    version: str
    name: str
    path: Path
    manifest: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.version}/{self.name}"

    @property
    def adapter_name(self) -> str:
        return self.manifest["adapter_name"]

    @property
    def base(self) -> str:
        """The zoo model the case adapts (v1 manifests predate the field: the tiny GPT-2)."""
        return self.manifest.get("base", "gpt2-tiny")

    def base_model(self) -> torch.nn.Module:
        return base_model(self.version, self.path.parents[2], self.base)

    def adapter_dir(self, name: Optional[str] = None) -> Path:
        name = name or self.adapter_name
        return adapter_directory(self.path / "adapter", name)

    def tensors(self, name: Optional[str] = None) -> dict[str, torch.Tensor]:
        return load_file(self.adapter_dir(name) / "adapter_model.safetensors")

    def config(self, name: Optional[str] = None) -> dict:
        return json.loads((self.adapter_dir(name) / "adapter_config.json").read_text())

    def inputs(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "inputs.safetensors")

    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "expected.safetensors")


def root() -> Path:
    """The fixtures folder: $PEFT_CONFORMANCE_FIXTURES, the checkout's fixtures/, or the installed copy."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    here = Path(__file__).resolve().parents[1]  # the conformance package
    checkout, installed = here.parent / "fixtures", here / "fixtures"  # the wheel maps fixtures/ into the package
    return checkout if checkout.is_dir() else installed


def versions(folder: Optional[Path] = None) -> list[str]:
    folder = folder or root()
    found = [p.name for p in folder.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(found, key=lambda v: int(v[1:]))


def cases(folder: Optional[Path] = None) -> list[Case]:
    """Every stored case of every version: the gate checks them all."""
    folder = folder or root()
    out = []
    for version in versions(folder):
        for path in sorted((folder / version / "cases").iterdir()):
            out.append(Case(version, path.name, path, json.loads((path / "manifest.json").read_text())))
    return out


def base_model(version: str, folder: Optional[Path] = None, name: str = "gpt2-tiny") -> torch.nn.Module:
    """A stored base model, in eval mode: its weights come from the file, not from torch's RNG. The tiny GPT-2
    is in <version>/base; the other zoo models (v2 on) in <version>/bases/<name>, built by the zoo and then
    loaded with the stored weights (shared tensors, such as T5's embeddings, stored once)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if name != "gpt2-tiny":
        model = models.build(name)
        stored = load_file((folder or root()) / version / "bases" / name / "model.safetensors")
        missing, unexpected = model.load_state_dict(in_this_transformers(stored, model), strict=False)
        if unexpected or set(missing) - set(aliases(model)):
            raise ValueError(f"{version}/bases/{name}: the stored weights do not fit the zoo's {name} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        return model.eval()
    base = (folder or root()) / version / "base"
    model = GPT2LMHeadModel(GPT2Config.from_dict(json.loads((base / "config.json").read_text())))
    state = load_file(base / "model.safetensors")
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)
    return model.eval()


# Module paths that one transformers major names differently from another: (as transformers 5 names them, as
# transformers 4 does). Transformers 5 folded CLIPVisionModel's inner `vision_model` into the model, so LLaVA's
# vision tower lost a level. The weights are the same tensors; only their names move.
RENAMED_PATHS = (("model.vision_tower.", "model.vision_tower.vision_model."),)


def in_this_transformers(stored: dict, model: torch.nn.Module) -> dict:
    """Stored weights keyed as the installed transformers names `model`'s parameters: a key the model lacks whose
    renamed form (RENAMED_PATHS, either way) it has is renamed, so bases recorded under one major load under the
    other. Anything else is left as it is, for load_state_dict to report."""
    expected, out = set(model.state_dict()), {}
    for key, tensor in stored.items():
        if key not in expected:
            for five, four in RENAMED_PATHS:
                for old, new in ((five, four), (four, five)):
                    if key.startswith(old) and new + key[len(old):] in expected:
                        key = new + key[len(old):]
        out[key] = tensor
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixture_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME)


def read_lock(folder: Optional[Path] = None) -> dict[str, str]:
    return json.loads(((folder or root()) / LOCK_NAME).read_text())["sha256"]


def verify(folder: Optional[Path] = None) -> list[str]:
    """Problems with the fixtures against their lock: changed, missing and unlocked files."""
    folder = folder or root()
    locked = read_lock(folder)
    present = {str(p.relative_to(folder)): p for p in fixture_files(folder)}
    problems = [f"{name}: sha256 differs from {LOCK_NAME}" for name, path in present.items()
                if name in locked and sha256(path) != locked[name]]
    problems += [f"{name}: locked but missing" for name in sorted(set(locked) - set(present))]
    problems += [f"{name}: not in {LOCK_NAME}" for name in sorted(set(present) - set(locked))]
    return problems


def aliases(model: torch.nn.Module) -> list[str]:
    """state_dict keys whose tensor an earlier key already holds (tied weights: GPT-2's lm_head, T5's embeddings)."""
    seen, shared = set(), []
    for key, tensor in model.state_dict().items():
        (shared.append(key) if tensor.data_ptr() in seen else seen.add(tensor.data_ptr()))
    return shared
