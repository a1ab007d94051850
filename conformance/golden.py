"""Golden fixtures: what peft wrote and computed for tiny models of the zoo, frozen in versioned folders.

    fixtures/FIXTURES.lock                       sha256 of every fixture file, all versions
    fixtures/v1/base/{config.json, model.safetensors}   the tiny GPT-2 (v1 has no other base)
    fixtures/v2/bases/<zoo model>/{config.json, model.safetensors}   v2: Llama, BERT classifier, T5, LLaVA
    fixtures/v1/gpt2-counts.json                 full-size GPT-2 parameter counts, recorded from peft
    fixtures/v1/cases/<case>/adapter/...         the adapter directory peft wrote
    fixtures/v1/cases/<case>/{inputs,expected}.safetensors, manifest.json ("base": its zoo model, from v2 on)

Versions are append-only: `generate` writes a new version folder and never edits an old one.
"""

import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from . import SPEC_VERSION, harness, models

LOCK_NAME = "FIXTURES.lock"
ENV_ROOT = "PEFT_CONFORMANCE_FIXTURES"
SECOND = "second"  # the name of the second adapter in the two-adapter case


@dataclass(frozen=True)
class CaseSpec:
    """A golden case: one feature, its config and the requirements it serves. Which drivers it applies to follows
    from its config (conformance/scope.py), so it is not recorded here (v1 manifests still carry a "needs" list;
    nothing reads it)."""

    name: str
    config: dict
    requirements: tuple[str, ...]
    adapter_name: str = "default"
    second: Optional[dict] = None
    base: str = "gpt2-tiny"  # the zoo model the case adapts


CASE_SPECS = [
    CaseSpec("r4-c_attn", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}, ("LORA-FWD-001",)),
    CaseSpec("r16-alpha4-c_attn", {"r": 16, "lora_alpha": 4, "target_modules": ["c_attn"]}, ("LORA-FWD-002",)),
    CaseSpec("r8-c_attn+c_proj", {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj"]},
             ("LORA-MATCH-002",)),
    CaseSpec("r2-all-linear", {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}, ("LORA-MATCH-004",)),
    CaseSpec("r8-c_attn-rslora", {"r": 8, "lora_alpha": 8, "target_modules": ["c_attn"], "use_rslora": True},
             ("LORA-FWD-002",)),
    CaseSpec("r4-c_attn+c_fc-dora", {"r": 4, "target_modules": ["c_attn", "c_fc"], "use_dora": True},
             ("LORA-FWD-008", "LORA-KEYS-005")),
    CaseSpec("r4-wpe-embedding", {"r": 4, "lora_alpha": 8, "target_modules": ["wpe"]},
             ("LORA-FWD-003", "LORA-KEYS-002")),
    CaseSpec("r4-c_attn-bias-lora_only", {"r": 4, "target_modules": ["c_attn"], "bias": "lora_only"},
             ("LORA-KEYS-006",)),
    CaseSpec("r4-c_attn-lora_bias", {"r": 4, "target_modules": ["c_attn"], "lora_bias": True},
             ("LORA-KEYS-006", "LORA-MERGE-007")),
    CaseSpec("r4-c_attn-modules_to_save-ln_f", {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["ln_f"]},
             ("LORA-MTS-002",)),
    CaseSpec("r8-patterns", {"r": 8, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"],
                             "rank_pattern": {"c_attn": 2}, "alpha_pattern": {r"mlp\.c_proj": 32}},
             ("LORA-MATCH-009",)),
    CaseSpec("r4-layers_to_transform-1", {"r": 4, "target_modules": ["c_attn", "c_proj"],
                                          "layers_to_transform": [1], "layers_pattern": "h"},
             ("LORA-MATCH-005",)),
    CaseSpec("r4-c_proj-adapter-named-custom", {"r": 4, "target_modules": ["c_proj"]},
             ("LORA-SER-004", "LORA-KEYS-001"), adapter_name="custom"),
    CaseSpec("two-adapters", {"r": 4, "target_modules": ["c_attn"]}, ("LORA-MULTI-002",),
             second={"r": 2, "lora_alpha": 16, "target_modules": ["c_fc"]}),
    # v2: the models LoRA is used on.
    CaseSpec("llama-r8-q_proj+v_proj", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                                        "task_type": "CAUSAL_LM"}, ("LORA-FWD-001", "LORA-KEYS-003"), base="llama"),
    CaseSpec("llama-r4-all-linear", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
             ("LORA-MATCH-004",), base="llama"),
    CaseSpec("llama-r4-attention-dora", {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                         "use_dora": True}, ("LORA-FWD-008", "LORA-KEYS-005"), base="llama"),
    CaseSpec("llama-r8-rslora", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                 "use_rslora": True}, ("LORA-FWD-002",), base="llama"),
    CaseSpec("llama-patterns", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                "rank_pattern": {"down_proj": 2},
                                "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32}},
             ("LORA-MATCH-009",), base="llama"),
    CaseSpec("llama-lm_head+embed_tokens", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "lm_head"]},
             ("LORA-FWD-003", "LORA-KEYS-010"), base="llama"),
    CaseSpec("bert-seq_cls", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
             ("LORA-TASK-001",), base="bert-classifier"),
    CaseSpec("t5-seq2seq", {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"},
             ("LORA-TASK-002",), base="t5"),
    CaseSpec("llava-language-model", {"r": 4, "lora_alpha": 8,
                                      "target_modules": r".*language_model.*\.(q_proj|v_proj)"},
             ("LORA-KEYS-001",), base="llava"),
]

# Full-size GPT-2 on the meta device: (target_modules, r) -> (trainable, total), recorded from peft.
COUNT_CONFIGS = [(["c_attn"], 4), (["c_attn"], 8), (["c_attn"], 64), (["c_attn", "c_proj"], 4),
                 (["c_attn", "c_proj"], 8), (["c_attn", "c_proj"], 64), ("all-linear", 8), (["c_fc"], 16)]


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
        return self.path / "adapter" if name == "default" else self.path / "adapter" / name

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
    here = Path(__file__).resolve().parent
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
        missing, unexpected = model.load_state_dict(stored, strict=False)
        if unexpected or set(missing) - set(_aliases(model)):
            raise ValueError(f"{version}/bases/{name}: the stored weights do not fit the zoo's {name} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        return model.eval()
    base = (folder or root()) / version / "base"
    model = GPT2LMHeadModel(GPT2Config.from_dict(json.loads((base / "config.json").read_text())))
    state = load_file(base / "model.safetensors")
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)
    return model.eval()


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


# --- generation (needs peft) -----------------------------------------------------------------------------

def producers() -> dict:
    import peft
    import transformers

    return {"impl": "peft", "peft": peft.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": "cpu", "dtype": "float32"}


def _aliases(model: torch.nn.Module) -> list[str]:
    """state_dict keys whose tensor an earlier key already holds (tied weights: GPT-2's lm_head, T5's embeddings)."""
    seen, aliases = set(), []
    for key, tensor in model.state_dict().items():
        (aliases.append(key) if tensor.data_ptr() in seen else seen.add(tensor.data_ptr()))
    return aliases


def _write_base(name: str, folder: Path) -> torch.nn.Module:
    """Zoo model `name` from seed 0 into `folder`: its config and its weights, each shared tensor once."""
    model = models.build(name, 0)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_diff_dict(), indent=2, sort_keys=True))
    aliases = set(_aliases(model))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return model


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return models.output_tensor(model(**inputs)).contiguous()


def _write_case(spec: CaseSpec, base: torch.nn.Module, folder: Path, version: str) -> None:
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(spec.config)),
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
        "producer": producers(), "tolerance_class": "golden",
        "inputs": f"{spec.base} inputs from seed 0 (conformance/models.py), row 2 right-padded by 3",
        "expected": "logits (question answering: start and end logits stacked) with the adapter active "
                    "(unmerged), merged, disabled; 'second': the second adapter",
        "keys": {n: {k: [list(v.shape), str(v.dtype)] for k, v in sorted(load_file(
            (folder / "adapter" if n == "default" else folder / "adapter" / n) / "adapter_model.safetensors")
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
    folder = folder or root()
    existing = versions(folder)
    version = record_version(folder, _write_version, folder, version)
    return version, changes(folder, existing[-1], version) if existing else ["first version"]


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


def _unordered(value):
    """peft writes sets as lists in hash-seed order: compare them as sorted lists."""
    return sorted(value) if isinstance(value, list) else value


def changes(folder: Path, old: str, new: str) -> list[str]:
    """What differs between two fixture versions: cases, keys, tensors, configs and expected outputs."""
    out = []
    old_cases = {c.name: c for c in cases(folder) if c.version == old}
    new_cases = {c.name: c for c in cases(folder) if c.version == new}
    out += [f"case {n} added" for n in sorted(set(new_cases) - set(old_cases))]
    out += [f"case {n} removed" for n in sorted(set(old_cases) - set(new_cases))]
    for name in sorted(set(old_cases) & set(new_cases)):
        a, b = old_cases[name], new_cases[name]
        for adapter in b.manifest["adapters"]:
            ta, tb = a.tensors(adapter), b.tensors(adapter)
            if ta.keys() != tb.keys():
                out.append(f"{name}: keys differ: {sorted(set(ta) ^ set(tb))[:4]}")
            for key in sorted(set(ta) & set(tb)):
                if not torch.equal(ta[key], tb[key]):
                    out.append(f"{name}: tensor {key} differs")
            ca, cb = a.config(adapter), b.config(adapter)
            out += [f"{name}: adapter_config.json {k}: {ca.get(k)!r} -> {cb.get(k)!r}"
                    for k in sorted(set(ca) | set(cb)) if _unordered(ca.get(k)) != _unordered(cb.get(k))]
        ea, eb = a.expected(), b.expected()
        for key in sorted(set(ea) & set(eb)):
            diff = (ea[key] - eb[key]).abs().max().item()
            if diff:
                out.append(f"{name}: expected {key} logits moved by {diff:.3g}")
    return out or ["no change"]


def check_results(results: Path, folder: Optional[Path] = None) -> list[tuple[str, str, str]]:
    """Compare what another process computed for the fixtures with what peft computed.

    `results/<version>/<case>/logits.safetensors` holds {"unmerged": logits} (and "merged", "disabled" if
    computed); `results/<version>/<case>/adapter/` optionally holds the adapter saved again. Returns
    (case, requirement, problem) for every difference; cases without results are reported as missing."""
    from . import checks

    problems = []
    for case in cases(folder):
        done = Path(results) / case.version / case.name
        if not (done / "logits.safetensors").is_file():
            problems.append((case.id, "LORA-GOLD-003", "no logits.safetensors"))
            continue
        produced, expected = load_file(done / "logits.safetensors"), case.expected()
        comparisons = [(k, "LORA-GOLD-003" if k == "unmerged" else "LORA-GOLD-004" if k == "merged"
                        else "LORA-GOLD-005") for k in ("unmerged", "merged", "disabled") if k in produced]
        for key, req in comparisons:
            try:
                checks.close(produced[key], expected[key], "golden", req, f"case {case.id}: {key} logits")
            except checks.ConformanceFailure as failure:
                problems.append((case.id, req, str(failure).splitlines()[0]))
        saved = done / "adapter" / ("" if case.adapter_name == "default" else case.adapter_name)
        if (saved / "adapter_model.safetensors").is_file():
            try:
                checks.all_close(load_file(saved / "adapter_model.safetensors"), case.tensors(), "exact",
                                 "LORA-GOLD-006", f"case {case.id}: re-saved")
            except checks.ConformanceFailure as failure:
                problems.append((case.id, "LORA-GOLD-006", str(failure).splitlines()[0]))
    return problems
