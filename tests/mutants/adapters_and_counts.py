"""Broken drivers for PARAM, MULTI, DEV and GOLD: counts, several adapters, devices and golden fixtures the way
other libraries get them wrong; and drivers that crash, hang or return garbage (LORA-ERR-015)."""

import contextlib

from tests.mutants.base import Mutant, lora_layers, named


class TotalExcludesTheAdapter(Mutant):
    """The total count is the base model's alone (the adapter is reported apart)."""

    kills, test = ("LORA-PARAM-001",), "test_param::test_counts_match_peft"

    def trainable_parameters(self, model):
        trainable, total = super().trainable_parameters(model)
        return trainable, total - trainable


class AdaptedBiasesTrain(Mutant):
    """The biases of adapted layers are left trainable with bias='none'."""

    kills, test = ("LORA-PARAM-002",), "test_param::test_counts_follow_the_formula"

    def after_wrap(self, model, config):
        if config.get("bias", "none") == "none":
            for layer in lora_layers(model):
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)


class CountsTiedWeightsTwice(Mutant):
    """The total counts a tied weight (GPT-2's wte and lm_head) once per name."""

    kills, test = ("LORA-PARAM-003", "LORA-GOLD-008"), "test_param::test_full_size_gpt2_counts"

    def trainable_parameters(self, model):
        trainable, _ = super().trainable_parameters(model)
        return trainable, sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


class BiasAllTrainsAdaptedOnly(Mutant):
    """bias='all' trains only the biases of adapted layers, like 'lora_only'."""

    kills, test = ("LORA-PARAM-004",), "test_param::test_bias_modes_train_biases"

    def after_wrap(self, model, config):
        if config.get("bias") == "all":
            adapted = {id(layer.base_layer.bias) for layer in lora_layers(model)}
            for name, param in model.named_parameters():
                if name.endswith(".bias") and id(param) not in adapted:
                    param.requires_grad_(False)


class AddedAdapterIsActive(Mutant):
    """add_adapter() also activates the new adapter next to the current one."""

    kills, test = ("LORA-MULTI-001",), "test_multi::test_added_adapter_is_inactive_and_frozen"

    def add_adapter(self, model, config, adapter_name):
        super().add_adapter(model, config, adapter_name)
        model.base_model.set_adapter([*model.base_model.active_adapters, adapter_name])


class SetAdapterKeepsTheOldTraining(Mutant):
    """set_adapter() switches the output but leaves every adapter trainable."""

    kills, test = ("LORA-MULTI-002",), "test_multi::test_set_and_delete_adapter"

    def set_adapter(self, model, adapter_name):
        super().set_adapter(model, adapter_name)
        for layer in lora_layers(model):
            for container in layer.factor_containers():
                container.requires_grad_(True)


class DeleteAdapterKeepsTensors(Mutant):
    """delete_adapter() forgets the name but keeps its tensors in the model."""

    kills, test = ("LORA-MULTI-003",), "test_multi::test_set_and_delete_adapter"

    def delete_adapter(self, model, adapter_name):
        model.base_model.peft_config.pop(adapter_name, None)


class SecondAdapterKeysNamed(Mutant):
    """A second adapter's keys carry its name: lora_A.other.weight."""

    kills, test = ("LORA-MULTI-005",), "test_keys::test_second_adapter_keys_carry_no_name"

    def adapter_state_dict(self, model, adapter_name="default"):
        live = super().adapter_state_dict(model, adapter_name)
        return live if adapter_name == "default" else named(live, adapter_name)


class CudaDropsTheAdapter(Mutant):
    """On CUDA the adapter is skipped (a kernel path without LoRA): the base output comes back."""

    kills, test, options = ("LORA-DEV-001",), "test_dev::test_cuda_output_matches_cpu", ("--peft-device=cpu,cuda",)

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, config, adapter_name)
        if next(model.parameters()).device.type == "cuda":
            wrapped.base_model.set_disabled(True)
        return wrapped


class OneLogitOff(Mutant):
    """A loaded model whose output is off by 1e-3 in a single logit."""

    kills, test = ("LORA-GOLD-003",), "test_gold::test_outputs_are_peft_s"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        model = super().load(base_model, directory, adapter_name, is_trainable)

        def nudge(module, args, kwargs, output):
            output.logits[0, 0, 0] += 1e-3
            return output

        model.register_forward_hook(nudge, with_kwargs=True)
        return model


class MergeIgnoresRankPattern(Mutant):
    """Merging scales every layer by alpha / r with the global r, forgetting rank_pattern."""

    kills, test = ("LORA-GOLD-004",), "test_gold::test_merged_outputs_are_peft_s"

    def merge(self, model):
        config = next(iter(model.peft_config.values()))
        for layer in lora_layers(model):
            kept = layer.scaling
            layer.scaling = {name: layer.lora_alpha[name] / config.r for name in layer.r}
            layer.merge()
            layer.scaling = kept


class DisableSkipsEmbeddings(Mutant):
    """disable_adapter() turns off every adapted layer but the embeddings."""

    kills, test = ("LORA-GOLD-005",), "test_gold::test_disabled_outputs_are_peft_s"

    @contextlib.contextmanager
    def disable_adapter(self, model):
        from reference_impl.layers import Embedding

        others = [layer for layer in lora_layers(model) if not isinstance(layer, Embedding)]
        for layer in others:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in others:
                layer.disabled = False


class TamperedFixtures(Mutant):
    """Not the driver: the golden fixtures it is checked against have one bit flipped (a corrupted install, or a
    fixture regenerated in place)."""

    kills, test = ("LORA-GOLD-001",), "test_gold::test_fixture_files_match_the_lock"

    @classmethod
    def environment(cls, scratch):
        import shutil

        from conformance import golden

        copy_dir = scratch / "fixtures"
        shutil.copytree(golden.root(), copy_dir)
        target = sorted(copy_dir.glob("v*/cases/*/adapter/adapter_model.safetensors"))[0]  # a case the suite runs
        data = bytearray(target.read_bytes())
        data[-3] ^= 0x01
        target.write_bytes(bytes(data))
        return {golden.ENV_ROOT: str(copy_dir)}


class SetAdapterIgnored(Mutant):
    """set_adapter() does nothing: the first adapter keeps computing."""

    kills, test = ("LORA-GOLD-007",), "test_gold::test_second_adapter_computes_peft_s_output"

    def set_adapter(self, model, adapter_name):
        pass


class RaisesOnWrap(Mutant):
    def wrap(self, model, config, adapter_name="default"):
        raise RuntimeError("driver bug: wrap exploded")


class CrashesOnRslora(Mutant):
    def wrap(self, model, config, adapter_name="default"):
        if config.get("use_rslora"):
            raise RuntimeError("driver bug: rsLoRA crashes")
        return super().wrap(model, config, adapter_name)


class WrapReturnsNone(Mutant):
    def wrap(self, model, config, adapter_name="default"):
        super().wrap(model, config, adapter_name)
        return None


class HangsOnWrap(Mutant):
    def wrap(self, model, config, adapter_name="default"):
        import time

        time.sleep(600)


class FailsThenHangs(Mutant):
    """Its first wrap raises; every later one hangs, so hypothesis' shrinking of that failure runs into the timeout:
    the report must show the failure found, not "hangs"."""

    calls = 0

    def wrap(self, model, config, adapter_name="default"):
        import time

        FailsThenHangs.calls += 1
        if FailsThenHangs.calls == 1:
            raise RuntimeError("driver bug: the first wrap fails")
        time.sleep(600)


class UnexpectedSavedKeys(Mutant):
    """Saves keys of its own (no peft names at all): tests that look for a peft key must fail on a requirement,
    not crash with StopIteration or KeyError."""

    def save(self, model, directory, adapter_name="default"):
        from tests.mutants.base import edit_files

        super().save(model, directory, adapter_name)
        edit_files(directory, tensors=lambda t: {f"weights.{i}": v for i, v in enumerate(t.values())},
                   adapter_name=adapter_name)
