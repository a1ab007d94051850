"""Recording a new fixture version with the installed peft: two runs, compared byte for byte, then added to the
lock. Old versions are never rewritten."""

import copy
import json
import platform
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from reference_impl.peft_format import adapter_directory

from .. import SPEC_VERSION
from ..drivers.peft_shaped import CONFIG_CLASSES
from ..engine import harness
from ..zoo import models, quantized
from .diff import changes
from .recipes import CASE_SPECS, COUNT_CONFIGS, CaseSpec
from .store import (
    COMBINED,
    LOCK_NAME,
    QUANTIZATION,
    SECOND,
    aliases,
    editable,
    fixture_files,
    read_lock,
    sha256,
    source,
    versions,
)


def producers() -> dict:
    import peft
    import transformers

    return {"impl": "peft", "peft": peft.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": "cpu", "dtype": "float32"}


def _write_base(name: str, folder: Path) -> torch.nn.Module:
    """Zoo model `name` from seed 0 into `folder`: its config and its weights, each shared tensor once. A quantized
    base is stored as its float weights and the BitsAndBytesConfig fields (QUANTIZATION), from which quantizing
    rebuilds the same quantized weights (store.base_model)."""
    scheme = models.ZOO[name].quantized
    if scheme:
        fields = quantized.bnb_fields(scheme, torch.float32)
        (folder / QUANTIZATION).parent.mkdir(parents=True)
        (folder / QUANTIZATION).write_text(json.dumps(fields, indent=2, sort_keys=True))
        return quantized.from_float(_write_base_weights(models.build_float(name, 0), folder), fields)
    return _write_base_weights(models.build(name, 0), folder)


def _write_base_weights(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "config"):  # a plain torch model (the zoo's MoE) is rebuilt by the zoo
        config = model.config
        config = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)  # diffusers: a dict
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
    shared = set(aliases(model))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in shared}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return model


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return models.output_tensor(model(**inputs)).contiguous()


def _write_case(spec: CaseSpec, base: torch.nn.Module, folder: Path, version: str) -> None:
    import peft

    torch.manual_seed(0)
    config_class = getattr(peft, CONFIG_CLASSES[spec.config.get("peft_type", "LORA")])
    model = peft.get_peft_model(copy.deepcopy(base), config_class(**copy.deepcopy(spec.config)),
                                adapter_name=spec.adapter_name)
    seed = zlib.crc32(spec.name.encode())
    peft.set_peft_model_state_dict(model, harness.adapter_values(
        peft.get_peft_model_state_dict(model, adapter_name=spec.adapter_name), seed), spec.adapter_name)
    if spec.second:
        model.add_adapter(SECOND, peft.LoraConfig(**spec.second))
        peft.set_peft_model_state_dict(model, harness.adapter_values(
            peft.get_peft_model_state_dict(model, adapter_name=SECOND), seed + 1), SECOND)
    model.eval()
    inputs = models.inputs(spec.base, 0)
    expected = {"unmerged": _logits(model, inputs)}
    with model.disable_adapter():
        expected["disabled"] = _logits(model, inputs)
    model.merge_adapter()
    expected["merged"] = _logits(model, inputs)
    model.unmerge_adapter()
    if spec.mixed:
        expected["mixed"] = _logits(model, {**inputs, "adapter_names": list(spec.mixed)})
    if spec.combine:
        weights, combination = spec.combine
        model.add_weighted_adapter([spec.adapter_name, SECOND], weights, COMBINED, combination_type=combination)
        model.set_adapter(COMBINED)
        expected["combined"] = _logits(model.eval(), inputs)
    if spec.second:
        model.set_adapter(SECOND)
        expected["second"] = _logits(model, inputs)
    folder.mkdir(parents=True)
    model.save_pretrained(folder / "adapter")
    save_file(inputs, folder / "inputs.safetensors", metadata={"format": "pt"})
    save_file(expected, folder / "expected.safetensors", metadata={"format": "pt"})
    names = [spec.adapter_name] + ([SECOND] if spec.second else [])
    manifest = {
        "case": spec.name, "base": spec.base, "fixture_version": version, "spec_version": SPEC_VERSION,
        "requirements": list(spec.requirements), "adapter_name": spec.adapter_name,
        "adapters": names, "config": spec.config, "second_config": spec.second, "values_seed": seed,
        **({"mixed": list(spec.mixed)} if spec.mixed else {}),
        **({"combine": {"weights": spec.combine[0], "combination_type": spec.combine[1]}} if spec.combine else {}),
        "producer": producers(), "tolerance_class": "golden",
        "inputs": f"{spec.base} inputs from seed 0 (conformance/zoo/models.py), row 2 right-padded by 3",
        "expected": "logits (question answering: start and end logits stacked) with the adapter active "
                    "(unmerged), merged, disabled; 'second': the second adapter; 'mixed': rows through the adapters "
                    "named in 'mixed'; 'combined': the adapter add_weighted_adapter makes as 'combine' says",
        "keys": {n: {k: [list(v.shape), str(v.dtype)] for k, v in sorted(load_file(
            adapter_directory(folder / "adapter", n) / "adapter_model.safetensors")
            .items())} for n in names},
    }
    manifest["files"] = {str(p.relative_to(folder)): sha256(p) for p in fixture_files(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _write_counts(folder: Path) -> None:
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    rows = []
    for targets, r in COUNT_CONFIGS:
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config())
        trainable, total = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=targets)) \
            .get_nb_trainable_parameters()
        rows.append({"target_modules": targets, "r": r, "trainable": trainable, "total": total})
    (folder / "gpt2-counts.json").write_text(json.dumps({"producer": producers(), "counts": rows}, indent=2))


def _write_version(folder: Path, version: str) -> None:
    bases = {"gpt2-tiny": _write_base("gpt2-tiny", folder / "base")}
    for name in sorted({spec.base for spec in CASE_SPECS} - set(bases)):
        bases[name] = _write_base(name, folder / "bases" / name)
    _write_counts(folder)
    for spec in CASE_SPECS:
        _write_case(spec, bases[spec.base], folder / "cases" / spec.name, version)


def generate(folder: Optional[Path] = None, version: Optional[str] = None) -> tuple[str, list[str]]:
    """Write fixture version `version` (default: the next one) with the installed peft. Returns the version and what
    changed against the previous version."""
    with editable(folder or source()) as tree:
        existing = versions(tree)
        version = record_version(tree, _write_version, tree, version)
        return version, changes(tree, existing[-1], version) if existing else ["first version"]


def record_version(parent: Path, write, lock_folder: Path, version: Optional[str] = None) -> str:
    """Record version `version` (default: the next one) of what `write(folder, version)` writes under `parent`,
    after checking that two runs write identical bytes, and add its files to the lock in `lock_folder`."""
    existing = versions(parent) if parent.is_dir() else []
    version = version or f"v{int(existing[-1][1:]) + 1 if existing else 1}"
    target = parent / version
    if target.exists():
        raise FileExistsError(f"{target} exists: recorded versions are never rewritten; record a new version")
    with tempfile.TemporaryDirectory() as scratch:
        runs = [Path(scratch) / "a", Path(scratch) / "b"]
        for run in runs:
            write(run, version)
        differing = [str(p.relative_to(runs[0])) for p in fixture_files(runs[0])
                     if p.read_bytes() != (runs[1] / p.relative_to(runs[0])).read_bytes()]
        if differing:
            raise RuntimeError(f"recording is not deterministic: two runs differ in {differing[:5]}")
        shutil.copytree(runs[0], target)
    lock_path = lock_folder / LOCK_NAME
    locked = read_lock(lock_folder) if lock_path.exists() else {}
    locked.update({str(p.relative_to(lock_folder)): sha256(p) for p in fixture_files(target)})
    lock_path.write_text(json.dumps({"about": "sha256 of every fixture file; `peft-conformance fixtures verify`",
                                     "sha256": dict(sorted(locked.items()))}, indent=2) + "\n")
    return version
