"""Regression gates for your own model and adapters: `record` what they compute and how they are saved today,
`verify` after every upgrade of peft, torch, transformers or your own code.

A golden folder has the shape of the project's fixtures:

    golden.json                     manifest (schema peft-conformance/golden/v1): producer versions, the base model
                                    (a zoo name, module:factory, or a directory referenced by sha256 and by its path
                                    relative to the golden folder, never copied), the inputs, one entry per adapter
    FIXTURES.lock                   sha256 of every file of the folder
    inputs.safetensors              the forward's keyword arguments (token ids or tensors)
    cases/<case>/adapter/           the adapter directory's files as they were
    cases/<case>/expected.safetensors   outputs: unmerged, merged, disabled

verify reloads each adapter with an implementation (peft by default; any driver with --impl), recomputes the outputs,
saves the adapter again, and reports per case and requirement (LORA-GOLD-001, -003..006) through the same checks as
golden-check (conformance/consumer_kit/consumer_check.py), in the suite's report formats.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from reference_impl.peft_format import CONFIG_NAME

from .. import api, golden
from ..consumer_kit import consumer_check
from ..engine import report
from ..zoo import models

SCHEMA = "peft-conformance/golden/v1"
MANIFEST = "golden.json"
INPUTS = "inputs.safetensors"


@dataclass
class Base:
    """How to rebuild the base model exactly: what the manifest records."""

    source: str  # a zoo name, module:factory, or a directory
    kind: str  # zoo | factory | directory | config
    seed: int = 0  # for a model built from config.json alone, and for zoo models
    files: Optional[dict] = None  # directory: weight file -> sha256

    def build(self) -> torch.nn.Module:
        if self.kind == "zoo":
            return models.build(self.source, self.seed)
        if self.kind == "factory":
            return _factory(self.source)().eval()
        import transformers

        folder = Path(self.source)
        model_class = models.class_of_directory(folder)
        if self.kind == "directory":
            return model_class.from_pretrained(folder).eval()
        torch.manual_seed(self.seed)
        return model_class(transformers.AutoConfig.from_pretrained(folder)).eval()

    def changed_files(self) -> list[str]:
        """A located directory base's weight files whose sha256 is no longer the recorded one."""
        folder = Path(self.source)
        return [f"{folder / name}: sha256 differs from the one recorded" for name, digest in (self.files or {}).items()
                if _sha256(folder / name) != digest]

    @property
    def is_directory(self) -> bool:
        return self.kind in ("directory", "config")

    def located(self, golden_folder: Path, override: Optional[str] = None) -> "Base":
        """This base with its directory found: `override` (verify --base), else the recorded path, which is relative
        to the golden folder (absolute in goldens recorded before 0.3)."""
        if override is not None and not self.is_directory:
            raise ValueError(f"--base {override}: this golden folder's base is {self.kind} {self.source!r}, not a "
                             "model directory; --base only gives a recorded directory its new place")
        if not self.is_directory:
            return self
        folder = Path(override) if override is not None else golden_folder / self.source
        missing = [name for name in ("config.json", *(self.files or {})) if not (folder / name).is_file()]
        if missing:
            where = f"--base {override}" if override is not None else (
                f"the base model directory {folder} (recorded in {golden_folder / MANIFEST} as {self.source!r}, "
                "relative to the golden folder)")
            raise FileNotFoundError(f"{where}: no {', '.join(missing)} there. Put the base model back there, or give "
                                    "its new place: peft-conformance verify GOLDEN --base DIR")
        return Base(str(folder), self.kind, self.seed, self.files)


def base_from(spec: str, seed: int = 0) -> Base:
    if spec in models.ZOO:
        return Base(spec, "zoo", seed)
    folder = Path(spec)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"--base {spec}: no config.json in the directory")
        weights = sorted(p.name for p in folder.glob("*.safetensors"))
        if weights:
            return Base(str(folder.resolve()), "directory", seed, {name: _sha256(folder / name) for name in weights})
        return Base(str(folder.resolve()), "config", seed)
    if ":" in spec:
        _factory(spec)  # fails now, with the reason, rather than at verify time
        return Base(spec, "factory", seed)
    raise ValueError(f"--base {spec!r}: expected a zoo model name ({', '.join(models.ZOO)}), a model directory "
                     "(config.json, with weights or built from it with --seed), or module:factory")


def _factory(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--base {spec!r}: cannot import it ({error})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_adapter_directory(directory: Path) -> None:
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"--adapter {directory}: no {CONFIG_NAME} (give the folder save_pretrained wrote; a named "
                         "adapter is in its subfolder)")


def _inputs(model: torch.nn.Module, inputs: Optional[Path], seed: int) -> dict:
    if inputs is not None:
        try:
            return load_file(inputs)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"--inputs {inputs}: not a readable safetensors file ({error})") from None
    embeddings = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or (embeddings[0] if embeddings else None)
    if not vocab:
        raise ValueError("the base model has no vocabulary (config.vocab_size or an nn.Embedding) to draw token ids "
                         "from: give --inputs FILE (a safetensors file whose tensors are the forward's keyword "
                         "arguments)")
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=generator)}


def _outputs(driver, base: torch.nn.Module, adapter: Path, inputs: dict, resave: Optional[Path] = None) -> dict:
    """unmerged, disabled, merged outputs of `adapter` on `base` through `driver` (and its re-save into `resave`)."""
    model = driver.load(base, str(adapter))
    model.eval()
    with torch.no_grad():
        out = {"unmerged": models.output_tensor(model(**inputs)).float().contiguous()}
        if resave is not None:
            driver.save(model, str(resave))
        with driver.disable_adapter(model):
            out["disabled"] = models.output_tensor(model(**inputs)).float().contiguous()
        driver.merge(model)
        out["merged"] = models.output_tensor(model(**inputs)).float().contiguous()
    return out


def record(target: Path, base_spec: str, adapters: list[Path], inputs: Optional[Path] = None, seed: int = 0) -> dict:
    """Write a golden folder; refuses a target that exists and is not empty. Needs peft (the outputs are peft's)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not an empty folder; record never overwrites")
    if not adapters:
        raise ValueError("give at least one --adapter DIR")
    names = [_case_name(Path(a), i) for i, a in enumerate(adapters)]
    if len(set(names)) != len(names):
        raise ValueError(f"two adapters would share a case name: {names}")
    base = base_from(base_spec, seed)
    peft_driver = api.load_driver("peft")
    recorded = base  # a directory is recorded relative to the golden folder, so that the two can move together
    if base.is_directory:
        recorded = Base(os.path.relpath(base.source, target.resolve()), base.kind, base.seed, base.files)
    model = base.build()
    given = _inputs(model, Path(inputs) if inputs else None, seed)
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as scratch:
        staged = Path(scratch) / "golden"
        staged.mkdir()
        save_file({k: v.contiguous() for k, v in given.items()}, staged / INPUTS, metadata={"format": "pt"})
        cases = []
        for name, adapter in zip(names, map(Path, adapters)):
            _check_adapter_directory(adapter)
            folder = staged / "cases" / name
            shutil.copytree(adapter, folder / "adapter")
            save_file(_outputs(peft_driver, base.build(), folder / "adapter", given), folder / "expected.safetensors",
                      metadata={"format": "pt"})
            cases.append({"name": name, "adapter": f"cases/{name}/adapter", "source": str(adapter.resolve()),
                          "expected": f"cases/{name}/expected.safetensors", "tolerance": "golden"})
        manifest = {"schema": SCHEMA, "producer": golden.producers(), "base": recorded.__dict__, "inputs": INPUTS,
                    "cases": cases}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (staged / golden.LOCK_NAME).write_text(json.dumps(
            {"about": "sha256 of every file of this golden folder; peft-conformance verify checks it",
             "sha256": {str(p.relative_to(staged)): golden.sha256(p) for p in golden.fixture_files(staged)}},
            indent=2) + "\n")
        target.mkdir(parents=True, exist_ok=True)
        for item in staged.iterdir():
            shutil.move(str(item), target / item.name)
    return manifest


def _case_name(adapter: Path, index: int) -> str:
    name = adapter.resolve().name
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name) or f"adapter{index}"


@dataclass
class Verified:
    results: report.Results
    moved: list[str]  # "producer: peft 0.21.2 -> 0.22.0", "case X: merged moved by 3e-3"
    implementation: dict


def verify(folder: Path, impl: str = "peft", base_dir: Optional[str] = None) -> Verified:
    """Recompute every case with `impl` and check it against the folder, per case and requirement; `base_dir`: where
    a recorded base model directory is now."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; give a folder `peft-conformance record` wrote")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    driver = api.load_driver(impl)
    base = Base(**manifest["base"]).located(folder, base_dir)
    given = load_file(folder / manifest["inputs"])
    collected = report.Results()
    for outcome in _integrity(folder, manifest, base):
        collected.add(outcome)
    goldens = [consumer_check.Golden(case["name"], case["name"], load_file(folder / case["expected"]),
                                     {k: v for k, v in consumer_check.FIXTURE_OUTPUTS.items() if k != "second"},
                                     tolerance=case["tolerance"],
                                     resaved=load_file(folder / case["adapter"] / "adapter_model.safetensors"))
               for case in manifest["cases"]]
    moved = [f"producer: {k} {manifest['producer'].get(k)} -> {v}" for k, v in golden.producers().items()
             if k in ("peft", "torch", "transformers", "python") and manifest["producer"].get(k) != v]
    moved += [f"implementation: {driver.name} {driver.version}"] if impl != "peft" else []
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch)
        for case, gold in zip(manifest["cases"], goldens):
            done = results / case["name"]
            done.mkdir()
            try:
                outputs = _outputs(driver, base.build(), folder / case["adapter"], given, done / "adapter")
            except Exception as error:  # the implementation's failure is this case's result, not the run's end
                (done / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
                continue
            save_file(outputs, done / consumer_check.LOGITS)
            for name, tensor in outputs.items():
                if name in gold.expected and tensor.shape == gold.expected[name].shape:
                    diff = (tensor - gold.expected[name]).abs().max().item()
                    if diff:
                        moved.append(f"case {case['name']}: {name} outputs moved by {diff:.3g}")
        for outcome in consumer_check.check(goldens, results).outcomes:
            collected.add(outcome)
    return Verified(collected, moved, {"name": driver.name, "version": driver.version, "golden": str(folder)})


def _integrity(folder: Path, manifest: dict, base: Base) -> list[report.TestOutcome]:
    """LORA-GOLD-001 per case: the case's files and the shared ones (manifest, inputs, a directory base's weights)
    against the lock."""
    problems = golden.verify(folder)
    changed_base = base.changed_files()
    out = []
    for case in manifest["cases"]:
        mine = [p for p in problems if p.startswith(f"cases/{case['name']}/") or not p.startswith("cases/")]
        mine += [f"base model {change}" for change in changed_base]
        outcome = report.TestOutcome(nodeid=f"{case['name']}::files", reqs=["LORA-GOLD-001"], outcome="passed",
                                     cell={"test": "files", "id": case["name"], "device": "cpu", "dtype": "float32"})
        if mine:
            outcome.outcome = "failed"
            outcome.failures = [{"req": "LORA-GOLD-001", "message": f"LORA-GOLD-001 failed: case {case['name']}: "
                                 + "; ".join(mine[:5]), "example": case["name"]}]
        else:
            outcome.held = ["LORA-GOLD-001"]
        out.append(outcome)
    return out
