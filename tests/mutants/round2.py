"""Bugs that hidden broken drivers showed the suite missed (issue #28): each is otherwise exactly reference_impl."""

import contextlib
import json

import torch

from reference_impl import mixed_batch
from tests.mutants.base import Mutant, adapter_dir, edit_files, edited_copy, lora_layers


class MixedBatchIgnoresSavedModules(Mutant):
    """In a mixed-adapter batch the LoRA layers route each row, but modules_to_save copies ignore adapter_names:
    every row goes through the active adapter's copy."""

    kills, test = ("LORA-MIX-001",), "test_mix::test_each_row_uses_its_adapter"

    def __init__(self):
        super().__init__()
        mixed_batch.wrapper_forward = lambda wrapper, *args, **kwargs: wrapper.active_module()(*args, **kwargs)


class DisableLeavesMergedDelta(Mutant):
    """disable_adapter() on a merged model only skips the adapter branch: the delta merged into the weights
    stays, so the "base" output is the adapted one."""

    kills, test = ("LORA-FWD-010",), "test_fwd::test_disable_adapter_on_a_merged_model_gives_base_output"

    @contextlib.contextmanager
    def disable_adapter(self, model):
        merged = {layer: list(layer.merged_adapters) for layer in lora_layers(model)}
        for layer in merged:
            layer.merged_adapters.clear()  # the layer forgets it is merged: disabled, it returns base_layer(x)
        try:
            with model.disable_adapter():
                yield
        finally:
            for layer, names in merged.items():
                layer.merged_adapters.extend(names)


class SavesActiveAdapterConfig(Mutant):
    """save(model, directory, adapter_name) for an adapter that is not the active one writes its tensors with the
    active adapter's adapter_config.json."""

    kills, test = ("LORA-SER-004",), "test_ser::test_other_adapter_goes_to_a_subfolder"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        active = model.active_adapter
        if adapter_name != active:
            path = adapter_dir(directory, adapter_name) / "adapter_config.json"
            path.write_text(json.dumps(model.peft_config[active].to_dict(), indent=2))


class AddAdapterKeepsFirstRslora(Mutant):
    """add_adapter takes use_rslora, a per-adapter field, from the first adapter's config."""

    kills, test = ("LORA-MULTI-002",), "test_multi::test_set_and_delete_adapter"

    def add_adapter(self, model, config, adapter_name):
        first = next(iter(model.peft_config.values()))
        super().add_adapter(model, {**config, "use_rslora": first.use_rslora}, adapter_name)


class SavesEverythingAsFloat32(Mutant):
    """On a bfloat16 or float16 base, save writes every tensor as float32: the LoRA factors are float32 anyway
    (peft upcasts them), but trained biases, modules_to_save copies and embedding rows lose their dtype."""

    kills, test = ("LORA-SER-002",), "test_ser::test_saved_files_hold_the_live_tensors"
    options = ("--peft-dtype=bfloat16",)

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, tensors=lambda t: {k: v.float() for k, v in t.items()}, adapter_name=adapter_name)


class UnloadUpcasts(Mutant):
    """unload() hands back the base model with float32 layers where the base was bfloat16 or float16."""

    kills, test = ("LORA-UNLOAD-001",), "test_unload::test_unload_restores_the_base_state_dict"
    options = ("--peft-dtype=bfloat16",)

    def unload(self, model):
        return super().unload(model).float()


class LoadsWithoutDropout(Mutant):
    """Loading builds the LoRA layers without lora_dropout (is_trainable=True too), so resumed training differs
    from the run it resumes."""

    kills, test = ("LORA-LOAD-008",), "test_load::test_loaded_adapter_keeps_its_dropout"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        folder = adapter_dir(directory, adapter_name)
        plain = edited_copy(folder, config=lambda c: {**c, "lora_dropout": 0.0})
        return super().load(base_model, plain, adapter_name, is_trainable)


class AttentionMergesAgain(Mutant):
    """merge on an nn.MultiheadAttention adapter forgets that it is merged already: a second merge adds both deltas
    again."""

    kills, test = ("LORA-MHA-003",), "test_mha::test_merge_and_unload_gives_back_torch_s_attention"

    def __init__(self):
        super().__init__()
        from reference_impl import attention

        merge = attention.MultiheadAttention.merge

        def merges_again(layer, adapter_names=None, safe_merge=False):
            layer.merged_adapters.clear()
            layer.out_proj.merged_adapters.clear()
            merge(layer, adapter_names, safe_merge)
            layer.out_proj.merged_adapters[:] = list(layer.merged_adapters)

        attention.MultiheadAttention.merge = merges_again


class ParameterUnmergeKeepsDelta(Mutant):
    """unmerge on target_parameters adapters marks them unmerged but leaves s * delta in the expert weights."""

    kills, test = ("LORA-TPARAM-003",), "test_tparam::test_merge_and_unload_folds_the_delta"

    def __init__(self):
        super().__init__()
        from reference_impl import parameters

        parameters.ParamLayer.unmerge = lambda layer: layer.merged_adapters.clear()


class WeightedAdapterSharedLayersOnly(Mutant):
    """add_weighted_adapter ('linear', 'svd') combines only the layers every adapter adapts: where the adapters'
    targets differ, the combined adapter's factors stay zero instead of carrying the one adapter there."""

    kills, test = ("LORA-WADD-001",), "test_wadd::test_linear_combination"

    def add_weighted_adapter(self, model, adapters, weights, adapter_name, combination_type, svd_rank=None):
        super().add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank)
        if combination_type not in ("linear", "svd"):
            return
        with torch.no_grad():
            for layer in lora_layers(model):
                if adapter_name in layer.r and not all(name in layer.r for name in adapters):
                    for factor in layer.factors(adapter_name):
                        factor.zero_()


class SavesTokenIndicesSorted(Mutant):
    """save writes trainable_token_indices sorted into adapter_config.json while the saved rows keep the configured
    order: reloaded, each row lands on another token."""

    kills, test = ("LORA-TOK-004",), "test_tok::test_saved_indices_keep_their_order_and_reload"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        path = adapter_dir(directory, adapter_name) / "adapter_config.json"
        config = json.loads(path.read_text())
        indices = config.get("trainable_token_indices")
        if isinstance(indices, list):
            config["trainable_token_indices"] = sorted(indices)
        elif isinstance(indices, dict):
            config["trainable_token_indices"] = {k: sorted(v) for k, v in indices.items()}
        path.write_text(json.dumps(config, indent=2))


class LokrIgnoresRankDropoutScale(Mutant):
    """LoKr's rank_dropout_scale is ignored in training: the rows rank_dropout keeps are never divided by the share
    kept."""

    kills, test = ("LOKR-FWD-002",), "test_methods::test_dropouts_in_train_mode_are_peft_s"

    def __init__(self):
        super().__init__()
        from reference_impl import lokr

        lokr.LoKrLayer.rank_dropout_rescales = lambda layer, name: False


class LohaRankDropoutWithoutRescale(Mutant):
    """LoHa's rank_dropout zeroes rows of the delta but leaves the kept rows as they are (LoKr's rule without
    rank_dropout_scale), where peft divides them by the share kept."""

    kills, test = ("LOHA-FWD-003",), "test_methods::test_dropouts_in_train_mode_are_peft_s"

    def __init__(self):
        super().__init__()
        from reference_impl import loha

        loha.LoHaLayer.rank_dropout_rescales = lambda layer, name: False
