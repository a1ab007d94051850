"""trainable_token_indices: train only some rows of an embedding (new special tokens), next to the LoRA adapter.

Each adapter keeps `trainable_tokens_delta`, a (len(indices), dim) copy of the rows it trains, initialised to the
rows themselves (a no-op). The layer computes with W whose rows `indices` are replaced by it:

    W' = W with W'[indices] = delta,    embedding: W'[x]    output layer (tied to the embedding): x W'^T

When the model ties its output embedding to its input embedding (tie_word_embeddings), the output layer is wrapped
too and shares the input embedding's delta, so a trained token is read and written with the same vector.
Saved key: '<embedding path>.token_adapter.trainable_tokens_delta'. Spec: LORA-TOK-001..003.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import mixed_batch


class TokenAdapter(nn.Module):
    """The rows each adapter trains, and the layer computing with them (peft's TrainableTokensLayer)."""

    def __init__(self, base_layer: nn.Module, tied_to: "TokenAdapter | None" = None):
        super().__init__()
        self.base_layer = base_layer
        self.tied = tied_to is not None
        # A tied adapter holds the same dict object: one set of trainable rows for both layers.
        self.trainable_tokens_delta = tied_to.trainable_tokens_delta if tied_to else nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = tied_to.token_indices if tied_to else {}
        self.originals: dict[str, torch.Tensor] = tied_to.originals if tied_to else {}  # for unmerge, not saved
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, indices: list[int]) -> None:
        if self.tied:
            return  # the input embedding's adapter made the rows
        rows = self.base_layer.weight[indices]
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(rows.detach().clone())
        self.originals[name] = rows.detach().clone()

    def weight_with_tokens(self, names: list[str]) -> torch.Tensor:
        """W with each named adapter's rows written in. Spec: LORA-TOK-001."""
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + names):
            indices = set(self.token_indices[name])
            if seen & indices:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= indices

    def forward(self, x: torch.Tensor, names: "list[str] | None" = None) -> torch.Tensor:
        names = [n for n in (self.active_adapters if names is None else names) if n in self.token_indices]
        if self.disabled or not names:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        if self.merged_adapters:
            return self.base_layer(x)
        self.check_disjoint(names)
        weight = self.weight_with_tokens(names)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            result = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                                 base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) apply it in their own forward
            return result if scale is None else result * scale.to(result.dtype)
        if isinstance(base, nn.Linear):
            return F.linear(x, weight)  # as peft: without the bias (a tied output layer has none)
        raise ValueError("TrainableTokensLayer wraps an unknown layer type, maybe you are targeting the wrong layer?")

    def merge(self, names: list[str]) -> None:
        """Write the rows into the weight. Spec: LORA-TOK-003."""
        names = [n for n in names if n in self.token_indices and n not in self.merged_adapters]
        if names:
            self.check_disjoint(names)
            self.base_layer.weight.data = self.weight_with_tokens(names).detach()
            self.merged_adapters += names

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight.data.index_copy_(0, index, self.originals[name].to(weight))


class TokenWrapper(nn.Module):
    """Stands where the embedding (or the tied output layer) stood; `token_adapter` does the work."""

    def __init__(self, module: nn.Module, tied_to: "TokenAdapter | None" = None):
        super().__init__()
        self.token_adapter = TokenAdapter(module, tied_to)
        self.row_adapters: "list[str] | None" = None  # set during a mixed-adapter batch (mixed_batch.py)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the model computes with it (transformers reads `embed.weight`), as in peft."""
        return self.token_adapter.weight_with_tokens(self.token_adapter.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is None:
            return self.token_adapter(x)
        mixed_batch.check_length(self.row_adapters, x)
        outputs = [None] * len(x)
        for name, rows in mixed_batch.rows_by_adapter(self.row_adapters).items():
            names = [] if name == mixed_batch.BASE else [name]
            for row, output in zip(rows, self.token_adapter(x[rows], names)):
                outputs[row] = output
        return torch.stack(outputs)


def target_paths(model: nn.Module, indices) -> dict[str, list[int]]:
    """{module path: token indices}: a list means the input embedding; a dict names modules by suffix (a plain
    `endswith`, as for modules_to_save). Spec: LORA-TOK-001."""
    if isinstance(indices, dict):
        wanted = dict(indices)
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = next((n for n, m in model.named_modules() if m is embedding), "embed_tokens")
        wanted = {name: list(indices)}
    found = {}
    for key, module_indices in wanted.items():
        paths = [path for path, _ in model.named_modules() if path.endswith(key) and ".token_adapter" not in path]
        if not paths:
            raise ValueError(f"Target modules {{{key!r}}} not found in the base model. Please check the target "
                             "modules and try again.")
        found.update({path: list(module_indices) for path in paths})
    return found


def tied_output_path(model: nn.Module, embedding: nn.Module) -> "str | None":
    """The output layer that shares the input embedding's weight, when the model's config says they are tied."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None or getattr(output, "weight", None) is not embedding.weight:
        return None
    return next(n for n, m in model.named_modules() if m is output)


def wrap_trainable_tokens(model: nn.Module, indices, adapter_name: str, modules_to_save) -> None:
    """Give `adapter_name` its trainable rows in every targeted embedding (and the output layer tied to the input
    embedding). Spec: LORA-TOK-001, LORA-TOK-002."""
    targets = target_paths(model, indices)
    for key in (indices if isinstance(indices, dict) else {}):
        if key in (modules_to_save or ()):
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{key}", ...]` or `trainable_tokens={{\'{key}\': x}}` but '
                             "not both.")
    for path, token_indices in targets.items():
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, TokenWrapper):
            input_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            tied = tied_output_path(model, wrapper) if wrapper is input_embedding else None
            wrapper = _swap_in(model, path, TokenWrapper(wrapper))
            if tied is not None:
                _swap_in(model, tied, TokenWrapper(model.get_submodule(tied), tied_to=wrapper.token_adapter))
        wrapper.token_adapter.add_adapter(adapter_name, token_indices)


def _swap_in(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return new
