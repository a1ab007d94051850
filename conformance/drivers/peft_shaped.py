"""One driver for every library with peft's public API: peft itself and reference_impl."""

from contextlib import AbstractContextManager
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from reference_impl import METHODS

from ..api import CAPABILITIES

# The config class of each method, by the peft_type a config dict names; peft and reference_impl share the names.
CONFIG_CLASSES = {peft_type: method.config_class.__name__ for peft_type, method in METHODS.items()}


class PeftShapedDriver:
    """Drives `lib` through get_peft_model, PeftModel and the state-dict helpers, as a peft user would."""

    capabilities = frozenset(CAPABILITIES)

    def __init__(self, name: str, lib: ModuleType, version: str,
                 live_state_dict: Callable[[nn.Module, str], dict[str, torch.Tensor]]):
        self.name, self.lib, self.version = name, lib, version
        self._live_state_dict = live_state_dict

    def config(self, config: dict):
        """The library's config object for a config dict, of the class its peft_type names."""
        return getattr(self.lib, CONFIG_CLASSES[config.get("peft_type", "LORA")])(**config)

    def wrap(self, model: nn.Module, config: dict, adapter_name: str = "default") -> nn.Module:
        return self.lib.get_peft_model(model, self.config(config), adapter_name=adapter_name)

    def add_adapter(self, model: nn.Module, config: dict, adapter_name: str) -> None:
        model.add_adapter(adapter_name, self.config(config))

    def set_adapter(self, model: nn.Module, adapter_name: str) -> None:
        model.set_adapter(adapter_name)

    def delete_adapter(self, model: nn.Module, adapter_name: str) -> None:
        model.delete_adapter(adapter_name)

    def add_weighted_adapter(self, model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str, svd_rank=None) -> None:
        model.add_weighted_adapter(adapters, weights, adapter_name, combination_type=combination_type,
                                   svd_rank=svd_rank)

    def disable_adapter(self, model: nn.Module) -> AbstractContextManager:
        return model.disable_adapter()

    def adapter_state_dict(self, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return self._live_state_dict(model, adapter_name)

    def load_adapter_state_dict(self, model: nn.Module, state_dict: dict, adapter_name: str = "default") -> None:
        self.lib.set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)

    def save(self, model: nn.Module, directory: str, adapter_name: str = "default") -> None:
        model.save_pretrained(directory, selected_adapters=[adapter_name])

    def load(self, base_model: nn.Module, directory: str, adapter_name: str = "default",
             is_trainable: bool = False) -> nn.Module:
        return self.lib.PeftModel.from_pretrained(base_model, directory, adapter_name=adapter_name,
                                                  is_trainable=is_trainable)

    def merge(self, model: nn.Module) -> None:
        model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        model.unmerge_adapter()

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()

    def unload(self, model: nn.Module) -> nn.Module:
        return model.unload()

    def trainable_parameters(self, model: nn.Module) -> tuple[int, int]:
        return model.get_nb_trainable_parameters()
