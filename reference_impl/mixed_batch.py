"""Mixed-adapter batches: `model(**inputs, adapter_names=[...])` sends each row of the batch through its own
adapter ("__base__": none), as multi-tenant servers do. Inference only.

Each layer computes its base output for the whole batch, then adds each named adapter's output to that adapter's
rows, computed on those rows alone. A layer lacking a named adapter leaves its rows at the base output.
Spec: LORA-MIX-001..003.
"""

import contextlib

import torch
from torch import nn

BASE = "__base__"  # the name that means "no adapter" for a row


def rows_by_adapter(adapter_names: list[str]) -> dict[str, list[int]]:
    """Each name, in order of first appearance, with the batch rows that use it."""
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(row)
    return rows


@contextlib.contextmanager
def per_row(model: nn.Module, adapter_names: list[str], lora_layers: list[nn.Module], wrappers: list[nn.Module]):
    """Inside the block, the LoRA layers and modules_to_save wrappers compute per row. The names are checked
    first: only in eval mode, and each must be an adapter of at least one LoRA layer (so that a typo is not
    silently the base model). Spec: LORA-MIX-002."""
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    known = {name for layer in lora_layers for name in layer.r}
    unknown = sorted(set(adapter_names) - known - {BASE})
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    layers = [*lora_layers, *wrappers]
    for layer in layers:
        layer.row_adapters = list(adapter_names)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


def check_length(names: list[str], x: torch.Tensor) -> None:
    """One name per row. Spec: LORA-MIX-002."""
    if len(x) != len(names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {len(x)} respectively.")


def lora_layer_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer's output when its rows name their adapters. Nothing may be merged (which row would a merged
    weight serve?) and no named adapter may use DoRA. Spec: LORA-MIX-001, LORA-MIX-002, LORA-MIX-003."""
    check_length(layer.row_adapters, x)
    if layer.merged_adapters:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                         "`unmerge_adapter` first.")
    if any(name in layer.lora_magnitude_vector for name in layer.row_adapters):
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disabled:
        return result
    for name, rows in rows_by_adapter(layer.row_adapters).items():
        if name == BASE or name not in layer.r:
            continue
        sub_batch = layer.adapter_input(name, x[rows])
        # The adapter's own contribution is its output over a zero base output (the formula, once).
        contribution = layer.adapter_output(name, sub_batch, torch.zeros_like(result[rows]))
        result[rows] += contribution.to(result.dtype)
    return result


def wrapper_forward(wrapper, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A modules_to_save wrapper's output when rows name their adapters: each row through its adapter's copy,
    "__base__" rows through the original. peft supports this for Linear, Embedding and Conv modules only.
    Spec: LORA-MIX-003."""
    check_length(wrapper.row_adapters, x)
    if wrapper.disabled or wrapper.active_adapter is None:
        return wrapper.original_module(x, *args, **kwargs)
    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if not isinstance(wrapper.original_module, supported):
        raise TypeError("Mixed batching is only supported for the following modules: "
                        f"{', '.join(cls.__name__ for cls in supported)}.")
    outputs = [None] * len(x)
    for name, rows in rows_by_adapter(wrapper.row_adapters).items():
        if name != BASE and name not in wrapper.modules_to_save:  # peft: a bare KeyError
            raise KeyError(f"adapter {name!r} has no copy of this module in modules_to_save")
        module = wrapper.original_module if name == BASE else wrapper.modules_to_save[name]
        for row, output in zip(rows, module(x[rows], *args, **kwargs)):
            outputs[row] = output
    return torch.stack(outputs)
