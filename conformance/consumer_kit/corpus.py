"""The consumer corpus: golden cases for code that only loads peft adapters (servers, converters, runtimes), in files
a program in any language can read. Recorded from peft into fixtures/corpus/<version>, locked like the fixtures,
and copied out by `peft-conformance corpus export DIR`:

    corpus.json                        the manifest (schema: corpus.schema.json, beside it)
    bases/<base>/                      a model directory as transformers writes it, with a SentencePiece vocabulary
    cases/<case>/adapter[/<name>]/     the adapter directory as peft wrote it (a non-default name in its subfolder)
    cases/<case>/inputs.safetensors    {"input_ids": int64 (rows, tokens)}: no padding, one sequence per row
    cases/<case>/expected.safetensors  float32 logits (rows, tokens, vocab): "unmerged", "merged", "disabled"

Diffusion cases (kind "diffusion", from corpus v2) hold a Stable-Diffusion-style pipeline and a kohya-layout LoRA
file instead; their expected output is the denoiser's (conformance/consumer_kit/diffusion_cases.py).

Expected logits are what peft computes after loading the saved files into the saved base (PeftModel.from_pretrained),
the path a consumer takes. A consumer writes RESULTS/<case>/logits.safetensors with the keys it computed;
`peft-conformance golden-check RESULTS --corpus DIR` reports them per requirement
(conformance/consumer_kit/consumer_check.py).
"""

import copy
import io
import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from reference_impl.peft_format import adapter_directory

from .. import golden
from ..engine import harness
from ..zoo import models
from . import diffusion_cases

SCHEMA = "peft-conformance/corpus/v2"  # v2 adds diffusion cases (kind, adapter_format, adapter_weight, "weighted")
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "spec" / "corpus.schema.json"
MANIFEST = "corpus.json"
OUTPUTS = ("unmerged", "merged", "disabled")


@dataclass(frozen=True)
class CorpusCase:
    """One thing consumers get wrong, on one base model."""

    name: str
    base: str  # a zoo model; its directory is bases/<base>
    config: dict
    features: tuple[str, ...]  # what a consumer must honour to pass: "rslora", "dora", "modules_to_save", ...
    requirements: tuple[str, ...]  # the spec requirements the case exercises besides LORA-CONS-*
    adapter_name: str = "default"
    dtype: str = "float32"  # the dtype of the saved adapter tensors
    note: str = ""
    kind: str = "causal_lm"  # "diffusion": `config` per pipeline component, a kohya file (diffusion_cases.py)
    kohya_alphas: bool = True  # (diffusion) False: the file holds no .alpha tensors, as some trainers save it


_ATTENTION = ["q_proj", "v_proj"]
_UNET_ATTENTION, _TEXT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]
CASES = [
    CorpusCase("gpt2-c_attn", "gpt2-tiny", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]},
               ("conv1d",), ("LORA-FWD-001", "LORA-CFG-004"),
               note="GPT-2's Conv1D stores its weight as (in, out); the LoRA factors are the usual (r, in), (out, r)"),
    CorpusCase("llama-q_proj+v_proj", "llama", {"r": 8, "lora_alpha": 16, "target_modules": _ATTENTION,
                                                "task_type": "CAUSAL_LM"}, (), ("LORA-FWD-001", "LORA-KEYS-001")),
    CorpusCase("llama-all-linear", "llama", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
               ("grouped_query_attention",), ("LORA-MATCH-004", "LORA-INIT-001"),
               note="k_proj and v_proj are (64, 32): 2 key/value heads of 8 under 4 query heads"),
    CorpusCase("llama-rslora", "llama", {"r": 16, "lora_alpha": 8, "target_modules": _ATTENTION, "use_rslora": True},
               ("rslora",), ("LORA-FWD-002",), note="scaling = lora_alpha / sqrt(r) = 2, not lora_alpha / r = 0.5"),
    CorpusCase("llama-rank_pattern", "llama", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                               "rank_pattern": {"down_proj": 2}},
               ("rank_pattern",), ("LORA-MATCH-009",), note="down_proj has r=2, so scaling 4; q_proj r=8, scaling 1"),
    CorpusCase("llama-alpha_pattern", "llama", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                                "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32}},
               ("alpha_pattern",), ("LORA-MATCH-009",),
               note="layer 1's q_proj has lora_alpha 32 (scaling 4); the rest 1"),
    CorpusCase("llama-dora", "llama", {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                       "use_dora": True}, ("dora",), ("LORA-FWD-008", "LORA-KEYS-005")),
    CorpusCase("llama-embed_tokens+lm_head", "llama", {"r": 4, "lora_alpha": 8,
                                                       "target_modules": ["embed_tokens", "lm_head"]},
               ("lora_embedding",), ("LORA-FWD-003", "LORA-KEYS-002", "LORA-KEYS-010"),
               note="the file also holds both base weights (...base_layer.weight), as peft saves them"),
    CorpusCase("llama-modules_to_save-lm_head", "llama", {"r": 4, "target_modules": _ATTENTION,
                                                          "modules_to_save": ["lm_head"]},
               ("modules_to_save",), ("LORA-MTS-001", "LORA-MTS-002"),
               note="a full lm_head.weight replaces the base's while the adapter is active"),
    CorpusCase("llama-layers_to_transform", "llama", {"r": 4, "target_modules": _ATTENTION + ["o_proj"],
                                                      "layers_to_transform": [1], "layers_pattern": "layers"},
               ("layers_to_transform",), ("LORA-MATCH-005",), note="only layer 1 is adapted"),
    CorpusCase("llama-adapter-named-custom", "llama", {"r": 4, "target_modules": _ATTENTION},
               ("adapter_name",), ("LORA-SER-004",), adapter_name="custom",
               note="saved by peft in the subfolder adapter/custom; its keys carry no adapter name"),
    CorpusCase("qwen2-lora_bias", "qwen2-tied", {"r": 4, "target_modules": _ATTENTION, "lora_bias": True},
               ("lora_bias",), ("LORA-KEYS-006", "LORA-MERGE-007"),
               note="lora_B has a bias: delta = s * (B A x + b); merged, s * b adds to the base bias"),
    CorpusCase("llama-bf16-adapter", "llama", {"r": 8, "lora_alpha": 16, "target_modules": _ATTENTION},
               ("bf16_adapter",), ("LORA-FWD-001",), dtype="bfloat16",
               note="the adapter file holds bfloat16 tensors; the base is float32 and so is the computation"),
    CorpusCase("qwen2-tied-q_proj+v_proj", "qwen2-tied", {"r": 4, "lora_alpha": 8, "target_modules": _ATTENTION},
               ("tied_embeddings",), ("LORA-FWD-001",),
               note="Qwen2: biased q/k/v projections, lm_head tied to embed_tokens"),
    CorpusCase("llava-language-model", "llava", {"r": 4, "lora_alpha": 8,
                                                 "target_modules": r".*language_model.*\.(q_proj|v_proj)"},
               ("prefixed_language_model",), ("LORA-MATCH-001", "LORA-KEYS-001"),
               note="the language model sits under model.language_model; inputs are text only (no image)"),
    # Diffusion, kohya layout (conformance/consumer_kit/diffusion_cases.py): `config` per pipeline component.
    CorpusCase("sd-kohya-attention", diffusion_cases.BASE,
               {"unet": {"r": 4, "lora_alpha": 8, "target_modules": _UNET_ATTENTION},
                "text_encoder": {"r": 4, "lora_alpha": 8, "target_modules": _TEXT_ATTENTION}},
               ("kohya",), ("LORA-KOHYA-001", "LORA-KOHYA-002"), kind="diffusion",
               note="one alpha for every module (8, r 4: scaling 2), UNet and text encoder attention"),
    CorpusCase("sd-kohya-locon", diffusion_cases.BASE,
               {"unet": {"r": 2, "lora_alpha": 1, "rank_pattern": {"conv1": 1},
                         "target_modules": ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out",
                                            "time_emb_proj", "ff.net.0.proj", "ff.net.2"]}},
               ("kohya", "conv_lora", "rank_per_module"), ("LORA-KOHYA-001", "LORA-FWD-006"), kind="diffusion",
               note="LoCon: 3x3 and 1x1 convolutions (lora_down a conv of the layer's kernel, lora_up 1x1), conv1 "
                    "at rank 1 (scaling 1) beside rank 2 (scaling 0.5)"),
    CorpusCase("sd-kohya-alpha-per-module", diffusion_cases.BASE,
               {"unet": {"r": 4, "lora_alpha": 4, "target_modules": _UNET_ATTENTION + ["conv2"],
                         "rank_pattern": {"to_v": 2}, "alpha_pattern": {"to_k": 1, "to_out.0": 16, "conv2": 8}}},
               ("kohya", "alpha_per_module", "rank_per_module"), ("LORA-KOHYA-001",), kind="diffusion",
               note="as resize_lora.py writes them: each module its own rank and alpha (to_k scaling 0.25, to_out.0 "
                    "4, to_v 2, conv2 2, the rest 1)"),
    CorpusCase("sd-kohya-text-encoder-mlp", diffusion_cases.BASE,
               {"unet": {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]},
                "text_encoder": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "fc1", "fc2"]}},
               ("kohya", "text_encoder"), ("LORA-KOHYA-002",), kind="diffusion",
               note="the text encoder's q_proj and v_proj and its MLP, not out_proj"),
    CorpusCase("sd-kohya-text-encoder-alpha", diffusion_cases.BASE,
               {"text_encoder": {"r": 4, "lora_alpha": 4, "alpha_pattern": {"fc1": 12},
                                 "target_modules": _TEXT_ATTENTION + ["fc1"]}},
               ("kohya", "text_encoder", "alpha_per_module"), ("LORA-KOHYA-001",), kind="diffusion",
               note="fc1 has alpha 12 (scaling 3), the attention projections 4 (scaling 1)"),
    CorpusCase("sd-kohya-no-alpha", diffusion_cases.BASE,
               {"unet": {"r": 4, "lora_alpha": 4, "target_modules": _UNET_ATTENTION},
                "text_encoder": {"r": 2, "lora_alpha": 2, "target_modules": _TEXT_ATTENTION}},
               ("kohya", "no_alpha"), ("LORA-KOHYA-001",), kind="diffusion", kohya_alphas=False,
               note="no .alpha tensors: alpha = r, scaling 1"),
    CorpusCase("sd-kohya-fp16", diffusion_cases.BASE,
               {"unet": {"r": 2, "lora_alpha": 8, "target_modules": ["to_q", "to_out.0", "conv2"]},
                "text_encoder": {"r": 2, "lora_alpha": 1, "target_modules": ["q_proj", "out_proj"]}},
               ("kohya", "fp16_adapter"), ("LORA-KOHYA-001", "LORA-KOHYA-002"), kind="diffusion", dtype="float16",
               note="the file in float16, .alpha included, as kohya-ss scripts save it by default; the pipeline is "
                    "float32 and so is the computation"),
]


@dataclass
class Case:
    """A case of a stored or exported corpus."""

    root: Path
    manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "causal_lm")

    @property
    def adapter_dir(self) -> Path:
        """The adapter directory (the file, for adapter_format kohya)."""
        return self.root / self.manifest["adapter"]

    @property
    def base_dir(self) -> Path:
        return self.root / self.manifest["base"]

    def inputs(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / self.manifest["inputs"])

    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / self.manifest["expected"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.adapter_dir / "adapter_model.safetensors")


def stored(folder: Optional[Path] = None) -> Path:
    """The newest corpus version among the fixtures."""
    corpus = (golden.unpacked(folder) if folder else golden.root()) / "corpus"
    found = golden.versions(corpus) if corpus.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{corpus}: no recorded corpus version (peft-conformance corpus generate)")
    return corpus / found[-1]


def read(root: Path) -> list[Case]:
    """The cases of an exported (or stored) corpus, checked against the manifest schema first."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; give the folder `peft-conformance corpus export` wrote")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    problems = validation_errors(manifest)
    if problems:
        raise ValueError(f"{path}: does not follow {SCHEMA}: " + "; ".join(problems[:5]))
    return [Case(root, entry) for entry in manifest["cases"]]


def validation_errors(manifest: dict) -> list[str]:
    """Where `manifest` departs from the published schema (empty when it follows it)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(manifest)]


def export(target: Path, folder: Optional[Path] = None) -> Path:
    """Copy the newest stored corpus and its schema to `target`, which must not exist or be empty; the stored files
    are checked against FIXTURES.lock first, so a damaged checkout is never exported."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not an empty folder; corpus export never overwrites")
    source = stored(folder)
    fixtures = golden.unpacked(folder) if folder else golden.root()
    damaged = [p for p in golden.verify(fixtures) if p.startswith(str(source.relative_to(fixtures)))]
    if damaged:
        raise ValueError(f"the stored corpus does not match {golden.LOCK_NAME}: {damaged[:3]}")
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as scratch:
        staged = Path(scratch) / "corpus"
        shutil.copytree(source, staged)
        shutil.copy(SCHEMA_PATH, staged / "corpus.schema.json")
        target.mkdir(parents=True, exist_ok=True)
        for item in staged.iterdir():  # whole files only: an interrupted export leaves no half-written file
            shutil.move(str(item), target / item.name)
    return target


# --- recording (needs peft and sentencepiece) ------------------------------------------------------------------

_TOKENIZER_TEXT = ("the quick brown fox jumps over the lazy dog. a low rank adapter changes what a model computes. "
                   "peft saves it beside the base model, and every consumer must apply it the same way. ")


def _write_tokenizer(folder: Path) -> None:
    """A 64-piece SentencePiece vocabulary (no normaliser, so the file is small), trained deterministically: engines
    that convert a model only with its vocabulary (llama.cpp) accept it; the model's 100 ids are padded by them."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT.split(". ") * 20), model_writer=model, vocab_size=64, model_type="bpe",
        num_threads=1, character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": False, "add_eos_token": False, "model_max_length": 64}, indent=2, sort_keys=True))


def _write_base(name: str, folder: Path) -> torch.nn.Module:
    model = models.build(name, 0).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder)
    return model


def _inputs(name: str) -> dict[str, torch.Tensor]:
    """Two rows of 8 token ids, no padding: each row is one sequence a runtime evaluates on its own."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return {"input_ids": torch.randint(3, models.hf.IMAGE_TOKEN, (2, 8), generator=generator)}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float().contiguous()


def _write_case(case: CorpusCase, base: torch.nn.Module, root: Path) -> dict:
    import peft

    folder = root / "cases" / case.name
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(case.config)),
                                adapter_name=case.adapter_name)
    state = peft.get_peft_model_state_dict(model, adapter_name=case.adapter_name)
    peft.set_peft_model_state_dict(model, harness.adapter_values(state, zlib.crc32(case.name.encode())),
                                   case.adapter_name)
    if case.dtype != "float32":  # what a half-precision training run writes
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(getattr(torch, case.dtype))
    model.save_pretrained(folder / "adapter")
    adapter = adapter_directory(folder / "adapter", case.adapter_name)

    # The expected logits are the consumer's path: peft loads the saved files into the saved base.
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter, adapter_name=case.adapter_name).eval()
    inputs = _inputs(case.base)
    expected = {"unmerged": _logits(loaded, inputs)}
    with loaded.disable_adapter():
        expected["disabled"] = _logits(loaded, inputs)
    loaded.merge_adapter()
    expected["merged"] = _logits(loaded, inputs)
    save_file(inputs, folder / "inputs.safetensors", metadata={"format": "pt"})
    save_file(expected, folder / "expected.safetensors", metadata={"format": "pt"})
    relative = lambda path: str(path.relative_to(root))  # noqa: E731
    return {"name": case.name, "base": f"bases/{case.base}", "adapter": relative(adapter),
            "adapter_name": case.adapter_name, "adapter_dtype": case.dtype, "features": list(case.features),
            "requirements": list(case.requirements), "inputs": relative(folder / "inputs.safetensors"),
            "expected": relative(folder / "expected.safetensors"), "outputs": list(OUTPUTS),
            "tolerance": "golden", "config": case.config, "note": case.note}


def _same_files(old: Path, new: Path) -> bool:
    """The same file names and bytes, except adapter_config.json compared as JSON with target_modules as a set: peft
    writes that set in the order of the interpreter's string hashing, which changes from one process to the next."""
    names = sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file()):
        return False
    for name in names:
        if name.name == "adapter_config.json":
            configs = [json.loads((folder / name).read_text()) for folder in (old, new)]
            for config in configs:
                if isinstance(config.get("target_modules"), list):
                    config["target_modules"] = sorted(config["target_modules"])
            if configs[0] != configs[1]:
                return False
        elif (old / name).read_bytes() != (new / name).read_bytes():
            return False
    return True


def _keep_an_earlier_recording(entry: dict, root: Path, earlier: Path) -> None:
    """A case that the newest earlier version recorded alike keeps that version's files, so that the store (which
    keeps each content once) does not keep it twice. Alike: the same manifest entry, base, inputs and adapter, and
    outputs within the golden tolerance: recorded again on another CPU, float32 logits move by about 1e-7."""
    from .. import spec

    for version in reversed(golden.versions(earlier)):
        old_root = earlier / version
        old = {e["name"]: e for e in json.loads((old_root / MANIFEST).read_text())["cases"]}.get(entry["name"])
        if old is None:
            continue
        old_case, new_case = old_root / "cases" / entry["name"], root / "cases" / entry["name"]
        alike = (old == entry and _same_files(old_root / old["base"], root / entry["base"])
                 and _same_files(old_case / "adapter", new_case / "adapter")
                 and (old_case / "inputs.safetensors").read_bytes() == (new_case / "inputs.safetensors").read_bytes())
        if alike:
            tolerance = spec.tolerances()["golden"]
            old_out, new_out = (load_file(case / "expected.safetensors") for case in (old_case, new_case))
            alike = old_out.keys() == new_out.keys() and all(
                torch.allclose(old_out[k], new_out[k], rtol=tolerance.rtol, atol=tolerance.atol) for k in old_out)
        if alike:
            shutil.rmtree(new_case)
            shutil.copytree(old_case, new_case)
        return


def _write_version(root: Path, version: str, earlier: Optional[Path] = None) -> None:
    """Version `version` of the corpus into `root`; `earlier`: the folder of the versions recorded before it."""
    from .. import spec

    bases = {name: _write_base(name, root / "bases" / name) for name in sorted({c.base for c in CASES
                                                                                 if c.kind == "causal_lm"})}
    entries = [_write_case(case, bases[case.base], root) for case in CASES if case.kind == "causal_lm"]
    diffusion = [case for case in CASES if case.kind == "diffusion"]
    if diffusion:
        pipeline = diffusion_cases.write_base(root / "bases" / diffusion_cases.BASE)
        entries += [diffusion_cases.write_case(case, pipeline, root) for case in diffusion]
    tolerance = spec.tolerances()["golden"]
    manifest = {"schema": SCHEMA, "corpus_version": version, "producer": golden.producers(),
                "tolerances": {"golden": {"rtol": tolerance.rtol, "atol": tolerance.atol,
                                          "description": tolerance.description}},
                "outputs": {"unmerged": "logits (a denoiser's output) with the adapter applied as loaded (scale 1)",
                            "merged": "the same after merging the adapter into the base weights",
                            "disabled": "the base model's (the adapter disabled, or applied with scale 0)",
                            "weighted": "the adapter applied with weight adapter_weight: every module's scaling times "
                                        "it (diffusers' set_adapters weights, peft's set_scale)"},
                "cases": entries}
    for entry in entries if earlier and earlier.is_dir() else []:
        _keep_an_earlier_recording(entry, root, earlier)
    problems = validation_errors(manifest)
    if problems:
        raise ValueError(f"the manifest written does not follow its own schema: {problems[:3]}")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def generate(folder: Optional[Path] = None) -> str:
    """Record the next corpus version with the installed peft (two runs must write identical bytes)."""
    with golden.editable(folder or golden.source()) as fixtures:
        corpus = fixtures / "corpus"
        return golden.record_version(corpus, lambda root, version: _write_version(root, version, corpus), fixtures)
