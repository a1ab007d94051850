"""Reading golden fixtures: where they are, their cases, their stored base models, and their integrity against
FIXTURES.lock. Needs no peft.

The fixtures ship packed: FIXTURES.lock names the sha256 of every file of the tree (all versions, the corpus), and
objects/<sha256> holds each content once (most versions repeat most files of the one
before). `root()` gives the tree itself, built once per lock in the user's cache; a folder without objects/ (a
user's own goldens, a copy) is the tree already.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from reference_impl.peft_format import adapter_directory

from ..zoo import models

LOCK_NAME = "FIXTURES.lock"
OBJECTS = "objects"
QUANTIZATION = "quantization.json"  # beside a quantized base's float weights: its BitsAndBytesConfig fields
ENV_ROOT = "PEFT_CONFORMANCE_FIXTURES"
ENV_CACHE = "PEFT_CONFORMANCE_CACHE"  # where packed fixtures are unpacked (default: the user's cache folder)
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


def source() -> Path:
    """The fixtures folder as stored: $PEFT_CONFORMANCE_FIXTURES, the checkout's fixtures/, or the installed copy."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    here = Path(__file__).resolve().parents[1]  # the conformance package
    checkout, installed = here.parent / "fixtures", here / "fixtures"  # the wheel maps fixtures/ into the package
    return checkout if checkout.is_dir() else installed


def root() -> Path:
    """The fixture tree (versions, cases, corpus) of source(), unpacked if it is packed."""
    return unpacked(source())


def is_packed(folder: Path) -> bool:
    return (folder / OBJECTS).is_dir()


def object_path(folder: Path, digest: str) -> Path:
    return folder / OBJECTS / digest  # one flat folder: a few hundred files, and no 4 KiB per subfolder on disk


def _cache() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft-conformance"
    folder = Path(os.environ.get(ENV_CACHE) or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def unpacked(folder: Path) -> Path:
    """The tree a packed `folder` stores, built once in the cache under the hash of its lock (a changed lock gets a
    new tree); `folder` itself when it is not packed. Built in a scratch folder and renamed into place, so a
    half-built tree is never seen and two processes building it at once both end with a whole one."""
    if not is_packed(folder):
        return folder
    lock = (folder / LOCK_NAME).read_bytes()
    target = _cache() / f"fixtures-{hashlib.sha256(lock).hexdigest()[:16]}"
    if target.is_dir():
        return target
    scratch = Path(tempfile.mkdtemp(prefix="unpacking-", dir=_cache()))
    for name, digest in json.loads(lock)["sha256"].items():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(object_path(folder, digest), scratch / name)
    (scratch / LOCK_NAME).write_bytes(lock)
    try:
        scratch.rename(target)
    except OSError:  # another process renamed its tree into place first
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def pack(tree: Path, folder: Path) -> None:
    """Store `tree` (a fixture tree with its lock) packed in `folder`: the objects it lacks, then the lock."""
    for name, digest in read_lock(tree).items():
        target = object_path(folder, digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tree / name, target)
    shutil.copyfile(tree / LOCK_NAME, folder / LOCK_NAME)


@contextlib.contextmanager
def editable(folder: Path):
    """A fixture tree to record into: `folder` itself, or for a packed folder a scratch copy of its tree, packed
    back into it when the block ends without an error (nothing is stored otherwise)."""
    if not is_packed(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        shutil.copytree(unpacked(folder), tree)
        yield tree
        pack(tree, folder)


def versions(folder: Optional[Path] = None) -> list[str]:
    folder = unpacked(folder) if folder else root()
    found = [p.name for p in folder.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(found, key=lambda v: int(v[1:]))


def cases(folder: Optional[Path] = None) -> list[Case]:
    """Every stored case of every version: the gate checks them all."""
    folder = unpacked(folder) if folder else root()
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
        stored_in = (folder or root()) / version / "bases" / name
        model = models.build_float(name)
        stored = load_file(stored_in / "model.safetensors")
        missing, unexpected = model.load_state_dict(in_this_transformers(stored, model), strict=False)
        if unexpected or set(missing) - set(aliases(model)):
            raise ValueError(f"{version}/bases/{name}: the stored weights do not fit the zoo's {name} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        if (stored_in / QUANTIZATION).is_file():
            from ..zoo import quantized

            return quantized.from_float(model, json.loads((stored_in / QUANTIZATION).read_text()))
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
    """Problems with the fixtures as stored (default: source()) against their lock: changed, missing and unlocked
    files; for a packed folder, objects whose content is not their name, missing or not locked."""
    folder = folder or source()
    locked = read_lock(folder)
    if is_packed(folder):
        return _verify_packed(folder, locked)
    present = {str(p.relative_to(folder)): p for p in fixture_files(folder)}
    problems = [f"{name}: sha256 differs from {LOCK_NAME}" for name, path in present.items()
                if name in locked and sha256(path) != locked[name]]
    problems += [f"{name}: locked but missing" for name in sorted(set(locked) - set(present))]
    problems += [f"{name}: not in {LOCK_NAME}" for name in sorted(set(present) - set(locked))]
    return problems


def _verify_packed(folder: Path, locked: dict[str, str]) -> list[str]:
    wanted = set(locked.values())
    problems = [f"{name}: its content {digest[:12]}... is missing from {OBJECTS}/" for name, digest in locked.items()
                if not object_path(folder, digest).is_file()]
    for path in fixture_files(folder):
        name = str(path.relative_to(folder))
        if path.parent != folder / OBJECTS:
            problems.append(f"{name}: not part of a packed fixtures folder ({LOCK_NAME} and {OBJECTS}/ only)")
        elif path.name not in wanted:
            problems.append(f"{name}: not in {LOCK_NAME}")
        elif sha256(path) != path.name:
            problems.append(f"{name}: sha256 differs from its name (the content of {_locked_as(locked, path.name)})")
    return problems


def _locked_as(locked: dict[str, str], digest: str) -> str:
    names = sorted(name for name, d in locked.items() if d == digest)
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def aliases(model: torch.nn.Module) -> list[str]:
    """state_dict keys whose tensor an earlier key already holds (tied weights: GPT-2's lm_head, T5's embeddings)."""
    seen, shared = set(), []
    for key, tensor in model.state_dict().items():
        (shared.append(key) if tensor.data_ptr() in seen else seen.add(tensor.data_ptr()))
    return shared
