"""Broken drivers for the rest of peft's LoRA: mixed-adapter batches, weighted adapters, target_parameters,
trainable tokens, nn.MultiheadAttention."""

import types

import torch

from reference_impl import attention, layers, parameters, trainable_tokens
from tests.mutants.base import Mutant, lora_layers, renamed

BASE = "__base__"


def _rename_rows(model, rename) -> None:
    """Make the model hand `rename(adapter_names)` to its layers instead of what the caller passed."""
    forward = model.forward

    def renamed_forward(*args, adapter_names=None, **kwargs):
        return forward(*args, adapter_names=None if adapter_names is None else rename(list(adapter_names)), **kwargs)

    model.forward = renamed_forward


class MixedBatchFirstRowForAll(Mutant):
    """A mixed batch runs every row through the first row's adapter (one adapter per batch, as a server that
    groups requests by their first entry would)."""

    kills, test = ("LORA-MIX-001", "LORA-GOLD-009"), "test_mix::test_each_row_uses_its_adapter"

    def after_wrap(self, model, config):
        _rename_rows(model, lambda names: names[:1] * len(names))

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        model = super().load(base_model, directory, adapter_name, is_trainable)
        self.after_wrap(model, {})
        return model


class MixedBatchUnknownNameIsBase(Mutant):
    """An adapter name the model does not have serves the base model instead of raising: a typo goes unnoticed."""

    kills, test = ("LORA-MIX-002",), "test_mix::test_bad_adapter_names_are_refused"

    def after_wrap(self, model, config):
        known = lambda name: name in model.peft_config or name == BASE  # noqa: E731
        _rename_rows(model, lambda names: [name if known(name) else BASE for name in names])


class _Combining(Mutant):
    """Edits each layer's combined adapter after reference_impl has built it with `combination`."""

    combination = ""

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank=None):
        super().add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank)
        if combination_type != self.combination:
            return
        with torch.no_grad():
            for layer in lora_layers(model):
                if adapter_name in layer.r:
                    present = [(n, w) for n, w in zip(adapters, weights) if n in layer.r]
                    self.edit(layer, present, *layer.factors(adapter_name))

    def edit(self, layer, present, A, B) -> None:
        raise NotImplementedError


class CatScalesTwice(_Combining):
    """'cat' multiplies each adapter's A by its scaling twice (once when combining, once more as if the new
    adapter kept the old scalings)."""

    kills, test, combination = ("LORA-WADD-002", "LORA-GOLD-010"), "test_wadd::test_cat_combination", "cat"

    def edit(self, layer, present, A, B):
        start = 0
        for name, _ in present:
            A[start:start + layer.r[name]] *= layer.scaling[name]
            start += layer.r[name]


class LinearSignOnBothFactors(_Combining):
    """'linear' puts a negative weight's sign on both A and B, so that it cancels: subtracting an adapter adds it."""

    kills, test, combination = ("LORA-WADD-001",), "test_wadd::test_linear_combination", "linear"

    def edit(self, layer, present, A, B):
        B.copy_(sum((1 if w * layer.scaling[n] >= 0 else -1) * abs(w * layer.scaling[n]) ** 0.5 * layer.factors(n)[1]
                    for n, w in present))


class SvdDropsSingularValues(_Combining):
    """'svd' keeps U and Vh but forgets S: B = U_k instead of U_k S_k."""

    kills, test, combination = ("LORA-WADD-003",), "test_wadd::test_svd_combination", "svd"

    def edit(self, layer, present, A, B):
        flat = B.reshape(B.shape[0], -1)
        B.copy_((flat / flat.norm(dim=0).clamp_min(1e-30)).reshape(B.shape))


class WeightedAdapterBecomesActive(Mutant):
    """The combined adapter is switched on (and trains) as soon as it is made."""

    kills, test = ("LORA-WADD-004",), "test_wadd::test_new_adapter_is_inactive_frozen_and_checked"

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank=None):
        super().add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank)
        model.set_adapter(adapter_name)


def _parameter_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, parameters.ParamLayer)]


class ExpertMajorB(Mutant):
    """B's columns are read expert-major (expert e owns columns e*r to (e+1)*r), like A's rows, instead of peft's
    expert-minor layout: every expert gets another expert's B."""

    kills, test = ("LORA-TPARAM-001",), "test_tparam::test_parameter_computes_with_its_delta"

    def after_wrap(self, model, config):
        def expert_factors(layer, A, B):
            E = layer.num_experts
            return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], E, -1).permute(1, 0, 2)

        for layer in _parameter_layers(model):
            layer.expert_factors = types.MethodType(expert_factors, layer)


class TransposedExpertFactors(Mutant):
    """A targeted parameter's factors are exchanged transposed (A as (in, r*E), B as (r*E, out)), the layout of a
    library that computes x A then B."""

    kills, test = ("LORA-TPARAM-002",), "test_tparam::test_keys_and_shapes"

    def _flip(self, model, state):
        paths = {f"{name}." for name, m in model.named_modules() if isinstance(m, parameters.ParamLayer)}
        return {k: v.T if any(k.endswith(p + f) for p in paths for f in ("lora_A.weight", "lora_B.weight")) else v
                for k, v in state.items()}

    def adapter_state_dict(self, model, adapter_name="default"):
        return self._flip(model, super().adapter_state_dict(model, adapter_name))

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, self._flip(model, state_dict), adapter_name)


class MergeSkipsParameters(Mutant):
    """merge_and_unload folds the adapters of modules but forgets those of bare parameters: they are dropped."""

    kills, test = ("LORA-TPARAM-003",), "test_tparam::test_merge_and_unload_folds_the_delta"

    def merge_and_unload(self, model):
        for layer in _parameter_layers(model):
            layer.merge = lambda *args, **kwargs: None
        return super().merge_and_unload(model)


def _token_wrappers(model) -> list:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, trainable_tokens.TokenWrapper)]


class TiedOutputIgnoresTokens(Mutant):
    """The trained rows reach the input embedding only: a tied output layer keeps scoring with the original rows."""

    kills, test = ("LORA-TOK-001",), "test_tok::test_selected_rows_replace_the_embedding_s"

    def after_wrap(self, model, config):
        for path, wrapper in _token_wrappers(model):
            if wrapper.token_adapter.tied:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, wrapper.token_adapter.base_layer)


class WholeEmbeddingTrains(Mutant):
    """trainable_token_indices unfreezes the whole embedding instead of the selected rows."""

    kills, test = ("LORA-TOK-002",), "test_tok::test_only_the_selected_rows_train_and_are_saved"

    def after_wrap(self, model, config):
        for _, wrapper in _token_wrappers(model):
            wrapper.token_adapter.base_layer.weight.requires_grad_(True)


class MergeForgetsTokens(Mutant):
    """merge_and_unload merges the LoRA layers but hands back the embedding without the trained rows."""

    kills, test = ("LORA-TOK-003",), "test_tok::test_merge_and_unload_writes_the_rows"

    def merge_and_unload(self, model):
        for _, wrapper in _token_wrappers(model):
            wrapper.token_adapter.merge = lambda names: None
        return super().merge_and_unload(model)


def _attention_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, attention.MultiheadAttention)]


class InProjectionIgnored(Mutant):
    """The adapter reaches out_proj only (the one nn.Linear inside torch's attention): the fused q/k/v
    in-projection computes without its delta."""

    kills, test = ("LORA-MHA-001",), "test_mha::test_attention_computes_with_both_deltas"

    def after_wrap(self, model, config):
        for layer in _attention_layers(model):
            layer.delta_weight = lambda name, layer=layer: torch.zeros_like(layer.adapted_weight())


class OutProjKeysWithoutBaseLayer(Mutant):
    """out_proj's factors are exchanged as '<path>.out_proj.lora_A.weight', without peft's '.base_layer'."""

    kills, test = ("LORA-MHA-002",), "test_mha::test_keys_and_shapes"

    def adapter_state_dict(self, model, adapter_name="default"):
        return renamed(super().adapter_state_dict(model, adapter_name), ".base_layer.out_proj.", ".out_proj.")

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, renamed(state_dict, ".attn.out_proj.", ".attn.base_layer.out_proj."),
                                        adapter_name)


class MergeFoldsOutProjOnce(Mutant):
    """merge_and_unload folds out_proj's delta once, while the forward pass applied it twice (peft's factor 2):
    the merged model computes something else than the adapted one."""

    kills, test = ("LORA-MHA-003",), "test_mha::test_merge_and_unload_gives_back_torch_s_attention"

    def merge_and_unload(self, model):
        for layer in _attention_layers(model):
            layer.merge = types.MethodType(lambda self, names=None, safe_merge=False: layers.Linear.merge(
                self, names, safe_merge) or self.out_proj.merge(names, safe_merge), layer)
        return super().merge_and_unload(model)
