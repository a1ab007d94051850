"""Bugs that hidden broken drivers showed the suite missed (issue #28): each is otherwise exactly reference_impl."""

import contextlib
import json

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
