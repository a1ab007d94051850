"""The driver protocol: what an implementation provides so that the suite can run it.

A driver is any object with the members of `Driver`. Register it under the entry-point group
`peft_conformance.implementations`, or name it as `module:attr` (a driver object, or a class or factory
that returns one). Configs are plain dicts with peft's LoraConfig field names, so a driver never needs peft.
"""

import importlib
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

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
    "disable": "disable_adapter() context",
    "merge": "merge / unmerge / merge_and_unload",
    "unload": "unload() without merging",
    "save_load": "save / load in peft's directory format",
    "cuda": "runs on CUDA devices",
}


@runtime_checkable
class Driver(Protocol):
    """The members a driver provides. `model(**inputs)` (the model's own __call__) is the forward pass."""

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
        "base_model.model.<module path>.lora_A.weight", no adapter name."""

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


DRIVER_MEMBERS = ("name", "version", "capabilities", "wrap", "add_adapter", "set_adapter", "delete_adapter",
                  "disable_adapter", "adapter_state_dict", "load_adapter_state_dict", "save", "load", "merge",
                  "unmerge", "merge_and_unload", "unload", "trainable_parameters")


# The drivers shipped here, also usable from a checkout that is not installed (PYTHONPATH=.).
BUILTIN_DRIVERS = {
    "reference": "conformance.drivers.reference:ReferenceDriver",
    "peft": "conformance.drivers.peft:PeftDriver",
    "loralib": "conformance.drivers.loralib:LoralibDriver",
    "torchtune": "conformance.drivers.torchtune:TorchtuneDriver",
    "mlx": "conformance.drivers.mlx:MlxDriver",
}


def available_drivers() -> dict[str, str]:
    """Driver names and the `module:attr` each points to: the shipped ones and the registered ones."""
    return {**BUILTIN_DRIVERS, **{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}}


def load_driver(spec: str) -> Driver:
    """A driver from a registered name ("reference") or a `module:attr` path. Raises ValueError otherwise."""
    registered = available_drivers()
    target = registered.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown implementation {spec!r}: registered drivers are {sorted(registered)}; "
                         "or give module:attr")
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load implementation {spec!r} ({target}): {error}") from error
    driver = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "wrap")) else obj
    problems = protocol_problems(driver)
    if problems:
        raise ValueError(f"implementation {spec!r} is not a driver: {'; '.join(problems)}")
    return driver


def protocol_problems(driver) -> list[str]:
    """What keeps `driver` from being a Driver: missing members, unknown capabilities."""
    problems = [f"missing member {m!r}" for m in DRIVER_MEMBERS if not hasattr(driver, m)]
    unknown = set(getattr(driver, "capabilities", ())) - set(CAPABILITIES)
    if unknown:
        problems.append(f"unknown capabilities {sorted(unknown)} (known: {sorted(CAPABILITIES)})")
    return problems
