"""What every broken driver shares: reference_impl through peft's API (conformance.drivers.peft_shaped), with
hooks to break one step, and helpers that edit adapter files the way a buggy writer or reader would."""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import reference_impl
from conformance.drivers.peft_shaped import PeftShapedDriver
from reference_impl import layers, peft_format, save_load
from reference_impl.modules_to_save import ModulesToSaveWrapper


class Mutant(PeftShapedDriver):
    """A realistic bug (the subclass's docstring) that the suite must fail under `kills` (its requirement IDs),
    at the latest in `test` (module::function in conformance.suite), run with `options`."""

    kills: tuple[str, ...] = ()
    test: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def environment(cls, scratch: Path) -> dict:
        """Environment variables the suite runs with (a broken fixture set, say); `scratch` is a folder to use."""
        return {}

    def __init__(self):
        super().__init__(f"mutant-{type(self).__name__}", reference_impl, reference_impl.__version__,
                         save_load.adapter_state_dict)

    def edit_config(self, config: dict) -> dict:
        """The config as the buggy library reads it."""
        return config

    def after_wrap(self, model, config: dict) -> None:
        """What the buggy library does to the adapted model."""

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, self.edit_config(copy.deepcopy(config)), adapter_name)
        self.after_wrap(wrapped, config)
        return wrapped


def lora_layers(model) -> list[layers.LoraLayer]:
    return [m for m in model.modules() if isinstance(m, layers.LoraLayer)]


def saved_modules(model) -> list[ModulesToSaveWrapper]:
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def adapter_dir(directory, adapter_name: str = "default") -> Path:
    return peft_format.adapter_directory(directory, adapter_name)


def edit_files(directory, config=None, tensors=None, adapter_name: str = "default", metadata=None) -> None:
    """Rewrite a saved adapter in place: `config(dict) -> dict`, `tensors(dict) -> dict`."""
    folder = adapter_dir(directory, adapter_name)
    if config is not None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text())), indent=2))
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"} if metadata is None else metadata)


def edited_copy(directory, config=None, tensors=None) -> str:
    """A temporary copy of an adapter directory, edited as a buggy reader would see it."""
    copy_dir = Path(tempfile.mkdtemp(prefix="mutant-"))
    shutil.copytree(directory, copy_dir, dirs_exist_ok=True)
    edit_files(copy_dir, config, tensors)
    return str(copy_dir)


def renamed(state: dict, old: str, new: str) -> dict:
    return {key.replace(old, new): value for key, value in state.items()}


def named(state: dict, adapter_name: str) -> dict:
    """Keys with the adapter name kept in them: lora_A.<name>.weight."""
    return {k.replace(".lora_A.", f".lora_A.{adapter_name}.").replace(".lora_B.", f".lora_B.{adapter_name}."): v
            for k, v in state.items()}


def round_to_bf16(tensors: dict) -> dict:
    return {k: v.to(torch.bfloat16).to(v.dtype) for k, v in tensors.items()}
