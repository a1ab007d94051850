"""check-adapter: is a directory a PEFT LoRA adapter that peft would load and compute with as intended?

Checks the files, the config, every key and shape against a base model, then computes with the adapter in
reference_impl and in peft (when installed). Each finding has a level, a stable code and a message.
"""

import copy
import importlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from reference_impl import (
    METHODS,
    PEFT_ONLY_FIELDS,
    LoraConfig,
    PeftModel,
    make_lora_layer,
    matches_target,
    pattern_value,
    read_weights,
    resolve_targets,
    unmatched_pattern_keys,
    with_task_heads,
)
from reference_impl.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, keeps_adapter_name, split_key
from reference_impl.save_load import adapter_state_dict, module_path

from ..zoo import models, quantized
from . import diffusion_check
from .foreign import identify


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


FORMS = ("a zoo model name ({zoo}), a model directory holding config.json (weights optional), or module:factory "
         "(an import path and a function returning the model)")


@dataclass
class Base:
    """The model an adapter is checked against: built fresh by `make`, with inputs when it has weights."""

    label: str
    make: object  # () -> nn.Module
    inputs: Optional[dict]

    @property
    def has_weights(self) -> bool:
        return self.inputs is not None


def base_from(spec: str) -> Base:
    """A zoo model by name, a model directory as transformers writes it, or `module:factory`."""
    if spec in models.ZOO:
        return Base(f"zoo model {spec}", lambda: models.build(spec), models.inputs(spec, 0))
    if Path(spec).is_dir():
        return _directory_base(Path(spec))
    module, colon, attr = spec.partition(":")
    if not colon:
        raise ValueError(f"--base {spec!r}: not a zoo model nor a directory; expected "
                         + FORMS.format(zoo=", ".join(models.ZOO)))

    def seeded():  # an unseeded factory would give peft and reference_impl two different random bases
        torch.manual_seed(0)
        return getattr(importlib.import_module(module), attr)().eval()

    try:
        model = seeded()
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"--base {spec!r}: not an importable module:factory ({error}); expected "
                         + FORMS.format(zoo=", ".join(models.ZOO))) from None
    return Base(spec, seeded, _token_inputs(model))


def _token_inputs(model) -> Optional[dict]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))} if vocab else None


def _directory_base(folder: Path) -> Base:
    """config.json names the architecture; with weights the model is loaded, without them built on the meta device
    (shapes only: every key and shape is still checked, the adapter's effect is not computed)."""
    import transformers

    try:
        model_class = models.class_of_directory(folder)
    except ValueError as error:
        raise ValueError(f"--base {error}") from None
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        # A QLoRA base (a quantization_config in config.json) loads quantized, as its users load it.
        make = lambda: quantized.without_cpu_repacking(model_class.from_pretrained(folder)).eval()  # noqa: E731
        return Base(str(folder), make, _token_inputs(make()))

    def on_meta():
        with torch.device("meta"):
            return model_class(transformers.AutoConfig.from_pretrained(folder))
    return Base(f"{folder} (config only, on the meta device)", on_meta, None)


# Methods reference_impl implements besides LoRA, whose files this LoRA checker does not judge.
OTHER_METHODS = tuple(peft_type for peft_type in METHODS if peft_type != "LORA")


def check(directory, base: str = "gpt2-tiny", allow_pickle: bool = False) -> Report:
    report = Report()
    directory = Path(directory)
    if not directory.exists():
        report.add("error", "path.missing", f"{directory}: no such file or directory")
        return report
    foreign = identify(directory)
    pipeline = diffusion_check.diffusion_bases(base)
    layout = None if foreign is None else "kohya" if foreign.tool.startswith("kohya") else foreign.tool
    if layout in ("kohya", "diffusers") and pipeline is not None:
        return diffusion_check.check(directory, pipeline, report, layout)
    if foreign is not None:  # one verdict: what wrote it and what to do; its symptoms would only repeat that
        report.add("error", "format.foreign", foreign.message(directory))
        return report
    if directory.is_file():
        report.add("error", "path.file", f"{directory} is a file; a peft adapter is a directory holding "
                   f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        return report
    config = _check_config(directory, report)
    tensors = _check_weights(directory, report, allow_pickle)
    if config is None or tensors is None:
        return report
    base_model = base_from(base)
    model = base_model.make()
    _check_keys(tensors, config, model, base_model.label, report)
    _check_settings(config, model, report)
    if not base_model.has_weights:
        report.add("info", "numbers.no-weights", f"{base_model.label}: no weights, so the adapter's effect is not "
                   "computed; every key and shape was checked")
    elif report.ok:
        try:
            _check_numbers(directory, base_model, report, allow_pickle)
        except (ValueError, RuntimeError, FileNotFoundError) as error:  # what loading itself refuses
            report.add("error", "numbers.load", f"loading the adapter failed: {error}")
    return report


def _check_config(directory: Path, report: Report) -> Optional[LoraConfig]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        report.add("error", "config.missing", f"{path}: no {CONFIG_NAME}")
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        report.add("error", "config.json", f"{path}: not valid JSON ({error})")
        return None
    if not isinstance(raw, dict):
        report.add("error", "config.json", f"{path}: expected a JSON object, got {type(raw).__name__}")
        return None
    if raw.get("peft_type") in OTHER_METHODS:
        report.add("error", "config.method", f"{path}: a {raw['peft_type']} adapter; check-adapter checks LoRA "
                   "adapters only (reference_impl and the suite cover IA3, LoHa and LoKr: load it with "
                   "reference_impl.PeftModel.from_pretrained, or run the suite with a driver)")
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
    fields = {k: v for k, v in raw.items() if k in known}
    for name in ("rank_pattern", "alpha_pattern"):  # every bad entry, not only the first
        if isinstance(fields.get(name), dict):
            fields[name] = {key: value for key, value in fields[name].items()
                            if _pattern_entry_ok(path, name, key, value, report)}
    try:
        return LoraConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        report.add("error", "config.value", f"{path}: {error}")
        return None


def _pattern_entry_ok(path: Path, name: str, key, value, report: Report) -> bool:
    wanted = "a positive integer rank" if name == "rank_pattern" else "a positive number"
    try:
        re.compile(key)
    except (re.error, TypeError) as error:
        report.add("error", "config.pattern", f"{path}: {name} key {key!r} is not a regular expression ({error})")
        return False
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or value <= 0 or (name == "rank_pattern" and not isinstance(value, int)):
        report.add("error", "config.pattern", f"{path}: {name}[{key!r}] = {value!r}; expected {wanted}")
        return False
    return True


def _check_weights(directory: Path, report: Report, allow_pickle: bool) -> Optional[dict]:
    try:
        tensors = read_weights(directory, allow_pickle)
    except (FileNotFoundError, ValueError) as error:
        report.add("error", "weights.unreadable", str(error))
        return None
    if not tensors:
        report.add("error", "weights.empty", f"{directory / WEIGHTS_NAME}: holds no tensors")
        return None
    return tensors


def _check_keys(tensors: dict, config: LoraConfig, model: torch.nn.Module, label: str, report: Report) -> None:
    named = sorted(k for k in tensors if keeps_adapter_name(k))
    if named:
        report.add("error", "keys.adapter-name", f"keys keep the adapter name (e.g. {named[0]}): peft saves "
                   "'lora_A.weight', not 'lora_A.<adapter>.weight', and will not load these")
        return
    unprefixed = sorted(k for k in tensors if not k.startswith(PREFIX))
    if unprefixed:
        report.add("error", "keys.prefix", f"keys without the '{PREFIX}' prefix (e.g. {unprefixed[0]}): "
                   "PeftModel.from_pretrained reports them all missing")
        return
    modules = dict(model.named_modules())
    lora = {k: split_key(k.removeprefix(PREFIX)) for k in tensors}
    paths = {m[0] for m in lora.values() if m}
    if paths and not paths & set(modules):
        report.add("error", "keys.inert", _inert_message(sorted(paths), modules, label))
        return
    resolved = copy.deepcopy(config)
    resolve_targets(model, resolved)
    expected = _expected_shapes(config, model)
    for key in sorted(set(tensors) & set(expected)):
        _check_shape(key, tuple(tensors[key].shape), expected[key], pattern_value(
            module_path(key.removeprefix(PREFIX)), config.rank_pattern, config.r), report)
    for key in sorted(k for k, m in lora.items() if m and k not in expected):
        _check_lora_key(key, *lora[key], tensors[key], config, resolved, modules, report)
    unexplained = [k for k in tensors if k not in expected]
    _check_unplaced({k: tensors[k] for k in unexplained}, config, {k: lora[k] for k in unexplained}, modules, report)
    for path in sorted({module_path(k.removeprefix(PREFIX)) for k in set(expected) - set(tensors)}):
        report.add("error", "keys.missing", f"the config selects {path!r} but the file has no tensors for it: peft "
                   "warns and keeps a random initialisation there")


def _expected_shapes(config: LoraConfig, model: torch.nn.Module) -> dict[str, tuple]:
    """The adapter's own tensors (key -> shape) for this config on this base, as reference_impl builds them on a
    copy (on the meta device when the base has no weights): LoRA factors, also on target_parameters and
    nn.MultiheadAttention, and trainable tokens. Full tensors (modules_to_save copies, base weights) are checked
    against the base instead (_check_unplaced). Empty when reference_impl refuses the config; each key is then
    explained on its own."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = PeftModel(copy.deepcopy(model), copy.deepcopy(config), initialize=False)
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return {}
    return {key: tuple(tensor.shape) for key, tensor in adapter_state_dict(wrapped).items()
            if ".lora_" in key or ".token_adapter." in key}


def _check_shape(key: str, found: tuple, expected: tuple, r: int, report: Report) -> None:
    if found != expected:
        transposed = found == expected[::-1]
        report.add("error", "shape.transposed" if transposed else "shape.mismatch",
                   f"{key}: shape {found}, peft expects {expected} for r={r}"
                   + (" (the factor is transposed: stored (in, r) / (r, out), not peft's (r, in) / (out, r))"
                      if transposed else ""))


def _inert_message(paths: list[str], modules: dict, label: str) -> str:
    """One finding for an adapter that fits nothing: say where its keys point and what the base holds."""
    example = paths[0]
    tail = ".".join(example.split(".")[-3:])
    near = [name for name in modules if name.endswith(tail)]
    hint = (f"; the base has {near[0]!r}: the keys' prefix differs ('{PREFIX}{example}' would have to be "
            f"'{PREFIX}{near[0]}')" if near else "")
    return (f"none of the adapter's {len(paths)} adapted module paths (e.g. {example!r}) is a module of {label}: "
            f"loaded onto it the adapter would silently do nothing{hint}. If the adapter belongs to another model, "
            "--base is probably wrong: give the model it was trained on as --base, one of "
            + FORMS.format(zoo=", ".join(models.ZOO)))


def _check_lora_key(key, path, name, tensor, config, resolved, modules, report) -> None:
    if path not in modules:
        report.add("error", "keys.no-module", f"{key}: the base model has no module {path!r}")
        return
    r = pattern_value(path, config.rank_pattern, config.r)
    layer = make_lora_layer(modules[path])
    expected = layer.factor_shapes(r).get(name) if layer is not None else None
    if expected is None:
        report.add("error", "keys.unsupported", f"{key}: {type(modules[path]).__name__} takes no {name}")
    else:
        _check_shape(key, tuple(tensor.shape), expected, r, report)
    if name == "lora_B.bias" and not config.lora_bias:
        report.add("error", "keys.unplaced", f"{key}: a lora_B bias while adapter_config.json has lora_bias false: "
                   "peft and reference_impl drop it, so the adapter computes without the bias its writer trained "
                   "(set \"lora_bias\": true if the writer meant it)")
    if not matches_target(path, resolved):
        report.add("warning", "keys.not-targeted", f"{key}: target_modules {config.target_modules!r} does not "
                   f"select {path!r}, so peft creates no adapter there and ignores the tensor")


def _check_unplaced(tensors: dict, config: LoraConfig, lora: dict, modules: dict, report: Report) -> None:
    """Full tensors (not LoRA factors): modules_to_save copies, saved base weights of adapted embeddings, biases of
    bias='all'/'lora_only'. Each is shape-checked against the base; one the config gives no place for is a finding."""
    saved = with_task_heads(config, config.task_type).modules_to_save or []
    resized = []
    for key in sorted(k for k, m in lora.items() if not m):
        name = key.removeprefix(PREFIX)
        module_path, _, param = name.replace(".base_layer.", ".").rpartition(".")
        if module_path not in modules or not hasattr(modules[module_path], param):
            report.add("error", "keys.no-module", f"{key}: the base model has no parameter {name!r}")
            continue
        base_shape = tuple(getattr(modules[module_path], param).shape)
        in_saved = any(module_path.endswith(entry) for entry in saved)
        if tuple(tensors[key].shape) != base_shape:
            (resized if in_saved else []).append(key)
            report.add("error", "shape.mismatch", f"{key}: shape {tuple(tensors[key].shape)}, the base's "
                       f"{module_path}.{param} is {base_shape}")
            continue
        placed = in_saved or ".base_layer." in name or (param == "bias" and config.bias != "none")
        if not placed:
            report.add("warning", "keys.unplaced", f"{key}: a full tensor for {module_path!r}, which is not in "
                       "modules_to_save: peft copies it into the frozen base parameter (LORA-LOAD-007), other "
                       "consumers skip or refuse it; list the module in modules_to_save if the writer meant it")
    if resized:
        report.add("error", "base.resize", f"{len(resized)} modules_to_save tensor(s) do not fit the base "
                   f"({', '.join(resized)}): the vocabulary was resized when training; resize the base first "
                   "(model.resize_token_embeddings(n)) to the adapter's size")


def _check_settings(config: LoraConfig, model: torch.nn.Module, report: Report) -> None:
    """Settings consumers commonly ignore (measured on the consumer corpus, docs/consumers.md): said, not failed."""
    scale = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    if config.use_rslora:
        report.add("warning", "consumer.rslora", f"use_rslora: scaling = lora_alpha / sqrt(r) = {scale:.4g}; a "
                   f"consumer that computes lora_alpha / r applies {config.lora_alpha / config.r:.4g} instead "
                   "(llama.cpp's converter does)")
    resolved = copy.deepcopy(config)
    resolve_targets(model, resolved)
    targeted = [p for p in dict(model.named_modules()) if p and matches_target(p, resolved)]
    ignored_by = {"rank_pattern": "; one that takes the rank from the tensors' shapes gets it right (llama.cpp does)",
                  "alpha_pattern": " (llama.cpp's converter writes one lora_alpha for all modules)"}
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, name)
        if patterns:
            changed = [p for p in targeted if pattern_value(p, patterns, None) is not None]
            report.add("warning", f"consumer.{name.replace('_', '-')}", f"{name} changes {len(changed)} of "
                       f"{len(targeted)} adapted modules (e.g. {changed[:2]}); a consumer that reads only r and "
                       f"lora_alpha computes those with the wrong scaling{ignored_by[name]}")
            for key in unmatched_pattern_keys(patterns, targeted):
                report.add("warning", "config.pattern-unused", f"{name} key {key!r} matches no adapted module")
    if config.use_dora:
        report.add("warning", "consumer.dora", "use_dora: the output is rescaled per row by the magnitude vector; "
                   "consumers without DoRA refuse the adapter (llama.cpp's converter) or ignore the magnitude")
    if config.modules_to_save:
        report.add("warning", "consumer.modules-to-save", f"modules_to_save {config.modules_to_save}: full copies of "
                   "these modules replace the base's while the adapter is active; LoRA-only consumers refuse or "
                   "skip them (llama.cpp's converter refuses)")


def _check_numbers(directory: Path, base: Base, report: Report, allow_pickle: bool) -> None:
    """Load the adapter in reference_impl and in peft on the same base; both must compute the same."""
    import warnings

    import reference_impl

    def output(model):
        with torch.no_grad():
            result = model(**base.inputs)
        return models.output_tensor(result).float()

    base_output = output(base.make())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what loading warns about was found above, as findings
        ours = output(reference_impl.PeftModel.from_pretrained(base.make(), directory, allow_pickle=allow_pickle,
                                                               ignore_unknown_keys=True))
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
            theirs = output(peft.PeftModel.from_pretrained(base.make(), str(directory)).eval())
        except Exception as error:  # peft refusing the directory is itself the finding
            report.add("error", "numbers.peft-load", f"peft {peft.__version__} cannot load it: {error}")
            return
    diff = (ours - theirs).abs().max().item()
    level = "info" if diff <= 1e-5 + 1.3e-6 * theirs.abs().max().item() else "error"
    report.add(level, "numbers.peft",
               f"reference_impl and peft {peft.__version__} outputs differ by at most {diff:.3g}")
