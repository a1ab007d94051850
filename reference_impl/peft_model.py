"""The user-facing wrapper, shaped like peft's: get_peft_model, PeftModel (save, load, counts, adapters) and
inject_adapter_in_model for integrations that want adapters without a wrapper. The config's class picks the
method (LoraConfig, IA3Config, LoHaConfig, LoKrConfig: methods.py).

Spec areas: PARAM (counts), SER (save_pretrained), LOAD (from_pretrained, load_adapter), MULTI.
"""

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Optional

from torch import nn

from . import peft_format, save_load
from .config import LoraConfig
from .model import TunerModel, bias_mode
from .quantized import parameter_count


def with_task_heads(config: LoraConfig, task_type: Optional[str]) -> LoraConfig:
    """`config` with the task's heads appended to modules_to_save. peft appends on every wrap, also when loading
    a config that already lists them, so a saved-then-loaded classifier adapter lists them twice. Spec:
    LORA-TASK-001."""
    heads = peft_format.TASK_HEADS.get(task_type)
    if not heads:
        return config
    config = copy.deepcopy(config)
    config.modules_to_save = [*(config.modules_to_save or []), *heads]
    return config


class PeftModel(nn.Module):
    """A model with LoRA adapters. Calls and unknown attributes go to the wrapped model, so a transformers
    model keeps its forward signature (input_ids, attention_mask, labels, decoder_input_ids, pixel_values, ...)
    and its methods. The first adapter's task_type decides which heads every adapter trains (peft picks its
    PeftModelFor<Task> class the same way). Spec: LORA-TASK-001..003."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", initialize: bool = True):
        super().__init__()
        self.task_type = config.task_type
        self.base_model = TunerModel(model, with_task_heads(config, self.task_type), adapter_name,
                                    initialize=initialize)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # --- counts -----------------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): numel over named_parameters(), a tied weight counted once, a packed 4-bit weight twice
        per byte. Spec: LORA-PARAM-001, QLORA-PARAM-001."""
        trainable = total = 0
        for p in self.parameters():
            count = parameter_count(p)
            total += count
            trainable += count if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # --- adapters ---------------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        self.base_model.add_adapter(adapter_name, with_task_heads(peft_config, self.task_type))

    def set_adapter(self, adapter_name: str) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **svd_options) -> None:
        """Spec: LORA-WADD-001..004 (reference_impl/weighted.py)."""
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, **svd_options)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model computes as the base model. On exit the active adapters become trainable
        again, even one loaded frozen, as in peft 0.21.2 (peft_model.py:1022-1077). Spec: LORA-FWD-007."""
        if any(bias_mode(self.peft_config[a]) != "none" for a in self.base_model.active_adapters):
            warnings.warn("Careful, disabling adapter layers with bias configured to be 'all' does not produce "
                          "the same output as the base model would without adaption.")
        self.base_model.set_disabled(True)
        self.base_model.model.requires_grad_(False)
        try:
            yield
        finally:
            self.base_model.set_disabled(False)
            self.base_model.set_adapter(self.base_model.active_adapters)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Spec: LORA-MERGE-004."""
        return self.base_model.unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Spec: LORA-UNLOAD-001."""
        return self.base_model.unload()

    # --- files ------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, selected_adapters: Optional[list[str]] = None) -> None:
        """One directory per adapter ("default" at the top, others in subfolders). Spec: LORA-SER-001..004."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names "
                             f"are {list(self.peft_config)} - got {unknown}.")
        for name in names:
            save_load.write_adapter(peft_format.adapter_directory(save_directory, name),
                                    save_load.get_peft_model_state_dict(self, adapter_name=name),
                                    self._config_to_save(name))

    def _config_to_save(self, adapter_name: str) -> dict:
        """adapter_config.json as peft writes it: inference_mode true, the base model's class when there is no
        task_type, and base_model_name_or_path null for a model built from a config. Spec: LORA-SER-003."""
        config = self.peft_config[adapter_name].to_dict()
        model = self.get_base_model()
        config["inference_mode"] = True
        name = config["base_model_name_or_path"] or getattr(model, "name_or_path", None)
        config["base_model_name_or_path"] = name or None
        if config["task_type"] is None:
            config["auto_mapping"] = {"base_model_class": type(model).__name__,
                                      "parent_library": type(model).__module__}
        return config

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        subfolder: Optional[str] = None, allow_pickle: bool = False,
                        ignore_unknown_keys: bool = False) -> "PeftModel":
        """Wrap `model` and load the adapter saved in `model_id`. Without is_trainable the result is frozen and in
        eval mode. Both files are read and checked before `model` is touched, and a failed load puts its original
        modules back. Unlike peft, the adapter is not randomly initialised first (the file overwrites it): the
        global RNG is left alone, and a tensor missing from the file stays zero. Spec: LORA-LOAD-001,
        LORA-LOAD-004, LORA-LOAD-005, LORA-ERR-003..008."""
        directory = save_load.Path(model_id, subfolder or "")
        config = save_load.read_config(directory, ignore_unknown_keys)
        tensors = save_load.read_weights(directory, allow_pickle)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name, initialize=False)
        try:
            peft_model._set_weights(tensors, directory, adapter_name)
        except ValueError:
            peft_model.base_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, allow_pickle: bool = False,
                     ignore_unknown_keys: bool = False) -> save_load.IncompatibleKeys:
        """Add a saved adapter next to the existing ones, inactive. Spec: LORA-MULTI-006."""
        config = save_load.read_config(model_id, ignore_unknown_keys)
        tensors = save_load.read_weights(model_id, allow_pickle)
        config.inference_mode = not is_trainable
        self.base_model.add_adapter(adapter_name, with_task_heads(config, self.task_type), initialize=False)
        try:
            keys = self._set_weights(tensors, model_id, adapter_name)
        except ValueError:
            self.base_model.delete_adapter(adapter_name)
            raise
        if is_trainable:
            for p in save_load.adapter_state_dict(self, adapter_name).values():
                p.requires_grad_(True)
        else:
            self.eval()
        return keys

    def _set_weights(self, tensors: dict, directory, adapter_name: str) -> save_load.IncompatibleKeys:
        """Spec: LORA-LOAD-005 (missing keys warn, as in peft), LORA-ERR-005 (keys for absent modules)."""
        path = Path(directory) / peft_format.WEIGHTS_NAME
        try:
            keys = save_load.set_peft_model_state_dict(self, tensors, adapter_name)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        for key in keys.unexpected_keys:
            module = save_load.module_path(key)
            try:
                self.get_submodule(module)
            except AttributeError:
                raise ValueError(f"{path}: tensor {key} is for module {module.removeprefix(peft_format.PREFIX)!r}, "
                                 "which the base model does not have (wrong base model?)") from None
        if keys.unexpected_keys:  # peft ignores them silently
            warnings.warn(f"{path}: ignoring tensors the adapter has no place for: {keys.unexpected_keys}")
        if keys.missing_keys:  # peft warns and keeps the fresh initialisation
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {keys.missing_keys}.")
        return keys


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Inject LoRA into `model` (in place) and wrap it. Spec: LORA-MATCH-*, LORA-INIT-*, LORA-PARAM-002."""
    return PeftModel(model, peft_config, adapter_name)


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Add LoRA layers to `model` without a wrapper; the adapters stay half precision if the base is. Saved keys
    have no peft_format.PREFIX. Spec: LORA-KEYS-004."""
    tuner = TunerModel(model, peft_config, adapter_name, upcast_half=False)
    model.peft_config = tuner.peft_config
    return model
