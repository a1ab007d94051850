"""Putting adapters into a model, and taking them out: injection, trainability, merge and unload, adapters.

For every method (methods.py): the method decides which layer a targeted module becomes and how an adapter is
added to it; everything else here is the same for LoRA, IA3, LoHa and LoKr.
Spec areas: MATCH (which modules), PARAM (what trains, counts), MERGE/UNLOAD, MULTI (several adapters).
Injection is in place: the caller's model object gets the adapter layers, and the base layers inside them are the
caller's own modules, not copies (LORA-UNLOAD-002).
"""

import copy
import warnings
from typing import Iterator, Optional

from torch import nn

from . import mixed_batch, parameters, trainable_tokens, weighted
from .adapter_layer import AdapterLayer
from .config import LoraConfig
from .layers import LoraLayer
from .methods import method_of
from .modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from .targeting import (EMBEDDING_NAMES, is_excluded, matches_target, no_match_error, pattern_value, resolve_targets,
                        unmatched_pattern_keys)


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


class TunerModel(nn.Module):
    """The user's model (`self.model`) with adapter layers in it, and the adapters' configs by name.

    peft nests it as `PeftModel.base_model`, so parameter names start with peft_format.PREFIX."""

    def __init__(self, model: nn.Module, config, adapter_name: str = "default", upcast_half=True,
                 initialize: bool = True):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters = [adapter_name]
        # peft's public record of the adapted module names (nothing here reads it; users and tools do).
        self.targeted_module_names: list[str] = []
        # fp16/bf16 adapters are upcast to fp32 (peft's autocast_adapter_dtype), except when injected without the
        # PeftModel wrapper (inject_adapter_in_model). LORA-INIT-006.
        self.upcast_half = upcast_half
        self.inject(config, adapter_name, initialize)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The model's forward; with `adapter_names`, row i of the batch uses adapter adapter_names[i] ("__base__":
        none). Spec: LORA-MIX-001, LORA-MIX-002."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        if self.peft_type != "LORA":
            raise ValueError(f"adapter_names (a mixed-adapter batch) is supported for LoRA only, not {self.peft_type}")
        wrappers = [*self.wrappers(), *self.token_wrappers()]
        with mixed_batch.per_row(self, adapter_names, [m for _, m in self.adapter_layers()], wrappers):
            return self.model(*args, **kwargs)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(path, layer) of every adapter layer: LoRA's, or those of the model's other method."""
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, AdapterLayer))

    def wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        return (m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    def token_wrappers(self) -> Iterator[trainable_tokens.TokenWrapper]:
        return (m for m in self.model.modules() if isinstance(m, trainable_tokens.TokenWrapper))

    def inject(self, config, adapter_name: str, initialize: bool = True) -> None:
        """Add adapter `adapter_name` to every targeted module, in `named_modules()` order (the order in which
        peft draws initial values); initialize=False when values are about to be loaded (zeros, no RNG draws).
        Spec: LORA-MATCH-001..008, LORA-INIT-003."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if any(c.peft_type != config.peft_type for c in self.peft_config.values()):
            raise ValueError(f"Cannot combine adapters with different peft types. Found {self.peft_type} and "
                             f"{config.peft_type}.")
        if bias_mode(config) != "none" and any(bias_mode(c) != "none" for c in self.peft_config.values()):
            raise ValueError("LoraModel supports only 1 adapter with bias. When using multiple adapters, "
                             "set bias to 'none' for all adapters.")
        config = copy.deepcopy(config)  # peft edits the caller's config in place; we edit a copy (LORA-CFG-007)
        method = method_of(config)
        resolve_targets(self.model, config, method.default_targets)
        method.prepare(self.model, config)
        names = [name for name, _ in self.model.named_modules()]
        inside_lora = {f"{path}.{sub}" for path, layer in self.adapter_layers() for sub, _ in layer.named_modules()}
        targeted, excluded = [], 0
        for name in names:
            if not name or name in inside_lora:
                continue
            if is_excluded(name, config):
                excluded += 1
                continue
            if not matches_target(name, config):
                continue
            self._add_to_module(name, config, adapter_name, initialize)
            targeted.append(name)
        if getattr(config, "target_parameters", None):
            targeted += self._add_to_parameters(config, adapter_name, initialize)
        if not targeted:
            raise no_match_error(config, names, excluded)
        for label in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(config, label, {})
            if unmatched := unmatched_pattern_keys(patterns, targeted):
                warnings.warn(f"The following {label} keys did not match any targeted module and were ignored: "
                              f"{unmatched}.", RuntimeWarning)
        tied = [name for name in targeted if name.rpartition(".")[2] in EMBEDDING_NAMES]
        if tied and getattr(getattr(self.model, "config", None), "tie_word_embeddings", False):
            # Both ends of a tied pair share one weight: merging one adapter changes both (LORA-MERGE-010).
            warnings.warn(f"Model with `tie_word_embeddings=True` and the tied target modules {tied} are part of the "
                          "adapter: merging it changes the input and the output embedding together.")
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        if getattr(config, "trainable_token_indices", None):
            trainable_tokens.wrap_trainable_tokens(self.model, config.trainable_token_indices, adapter_name,
                                                   config.modules_to_save)
        self.targeted_module_names += [n for n in targeted if n not in self.targeted_module_names]
        self.peft_config[adapter_name] = config

    def _add_to_module(self, name: str, config, adapter_name: str, initialize: bool) -> None:
        method = method_of(config)
        module = self.model.get_submodule(name)
        if not isinstance(module, AdapterLayer):
            module = method.make_layer(module, name, config)
            _swap(self.model, name, module)
        method.attach(module, adapter_name, name, config, self.upcast_half, initialize)
        module.active_adapters = list(self.active_adapters)

    def _add_to_parameters(self, config: LoraConfig, adapter_name: str, initialize: bool) -> list[str]:
        """Adapt the parameters config.target_parameters names (parameters.py); every adapter that uses
        target_parameters must name the same ones, as in peft. Spec: LORA-TPARAM-001, LORA-TPARAM-002."""
        for other_name, other in self.peft_config.items():
            if other.target_parameters and set(other.target_parameters) != set(config.target_parameters):
                raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target "
                                 f"the same set of parameters, but got {sorted(config.target_parameters)} for the "
                                 f"new adapter and {sorted(other.target_parameters)} for adapter '{other_name}'.")
        found = []
        for path, name in parameters.targeted_parameters(self.model, list(config.target_parameters)):
            layer = parameters.layer_for(self.model, path, name)
            if layer is None:
                current = self.model.get_submodule(path)
                if isinstance(current, LoraLayer) and not isinstance(current, parameters.ParamLayer):
                    raise ValueError(f"{path} is adapted through target_modules and target_parameters at once; "
                                     "reference_impl supports one or the other per module")
                layer = parameters.ParamLayer(current, name)
                _swap(self.model, path, layer)
            r = pattern_value(path, config.rank_pattern, config.r)
            alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
            layer.add_adapter(adapter_name, r, alpha, config, self.upcast_half, initialize)
            layer.active_adapters = list(self.active_adapters)
            found.append(f"{path}.{name}")
        return found

    # --- which adapters run and train ---------------------------------------------------------------------

    def set_adapter(self, names, inference_mode: bool = False) -> None:
        """Activate one or several adapters; they (and only they) train. Spec: LORA-MULTI-002, LORA-PARAM-002."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found.")
        for _, layer in self.adapter_layers():
            if layer.merged_adapters:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.active_adapters = list(names)
        for wrapper in self.wrappers():
            active = [n for n in names if n in wrapper.modules_to_save]
            if len(active) > 1:
                raise ValueError(f"Attempted to set multiple ({active}) adapters at once for modules_to_save.")
            wrapper.active_adapter = active[0] if active else None
        for wrapper in self.token_wrappers():
            wrapper.token_adapter.active_adapters = list(names)
        self.active_adapters = names
        self.mark_trainable(inference_mode)

    def mark_trainable(self, inference_mode: bool = False) -> None:
        """Base frozen; the active adapters, their modules_to_save copies and, with `bias`, biases train."""
        self.model.requires_grad_(False)
        if inference_mode:
            return
        for name in self.active_adapters:
            for _, tensor in adapter_parameters(self.model, name, bias_mode(self.peft_config[name])):
                if isinstance(tensor, nn.Parameter):  # not the buffers of modules_to_save copies
                    tensor.requires_grad_(True)

    @property
    def peft_type(self) -> str:
        return next(iter(self.peft_config.values())).peft_type

    def add_adapter(self, adapter_name: str, config, initialize: bool = True) -> None:
        """A new adapter, inactive and frozen. Spec: LORA-MULTI-001."""
        self.inject(config, adapter_name, initialize=initialize)
        self.set_adapter(self.active_adapters)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **svd_options) -> None:
        """A new adapter combining `adapters` (weighted.py). Spec: LORA-WADD-001..004."""
        weighted.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **svd_options)

    def delete_adapter(self, adapter_name: str) -> None:
        """Spec: LORA-MULTI-003."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if any(adapter_name in layer.merged_adapters for _, layer in self.adapter_layers()):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. "
                             "Please unmerge them first.")
        del self.peft_config[adapter_name]
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for wrapper in self.wrappers():
            wrapper.modules_to_save.pop(adapter_name, None)
        for wrapper in self.token_wrappers():
            for container in (wrapper.token_adapter.trainable_tokens_delta, wrapper.token_adapter.token_indices,
                              wrapper.token_adapter.originals):
                container.pop(adapter_name, None)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            warnings.warn(f"Adapter {adapter_name} was active and was deleted; setting {remaining[0]} active.")
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    def set_disabled(self, disabled: bool) -> None:
        for layer in (*(m for _, m in self.adapter_layers()), *self.wrappers(),
                      *(w.token_adapter for w in self.token_wrappers())):
            layer.disabled = disabled

    # --- merge and unload -------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Spec: LORA-MERGE-001, LORA-MERGE-005."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        for _, layer in self.adapter_layers():
            layer.merge(adapter_names, safe_merge)
        for wrapper in self.token_wrappers():
            wrapper.token_adapter.merge(adapter_names if adapter_names is not None else self.active_adapters)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()
        for wrapper in self.token_wrappers():
            wrapper.token_adapter.unmerge()

    def unload(self, merge: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Put the original modules back (after merging, if asked) and return the bare model.

        modules_to_save wrappers give back their active copy, as peft does. Spec: LORA-UNLOAD-001, -002."""
        if merge:
            self.merge_adapter(adapter_names, safe_merge)
        for path, layer in reversed(list(self.adapter_layers())):  # innermost first: parameter layers nest
            _swap(self.model, path, layer.base_layer)
        for path, wrapper in [(p, m) for p, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
            _swap(self.model, path, wrapper.active_module())
        for path, wrapper in [(p, m) for p, m in self.model.named_modules(remove_duplicate=False)
                              if isinstance(m, trainable_tokens.TokenWrapper)]:
            _swap(self.model, path, wrapper.token_adapter.base_layer)
        if merge:
            untie_if_diverged(self.model)
        return self.model


def untie_if_diverged(model: nn.Module) -> None:
    """After a merge, a config that says the input and output embeddings are tied must not lie: if the two weights
    no longer share storage, say so (tie_word_embeddings=False), as peft does. Merging into a tied weight changes
    both, so they stay tied; they diverge when the model came with them already split. Spec: LORA-MERGE-010."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_input_embeddings"):
        return
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    weights = [getattr(layer, "weight", None) for layer in layers]
    if None not in weights and weights[0].data_ptr() != weights[1].data_ptr():
        config.tie_word_embeddings = False
        warnings.warn("Input and output embeddings are no longer tied after merging. "
                      "Setting `tie_word_embeddings=False` in the model config.")



def bias_mode(config) -> str:
    """Which biases an adapter trains: LoRA's `bias` field; the other methods train none."""
    return getattr(config, "bias", "none")


def adapter_parameters(model: nn.Module, name: str, bias: str = "none") -> Iterator[tuple[str, nn.Parameter]]:
    """(path, tensor) for all that adapter `name` trains and saves: its layers' tensors (LoRA's factors and DoRA
    magnitude, IA3's vectors, LoHa's and LoKr's factors),
    its modules_to_save copies (with their buffers) and, with `bias`, the biases.
    Spec: LORA-KEYS-001..006, LORA-PARAM-004."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer) and module.has_adapter(name):
            yield from ((f"{path}.{suffix}", p) for suffix, p in module.adapter_tensors(name).items())
        elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            yield from ((f"{path}.{suffix}", p) for suffix, p in module.adapter_tensors(name).items())
        elif isinstance(module, trainable_tokens.TokenWrapper) and not module.token_adapter.tied \
                and name in module.token_adapter.token_indices:
            yield f"{path}.token_adapter.trainable_tokens_delta", module.token_adapter.trainable_tokens_delta[name]
    if bias == "all":  # every bias of the model, LoRA's own and the wrappers' copies aside
        yield from ((path, p) for path, p in model.named_parameters() if (path == "bias" or path.endswith(".bias"))
                    and not any(part in path for part in (".lora_", ".modules_to_save.", ".original_module.")))
    elif bias == "lora_only":  # the biases of the layers this adapter adapts
        for path, module in model.named_modules():
            bias_ = getattr(module.base_layer, "bias", None) if isinstance(module, LoraLayer) else None
            if bias_ is not None and module.has_adapter(name):
                yield f"{path}.base_layer.bias", bias_
