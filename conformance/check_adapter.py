"""check-adapter: is a directory a PEFT LoRA adapter that peft would load and compute with as intended?

Checks the files, the config, every key and shape against a base model, then computes with the adapter in
reference_impl and in peft (when installed). Each finding has a level, a stable code and a message.
"""

import copy
import importlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from reference_impl import LoraConfig
from reference_impl import save_load as files
from reference_impl.config import PEFT_ONLY_FIELDS
from reference_impl.layers import make_lora_layer
from reference_impl.targeting import matches_target, pattern_value, resolve_targets

from . import models
from .foreign import identify

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<path>.+?)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                      r"lora_embedding_B|lora_magnitude_vector)$")
NAMED_KEY = re.compile(r"\.(lora_A|lora_B)\.(?P<name>[^.]+)\.(weight|bias)$|\.(lora_embedding_[AB])\.(?P<emb>[^.]+)$")


@dataclass
class Finding:
    level: str  # error | warning | info
    code: str
    message: str


class Report(list):
    def add(self, level: str, code: str, message: str) -> None:
        self.append(Finding(level, code, message))

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self)

    def to_json(self) -> dict:
        return {"ok": self.ok, "findings": [asdict(f) for f in self]}


def build_base(spec: str) -> tuple[torch.nn.Module, Optional[dict]]:
    """A zoo model by name, or `module:factory` returning a model (inputs are then token ids if it has a vocab)."""
    if spec in models.ZOO:
        return models.build(spec), models.inputs(spec, 0)
    module, _, attr = spec.partition(":")
    try:
        model = getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"--base {spec!r}: not a zoo model ({', '.join(models.ZOO)}) nor an importable "
                         f"module:factory ({error})") from None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    inputs = {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))} \
        if vocab else None
    return model.eval(), inputs


def check(directory, base: str = "gpt2-tiny", allow_pickle: bool = False) -> Report:
    report = Report()
    directory = Path(directory)
    if not directory.exists():
        report.add("error", "path.missing", f"{directory}: no such file or directory")
        return report
    foreign = identify(directory)
    if foreign is not None:  # one verdict: what wrote it and what to do; its symptoms would only repeat that
        report.add("error", "format.foreign", foreign.message(directory))
        return report
    if directory.is_file():
        report.add("error", "path.file", f"{directory} is a file; a peft adapter is a directory holding "
                   f"{files.CONFIG_NAME} and {files.WEIGHTS_NAME}")
        return report
    config = _check_config(directory, report)
    tensors = _check_weights(directory, report, allow_pickle)
    if config is None or tensors is None:
        return report
    model, inputs = build_base(base)
    _check_keys(tensors, config, model, report)
    if report.ok and inputs is not None:
        try:
            _check_numbers(directory, base, inputs, report, allow_pickle)
        except (ValueError, RuntimeError, FileNotFoundError) as error:  # what loading itself refuses
            report.add("error", "numbers.load", f"loading the adapter failed: {error}")
    return report


def _check_config(directory: Path, report: Report) -> Optional[LoraConfig]:
    path = directory / files.CONFIG_NAME
    if not path.is_file():
        report.add("error", "config.missing", f"{path}: no {files.CONFIG_NAME}")
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        report.add("error", "config.json", f"{path}: not valid JSON ({error})")
        return None
    if not isinstance(raw, dict):
        report.add("error", "config.json", f"{path}: expected a JSON object, got {type(raw).__name__}")
        return None
    for key in ("alpha", "scale", "lora_scale", "scaling"):
        if key in raw:
            report.add("error", "config.scale", f"{path}: has {key!r}; peft reads lora_alpha and computes "
                       f"scaling = lora_alpha / r, so a scale s must be written as lora_alpha = s * r")
    if "peft_type" not in raw:
        report.add("error", "config.peft_type", f"{path}: no peft_type; peft refuses the file "
                   "(an AdapterHub or other tool's config?)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            report.add("warning", "config.default", f"{path}: no {key}; peft uses its default")
    known = set(LoraConfig.__dataclass_fields__) | set(PEFT_ONLY_FIELDS)
    for key in sorted(set(raw) - known - {"alpha", "scale", "lora_scale", "scaling"}):
        report.add("warning", "config.unknown-key", f"{path}: unknown key {key!r}, which peft ignores")
    try:
        return LoraConfig.from_dict({k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as error:
        report.add("error", "config.value", f"{path}: {error}")
        return None


def _check_weights(directory: Path, report: Report, allow_pickle: bool) -> Optional[dict]:
    try:
        tensors = files.read_weights(directory, allow_pickle)
    except (FileNotFoundError, ValueError) as error:
        report.add("error", "weights.unreadable", str(error))
        return None
    if not tensors:
        report.add("error", "weights.empty", f"{directory / files.WEIGHTS_NAME}: holds no tensors")
        return None
    return tensors


def _expected_shapes(module, r: int) -> dict[str, tuple]:
    layer = make_lora_layer(module)
    if layer is None:
        return {}
    if hasattr(layer, "lora_embedding_A"):
        return {"lora_embedding_A": (r, layer.in_features), "lora_embedding_B": (layer.out_features, r)}
    A, B = layer.make_factors(r, lora_bias=True)
    return {"lora_A.weight": tuple(A.weight.shape), "lora_B.weight": tuple(B.weight.shape),
            "lora_B.bias": tuple(B.bias.shape)}


def _check_keys(tensors: dict, config: LoraConfig, model: torch.nn.Module, report: Report) -> None:
    named = sorted(k for k in tensors if NAMED_KEY.search(k))
    if named:
        report.add("error", "keys.adapter-name", f"keys keep the adapter name (e.g. {named[0]}): peft saves "
                   "'lora_A.weight', not 'lora_A.<adapter>.weight', and will not load these")
        return
    unprefixed = sorted(k for k in tensors if not k.startswith(PREFIX))
    if unprefixed:
        report.add("error", "keys.prefix", f"keys without the '{PREFIX}' prefix (e.g. {unprefixed[0]}): "
                   "PeftModel.from_pretrained reports them all missing")
        return
    resolved = copy.deepcopy(config)
    resolve_targets(model, resolved)
    modules = dict(model.named_modules())
    seen = set()
    for key in sorted(tensors):
        match = LORA_KEY.match(key.removeprefix(PREFIX))
        if not match:
            continue
        path, name = match["path"], match["tensor"]
        seen.add(path)
        if path not in modules:
            report.add("error", "keys.no-module", f"{key}: the base model has no module {path!r}")
            continue
        r = pattern_value(path, config.rank_pattern, config.r)
        expected = _expected_shapes(modules[path], r).get(name)
        found = tuple(tensors[key].shape)
        if expected is None:
            report.add("error", "keys.unsupported", f"{key}: {type(modules[path]).__name__} takes no {name}")
        elif found != expected:
            transposed = found == expected[::-1]
            report.add("error", "shape.transposed" if transposed else "shape.mismatch",
                       f"{key}: shape {found}, peft expects {expected} for r={r}"
                       + (" (the factor is transposed, as mlx-lm stores it)" if transposed else ""))
        if not matches_target(path, resolved):
            report.add("warning", "keys.not-targeted", f"{key}: target_modules {config.target_modules!r} does not "
                       f"select {path!r}, so peft creates no adapter there and ignores the tensor")
    targeted = [p for p in modules if p and matches_target(p, resolved) and make_lora_layer(modules[p]) is not None]
    for path in targeted:
        if path not in seen:
            report.add("error", "keys.missing", f"target_modules selects {path!r} but the file has no tensors for "
                       "it: peft warns and keeps a random initialisation there")


def _check_numbers(directory: Path, base: str, inputs: dict, report: Report, allow_pickle: bool) -> None:
    """Load the adapter in reference_impl and in peft on the same base; both must compute the same."""
    import warnings

    import reference_impl

    def output(model):
        with torch.no_grad():
            result = model(**inputs)
        return models.output_tensor(result).float()

    base_output = output(build_base(base)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = output(reference_impl.PeftModel.from_pretrained(build_base(base)[0], directory,
                                                               allow_pickle=allow_pickle, ignore_unknown_keys=True))
    effect = (ours - base_output).abs().max().item()
    if effect == 0:
        report.add("warning", "numbers.no-op", "the adapter does not change the output (all lora_B zero?)")
    report.add("info", "numbers.effect", f"largest change the adapter makes to the output: {effect:.3g}")
    try:
        import peft
    except ImportError:
        report.add("info", "numbers.no-peft", "peft is not installed: not compared with peft")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = output(peft.PeftModel.from_pretrained(build_base(base)[0], str(directory)).eval())
        except Exception as error:  # peft refusing the directory is itself the finding
            report.add("error", "numbers.peft-load", f"peft {peft.__version__} cannot load it: {error}")
            return
    diff = (ours - theirs).abs().max().item()
    level = "info" if diff <= 1e-5 + 1.3e-6 * theirs.abs().max().item() else "error"
    report.add(level, "numbers.peft",
               f"reference_impl and peft {peft.__version__} outputs differ by at most {diff:.3g}")
