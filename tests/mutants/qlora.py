"""Bugs of LoRA on quantized bases (QLORA-*): each is reference_impl with one step of quantized.py done another way
that real implementations do."""

import contextlib

import torch
from torch import nn

from reference_impl import quantized
from reference_impl.quantized import QuantizedLinear
from tests.mutants.base import Mutant, lora_layers


def _quantized_layers(model) -> list[QuantizedLinear]:
    return [layer for layer in lora_layers(model) if isinstance(layer, QuantizedLinear)]


class AddsThenCastsOnQuantized(Mutant):
    """On a quantized layer the adapter's float32 term is added to the base output and the sum cast (as on a float
    Linear), not cast and then added: the last bit of a half-precision output differs."""

    kills, test = ("QLORA-FWD-001",), "test_qlora::test_output_is_the_formula_on_the_quantized_base"
    options = ("--peft-dtype=bfloat16",)

    def __init__(self):
        super().__init__()

        def adds_then_casts(layer, name, x, result):
            lora = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
            return (result + lora).to(result.dtype)

        QuantizedLinear.adapter_output = adds_then_casts


class AdapterCreatedInFloat32(Mutant):
    """A new adapter on a 4-bit layer is created in float32 directly, not in the layer's compute dtype: its initial
    A is not rounded to bfloat16 as peft's is."""

    kills, test = ("QLORA-INIT-001",), "test_qlora::test_initial_adapter_is_float32_as_peft_creates_it"
    options = ("--peft-dtype=bfloat16",)

    def __init__(self):
        super().__init__()
        QuantizedLinear.adapter_dtype = lambda layer: None


class DetachesInputOfQuantizedAdapters(Mutant):
    """The adapter on a quantized layer takes x.detach() (to keep the frozen base out of the graph): the gradient
    that reaches earlier layers through the adapter branch is lost, so earlier adapters train on part of it."""

    kills, test = ("QLORA-GRAD-001",), "test_qlora::test_gradients_are_the_formulas_and_peft_s"

    def __init__(self):
        super().__init__()
        adapter_output = QuantizedLinear.adapter_output
        QuantizedLinear.adapter_output = lambda layer, name, x, result: adapter_output(layer, name, x.detach(), result)


class CountsPackedBytesOnce(Mutant):
    """Counts a packed 4-bit weight by its numel, one parameter per byte: half the base's quantized weights."""

    kills, test = ("QLORA-PARAM-001",), "test_qlora::test_counts_count_packed_weights_twice_per_byte"

    def trainable_parameters(self, model):
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class SavesInComputeDtype(Mutant):
    """Saves the adapter of a quantized model in the model's compute dtype (bfloat16) instead of the float32 it
    trains in."""

    kills, test = ("QLORA-SER-001",), "test_qlora::test_saved_adapter_is_peft_s_and_reloads"
    options = ("--peft-dtype=bfloat16",)

    def save(self, model, directory, adapter_name="default"):
        with _tensors_cast(model, torch.bfloat16):
            super().save(model, directory, adapter_name)


@contextlib.contextmanager
def _tensors_cast(model, dtype):
    originals = {}
    for layer in _quantized_layers(model):
        for container in layer.factor_containers():
            for name, module in container.items():
                originals[module] = module.weight.data
                module.weight.data = module.weight.data.to(dtype)
    try:
        yield
    finally:
        for module, data in originals.items():
            module.weight.data = data


class DisableSkipsQuantizedLayers(Mutant):
    """disable_adapter() turns off the adapters of float layers only; quantized layers keep adding theirs."""

    kills, test = ("QLORA-FWD-002",), "test_qlora::test_disabled_adapter_computes_the_quantized_base"

    @contextlib.contextmanager
    def disable_adapter(self, model):
        with model.disable_adapter():
            for layer in _quantized_layers(model):
                layer.disabled = False
            yield


class MergeDequantizesToFloat(Mutant):
    """merge_and_unload puts a float nn.Linear holding dequant(W) + s B A where a quantized layer was: the merged
    model is no longer quantized (and several times larger)."""

    kills, test = ("QLORA-MERGE-001",), "test_qlora::test_merge_requantizes_the_sum_as_peft_does"

    def merge_and_unload(self, model):
        for layer in _quantized_layers(model):
            layer.merge()
            weight = quantized.dequantized(layer.base_layer)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=weight.dtype,
                              device=weight.device)
            dense.weight.data = weight
            layer.base_layer = dense
            layer.merged_adapters = []
        return super().merge_and_unload(model)


class UnmergeAddsAgain(Mutant):
    """unmerge on a quantized layer adds the delta a second time instead of subtracting it."""

    kills, test = ("QLORA-MERGE-002",), "test_qlora::test_unmerge_requantizes_as_peft_does"

    def __init__(self):
        super().__init__()
        QuantizedLinear.unmerged_weight = lambda layer, name, weight: layer.add_delta(name, weight, 1, False)


class UnloadDequantizes(Mutant):
    """unload() hands back float nn.Linear layers holding the dequantized weights instead of the quantized ones."""

    kills, test = ("QLORA-UNLOAD-001",), "test_qlora::test_unload_gives_back_the_quantized_base"

    def unload(self, model):
        for layer in _quantized_layers(model):
            weight = quantized.dequantized(layer.base_layer)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=weight.dtype,
                              device=weight.device)
            dense.weight.data = weight
            layer.base_layer = dense
        return super().unload(model)


class DoraFallsBackToLoraOnQuantized(Mutant):
    """On a quantized layer DoRA's magnitude is kept (and saved) but not applied: the layer computes plain LoRA."""

    kills, test = ("QLORA-DORA-001",), "test_qlora::test_dora_on_the_quantized_base_matches_peft"

    def __init__(self):
        super().__init__()

        def plain_lora(layer, name, x, result):
            lora = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
            return result + lora.to(result.dtype)

        QuantizedLinear.adapter_output = plain_lora


class SetAdapterSkipsQuantizedLayers(Mutant):
    """set_adapter switches the float layers to the new adapter; quantized layers keep running the first one."""

    kills, test = ("QLORA-MULTI-001",), "test_qlora::test_second_adapter_on_the_quantized_base"

    def set_adapter(self, model, adapter_name):
        kept = {layer: list(layer.active_adapters) for layer in _quantized_layers(model)}
        super().set_adapter(model, adapter_name)
        for layer, names in kept.items():
            layer.active_adapters = names


class RecreatesTheInputEmbeddings(Mutant):
    """Wrapping re-creates the input embedding module from its weight (as libraries that resize or wrap embeddings
    do): the forward hook prepare_model_for_kbit_training put on it is gone, so under gradient checkpointing the
    adapters inside the checkpointed blocks get no gradient."""

    kills, test = ("QLORA-PREP-001",), "test_qlora::test_training_on_a_prepared_base_gives_the_formula_s_gradients"

    def after_wrap(self, model, config: dict) -> None:
        for name, module in list(model.named_modules()):
            if name.endswith("embed_tokens") and type(module) is nn.Embedding:
                parent, _, child = name.rpartition(".")
                fresh = nn.Embedding.from_pretrained(module.weight, freeze=True, padding_idx=module.padding_idx)
                setattr(model.get_submodule(parent), child, fresh)


class OwnQuantizerScalesTwice(Mutant):
    """A library that quantizes the base itself (it says so: base_quantizer) and scales its adapter by
    2 * alpha / r: comparing what the adapter adds over each side's own base still finds the doubled term."""

    kills, test = ("QLORA-FWD-001",), "test_qlora::test_output_is_the_formula_on_the_quantized_base"
    base_quantizer = "bitsandbytes, called by this library"

    def __init__(self):
        super().__init__()
        adapter_output = QuantizedLinear.adapter_output

        def doubled(layer, name, x, result):
            return 2 * adapter_output(layer, name, x, result) - result

        QuantizedLinear.adapter_output = doubled
