"""modules_to_save: whole modules trained and saved next to the adapter (a classifier head, a LayerNorm).

The original module stays frozen; each adapter gets its own trainable copy, and the active adapter's copy runs.
Spec: LORA-MTS-001 (wrapping, matching), LORA-MTS-002 (keys), LORA-MTS-003 (unload hands back the copy).
"""

import copy

from torch import nn

from . import mixed_batch


# Modules whose forward cannot be called: a copy of one could not run in its place.
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class ModulesToSaveWrapper(nn.Module):
    """Holds `original_module` (frozen) and `modules_to_save[adapter]` (trainable copies). Saved keys drop the
    `modules_to_save.<adapter>` infix: `<path>.weight`."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_adapters: list[str] | None = None  # set during a mixed-adapter batch (mixed_batch.py)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def adapter_tensors(self, name: str) -> dict:
        """The copy's parameters and buffers (a BatchNorm's running statistics are saved too)."""
        return self.modules_to_save[name].state_dict(keep_vars=True)

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None and args:
            return mixed_batch.wrapper_forward(self, *args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # `wrapper.weight` is the active copy's weight, as in peft
            return getattr(self.active_module(), name)


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[ModulesToSaveWrapper]:
    """Wrap every module whose full name ends with one of `names`. peft uses a plain `endswith`, with no dot
    boundary: "proj" also wraps "c_proj" (peft 0.21.2 utils/other.py:1087, LORA-MTS-001)."""
    matched = [(path, module) for path, module in model.named_modules() if any(path.endswith(n) for n in names)]
    for path, module in matched:  # refused before anything is wrapped: peft raises too (utils/other.py:347-351)
        if isinstance(module, CONTAINERS):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module)} ({path!r} ends "
                            f"with one of {names}: the match has no dot boundary)")
    wrappers = []
    for path, module in matched:
        if isinstance(module, ModulesToSaveWrapper):
            wrapper = module
        elif path.endswith(".original_module") or ".modules_to_save." in path:
            continue
        else:
            wrapper = ModulesToSaveWrapper(module)
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, wrapper)
        if adapter_name not in wrapper.modules_to_save:
            wrapper.add_adapter(adapter_name)
        wrappers.append(wrapper)
    return wrappers
