"""Broken drivers for MERGE and UNLOAD: adapters folded in and taken out the way other libraries get it wrong."""

import copy

from reference_impl import dora
from tests.mutants.base import Mutant, lora_layers, saved_modules


class MergeWithoutScaling(Mutant):
    """merge() adds B A, forgetting the scaling."""

    kills, test = ("LORA-MERGE-001",), "test_merge::test_merged_weight_is_base_plus_delta"

    def merge(self, model):
        for layer in lora_layers(model):
            for name in layer.active_adapters:
                if name in layer.r and name not in layer.merged_adapters:
                    A, B = layer.factors(name)
                    layer.base_layer.weight.data += layer.out_first(layer.delta_from_factors(A, B)).to(
                        layer.base_layer.weight.dtype)
                    layer.merged_adapters.append(name)


class MergeIgnoresRslora(Mutant):
    """merge() scales by alpha / r even with use_rslora (the forward pass uses alpha / sqrt(r))."""

    kills, test = ("LORA-MERGE-002",), "test_merge::test_merged_output_equals_unmerged"

    def merge(self, model):
        for layer in lora_layers(model):
            rank_scaled = {name: layer.lora_alpha[name] / layer.r[name] for name in layer.r}
            kept, layer.scaling = layer.scaling, rank_scaled
            layer.merge()
            layer.scaling = kept


class UnmergeDoesNothing(Mutant):
    """unmerge() marks the layers unmerged but leaves the delta in the weights."""

    kills, test = ("LORA-MERGE-003",), "test_merge::test_merge_then_unmerge_restores_base_weights"

    def unmerge(self, model):
        for layer in lora_layers(model):
            layer.merged_adapters.clear()


class MergeAndUnloadReturnsWrapper(Mutant):
    """merge_and_unload() merges and hands back the wrapper, LoRA layers and all."""

    kills, test = ("LORA-MERGE-004",), "test_merge::test_merge_and_unload_returns_the_plain_model"

    def merge_and_unload(self, model):
        model.merge_adapter()
        return model


class DoraMergedAsPlainLora(Mutant):
    """Merging a DoRA adapter adds s * B A and forgets the magnitude."""

    kills, test = ("LORA-MERGE-006",), "test_merge::test_dora_merge_formula"

    def __init__(self):
        super().__init__()
        dora.merged_weight = _plain_merge  # this mutant's process only


def _plain_merge(layer, name, weight):
    return weight + layer.delta_weight(name).to(weight.dtype)


class LoraBiasNotMerged(Mutant):
    """Merging ignores lora_B's bias (it stays behind in the adapter, which merged layers no longer run)."""

    kills, test = ("LORA-MERGE-007",), "test_merge::test_lora_bias_is_merged_into_the_base_bias"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            layer.lora_bias_after_merge = lambda name, sign: None


class MergeTwiceAddsTwice(Mutant):
    """merge() does not remember what it merged: a second call adds the delta again."""

    kills, test = ("LORA-MERGE-008",), "test_merge::test_merging_twice_changes_nothing"

    def merge(self, model):
        for layer in lora_layers(model):
            layer.merged_adapters.clear()
        super().merge(model)


class HalfMergeUpcasts(Mutant):
    """Merging on a bf16/fp16 base leaves float32 weights behind (the delta's dtype wins)."""

    kills, test, options = ("LORA-MERGE-009",), "test_merge::test_half_precision_merge_matches_peft", (
        "--peft-dtype=float32,bfloat16",)

    def merge(self, model):
        super().merge(model)
        for layer in lora_layers(model):
            layer.base_layer.weight.data = layer.base_layer.weight.data.float()


class UnloadLeavesWrapper(Mutant):
    """unload() returns the model with the LoRA layers still in it."""

    kills, test = ("LORA-UNLOAD-001",), "test_unload::test_unload_restores_the_base_state_dict"

    def unload(self, model):
        return model.get_base_model()


class UnloadReturnsACopy(Mutant):
    """unload() hands back a deep copy of the base model, not the model that was wrapped."""

    kills, test = ("LORA-UNLOAD-002",), "test_unload::test_unload_returns_the_original_objects"

    def unload(self, model):
        return copy.deepcopy(super().unload(model))


class UnloadRestoresOriginalModule(Mutant):
    """unload() puts the original module back where modules_to_save trained a copy: the training is lost."""

    kills, test = ("LORA-MTS-003",), "test_mts::test_unload_keeps_the_trained_copy"

    def unload(self, model):
        for wrapper in saved_modules(model):
            wrapper.active_adapter = None  # the wrapper now hands back original_module
        return super().unload(model)
