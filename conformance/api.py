"""The driver protocol: what an implementation provides so that the suite can run it.

A driver is any object with the members of `Driver`. Register it under the entry-point group
`peft_conformance.implementations`, or name it as `module:attr` or `path/to/file.py:attr` (a driver object, or a
class or factory that returns one). Configs are plain dicts with peft's LoraConfig field names, so a driver never
needs peft. The models the suite hands a driver are plain torch / transformers models, never peft's.

Two optional members say what a driver covers and how it stores adapters (docs/plug-in-your-library.md):
- `supports(model, config) -> str | None`: None when the driver can run this config on this base model, else the
  reason it cannot. The model is a copy of the case's base on the run's device and in its dtype, so a driver that
  does not run half precision (or CUDA) says so here. Examples outside the scope are not drawn; a requirement with
  none inside is "not applicable".
- `layout`: an object with `to_driver(model, tensors)` and `to_peft(model, tensors)` that map peft-keyed adapter
  tensors to the driver's own keys and shapes and back. With it, adapter_state_dict and load_adapter_state_dict
  use the driver's layout, and the suite compares through the mapping. `to_peft` raises NoExactMapping where the
  driver's tensors have no peft equivalent.
- `add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank=None)`: peft's
  LoraModel.add_weighted_adapter; needed for the capability "weighted_adapter".
"""

import importlib
import importlib.util
import sys
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn

ENTRY_POINT_GROUP = "peft_conformance.implementations"

# What a driver may declare. A test that needs an undeclared capability reports "not applicable".
CAPABILITIES = {
    "autograd": "gradients reach the adapter tensors through torch autograd (adapter_state_dict returns them live)",
    "linear": "torch.nn.Linear layers",
    "conv1d": "transformers' GPT-2 Conv1D layers (weights stored in, out)",
    "embedding": "torch.nn.Embedding layers",
    "conv2d": "torch.nn.Conv2d layers",
    "multihead_attention": "torch.nn.MultiheadAttention layers (in-projection and out_proj adapted together)",
    "bnb_4bit": "bitsandbytes Linear4bit layers (QLoRA: NF4 / FP4, double quantization; the adapter beside the "
                "quantized weight, merged by dequantizing and quantizing again)",
    "bnb_8bit": "bitsandbytes Linear8bitLt layers (int8 weights, as above)",
    "dora": "use_dora (weight-decomposed LoRA)",
    "rslora": "use_rslora (scaling alpha / sqrt(r))",
    "dropout": "lora_dropout in train mode, drawing the same mask as peft for the same torch seed",
    "init_rng": "initial A and B bit-identical to peft's for the same torch seed",
    "init_variants": "init_lora_weights=False and 'gaussian' (True is always required)",
    "patterns": "rank_pattern / alpha_pattern",
    "layers": "layers_to_transform / layers_pattern",
    "regex_targets": "target_modules / exclude_modules given as a regex string, and 'all-linear'",
    "bias": "bias='all' / 'lora_only'",
    "lora_bias": "lora_bias=True (a bias on lora_B)",
    "modules_to_save": "modules_to_save",
    "multi_adapter": "add_adapter / set_adapter / delete_adapter",
    "mixed_batch": "model(**inputs, adapter_names=[...]) runs each row of a batch through its own adapter ('__base__': "
                   "none), in eval mode",
    "trainable_tokens": "trainable_token_indices: selected embedding rows trained (tied output layers included)",
    "target_parameters": "target_parameters: LoRA on bare 2-d and 3-d (expert) nn.Parameters",
    "weighted_adapter": "the driver's add_weighted_adapter member, combination types linear, cat and svd",
    "disable": "disable_adapter() context",
    "merge": "merge / unmerge / merge_and_unload",
    "unload": "unload() without merging",
    "save_load": "save / load in peft's directory format",
    "cuda": "runs on CUDA devices",
    # Methods besides LoRA, chosen by the config's peft_type (a driver without them sees only LoRA configs).
    "ia3": "IA3 (peft_type 'IA3'): learned vectors rescaling activations",
    "loha": "LoHa (peft_type 'LOHA'): a Hadamard product of two low-rank products",
    "lokr": "LoKr (peft_type 'LOKR'): a Kronecker product of two factors",
}


@runtime_checkable
class Driver(Protocol):
    """The members a driver provides. `model(**inputs)` (the model's own __call__) is the forward pass. A config
    dict's "peft_type" names the method ("LORA" when absent; "IA3", "LOHA", "LOKR" for a driver declaring them),
    its other keys are that method's peft config fields."""

    name: str
    version: str
    capabilities: frozenset[str]

    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> nn.Module:
        """Inject adapter `adapter_name` built from `config` (adapter_config.json fields) into `model`."""

    def add_adapter(self, model: nn.Module, config: dict, adapter_name: str) -> None:
        """Add another adapter, inactive and frozen."""

    def set_adapter(self, model: nn.Module, adapter_name: str) -> None: ...

    def delete_adapter(self, model: nn.Module, adapter_name: str) -> None: ...

    def disable_adapter(self, model: nn.Module) -> AbstractContextManager:
        """Inside the block the model computes as its base model."""

    def adapter_state_dict(self, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The live parameters (so .grad is readable), keyed exactly as peft saves them:
        PREFIX + "<module path>.lora_A.weight" (reference_impl.peft_format), no adapter name."""

    def load_adapter_state_dict(self, model: nn.Module, state_dict: dict, adapter_name: str = "default") -> None:
        """Set the adapter's values from a dict keyed as adapter_state_dict is."""

    def save(self, model: nn.Module, directory: str, adapter_name: str = "default") -> None:
        """Write the adapter as peft's save_pretrained(directory, selected_adapters=[adapter_name]) does:
        adapter_model.safetensors and adapter_config.json, in `directory`, or in `directory/<adapter_name>`
        for a name other than "default"."""

    def load(self, base_model: nn.Module, directory: str, adapter_name: str = "default",
             is_trainable: bool = False) -> nn.Module:
        """Wrap `base_model` with the adapter stored in `directory` (the folder holding the two files)."""

    def merge(self, model: nn.Module) -> None: ...

    def unmerge(self, model: nn.Module) -> None: ...

    def merge_and_unload(self, model: nn.Module) -> nn.Module: ...

    def unload(self, model: nn.Module) -> nn.Module: ...

    def trainable_parameters(self, model: nn.Module) -> tuple[int, int]:
        """(trainable, total) as peft counts them: numel over named_parameters(), tied weights once."""


class Layout(Protocol):
    """How a driver's adapter tensors relate to peft's saved ones (the optional `layout` member of a driver)."""

    def to_driver(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft-keyed tensors -> the driver's own, computing the same function. Written with torch operations,
        so that the suite can carry gradients back to peft's layout through it."""

    def to_peft(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The driver's own tensors -> peft-keyed ones; raises NoExactMapping where none exists."""


class NoExactMapping(ValueError):
    """A driver's tensors that peft's layout cannot hold (for example three different copies of a shared factor).
    The requirement being checked reports it by name instead of comparing."""


def supports(driver, model: nn.Module, config: dict) -> Optional[str]:
    """Why `driver` cannot run `config` on `model` by its own `supports` hook, or None (no hook: everything)."""
    hook = getattr(driver, "supports", None)
    return hook(model, config) if hook is not None else None


def base_quantizer(driver) -> str:
    """What quantizes a quantized base when the driver does it with its own code instead of computing with the
    base's bitsandbytes layers (its optional `base_quantizer` member, e.g. "torchao NF4"), else "". The QLORA
    requirements then compare what the adapter adds to the driver's own base, not the outputs themselves."""
    return getattr(driver, "base_quantizer", "") or ""


def layout_of(driver) -> Optional[Layout]:
    """The driver's layout mapping, or None when it keeps peft's layout."""
    return getattr(driver, "layout", None)


DRIVER_MEMBERS = ("name", "version", "capabilities", "wrap", "add_adapter", "set_adapter", "delete_adapter",
                  "disable_adapter", "adapter_state_dict", "load_adapter_state_dict", "save", "load", "merge",
                  "unmerge", "merge_and_unload", "unload", "trainable_parameters")

# The members only a capability entitles a test to call; the others (wrap, adapter_state_dict,
# load_adapter_state_dict, trainable_parameters, the optional hooks) every driver has.
MEMBERS_OF_CAPABILITY = {
    "multi_adapter": ("add_adapter", "set_adapter", "delete_adapter"),
    "disable": ("disable_adapter",),
    "save_load": ("save", "load"),
    "merge": ("merge", "unmerge", "merge_and_unload"),
    "unload": ("unload",),
    "weighted_adapter": ("add_weighted_adapter",),
}
GATED_MEMBERS = frozenset(m for members in MEMBERS_OF_CAPABILITY.values() for m in members)


def members_entitled(capabilities) -> frozenset[str]:
    """The gated members a test may call when its requirements need `capabilities`."""
    return frozenset(m for c in capabilities for m in MEMBERS_OF_CAPABILITY.get(c, ()))


# The drivers shipped here, also usable from a checkout that is not installed (PYTHONPATH=.).
BUILTIN_DRIVERS = {
    "reference": "conformance.drivers.reference:ReferenceDriver",
    "peft": "conformance.drivers.peft:PeftDriver",
    "loralib": "conformance.drivers.loralib:LoralibDriver",
    "torchtune": "conformance.drivers.torchtune:TorchtuneDriver",
    "mlx": "conformance.drivers.mlx:MlxDriver",
    "lycoris": "conformance.drivers.lycoris:LycorisDriver",
}


def available_drivers() -> dict[str, str]:
    """Driver names and the `module:attr` each points to: the shipped ones and the registered ones."""
    return {**BUILTIN_DRIVERS, **{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}}


def load_driver(spec: str) -> Driver:
    """A driver from a registered name ("reference"), a `module:attr` path or a `path/to/file.py:attr`.
    Raises ValueError otherwise."""
    registered = available_drivers()
    target = registered.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown implementation {spec!r}: registered drivers are {sorted(registered)}; "
                         "or give module:attr or path/to/file.py:attr")
    source, _, attr = target.rpartition(":")  # rpartition: a Windows path has a colon after its drive letter
    try:
        module = _import_file(source) if source.endswith(".py") else importlib.import_module(source)
        obj = getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as error:
        raise ValueError(f"cannot load implementation {spec!r} ({target}): {error}") from error
    driver = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "wrap")) else obj
    problems = protocol_problems(driver)
    if problems:
        raise ValueError(f"implementation {spec!r} is not a driver: {'; '.join(problems)}")
    return driver


def _import_file(path: str):
    """Import a driver module from a file, under a name derived from the file (so it can be imported once)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no such file {file}")
    name = f"peft_conformance_driver_{file.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def driver_source(spec: str) -> tuple[str, Optional[str]]:
    """What a fresh interpreter needs to import the driver `spec`: the `--peft-impl` value to pass (files as
    absolute paths) and the folder to put on PYTHONPATH (None when a plain import finds it)."""
    target = available_drivers().get(spec, spec)
    source, _, attr = target.rpartition(":")
    if source.endswith(".py"):
        return f"{Path(source).resolve()}:{attr}", None
    module = sys.modules.get(source)
    file = getattr(module, "__file__", None)
    if not file or spec in available_drivers():
        return spec, None
    root = Path(file).resolve().parents[source.count(".") + (Path(file).name == "__init__.py")]
    return spec, str(root)


def protocol_problems(driver) -> list[str]:
    """What keeps `driver` from being a Driver: missing members, unknown capabilities."""
    problems = [f"missing member {m!r}" for m in DRIVER_MEMBERS if not hasattr(driver, m)]
    unknown = set(getattr(driver, "capabilities", ())) - set(CAPABILITIES)
    if unknown:
        problems.append(f"unknown capabilities {sorted(unknown)} (known: {sorted(CAPABILITIES)})")
    if getattr(driver, "supports", None) is not None and not callable(driver.supports):
        problems.append("supports must be callable: supports(model, config) -> reason or None")
    layout = layout_of(driver)
    if layout is not None:
        problems += [f"layout has no {m}()" for m in ("to_driver", "to_peft") if not callable(getattr(layout, m, None))]
    return problems
