"""Broken drivers for INIT, FWD and GRAD: adapters initialised, computed or trained the way other libraries get
it wrong."""

import types

import torch
import torch.nn.functional as F

from reference_impl import dora, layers
from tests.mutants.base import Mutant, lora_layers


class TransposedBInStateDict(Mutant):
    """lora_B is exchanged as (r, out), the layout of a library that computes x A^T then multiplies by B."""

    kills, test = ("LORA-INIT-001",), "test_init::test_factor_shapes"

    def adapter_state_dict(self, model, adapter_name="default"):
        return {k: v.T if k.endswith("lora_B.weight") else v for k, v in super().adapter_state_dict(
            model, adapter_name).items()}

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, {k: v.T if k.endswith("lora_B.weight") else v
                                                for k, v in state_dict.items()}, adapter_name)


class NonZeroInitialB(Mutant):
    """B starts at small random values (both factors "initialised"), so a fresh adapter already changes outputs."""

    kills, test = ("LORA-INIT-002",), "test_init::test_fresh_adapter_is_a_no_op"

    def after_wrap(self, model, config):
        with torch.no_grad():
            for layer in lora_layers(model):
                for name in layer.r:
                    layer.factors(name)[1].normal_(std=0.02)


class InitFalseZeroesB(Mutant):
    """init_lora_weights=False still zeroes B: the "no init" option does nothing."""

    kills, test = ("LORA-INIT-005",), "test_init::test_init_false_keeps_constructor_values"

    def after_wrap(self, model, config):
        if config.get("init_lora_weights") is False:
            with torch.no_grad():
                for layer in lora_layers(model):
                    for name in layer.r:
                        layer.factors(name)[1].zero_()


class AdaptersInBaseDtype(Mutant):
    """Adapters are created in the base model's dtype (bf16 factors on a bf16 model), not upcast to float32."""

    kills, test = ("LORA-INIT-006",), "test_init::test_adapters_on_base_device_in_float32"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            for container in (*layer.factor_containers(), layer.lora_magnitude_vector):
                container.to(layer.base_layer.weight.dtype)


class CopiesBaseWeights(Mutant):
    """Injection copies the base layer's weight instead of wrapping it in place (twice the memory, and the
    caller's model no longer sees training)."""

    kills, test = ("LORA-INIT-007",), "test_init::test_injection_is_in_place"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)


class DoraMagnitudeOnes(Mutant):
    """DoRA's magnitude starts at ones instead of the weight norm."""

    kills, test = ("LORA-INIT-008",), "test_init::test_dora_magnitude_starts_at_the_weight_norm"

    def after_wrap(self, model, config):
        with torch.no_grad():
            for layer in lora_layers(model):
                for magnitude in layer.lora_magnitude_vector.values():
                    magnitude.weight.fill_(1.0)


class DoraMagnitudeIgnoresInitialDelta(Mutant):
    """DoRA's magnitude always starts at ||W||, also when the initial delta is not zero (init_lora_weights=False)."""

    kills, test = ("LORA-INIT-009",), "test_init::test_dora_magnitude_starts_at_the_initial_adapted_weight"

    def after_wrap(self, model, config):
        with torch.no_grad():
            for layer in lora_layers(model):
                for magnitude in layer.lora_magnitude_vector.values():
                    weight = layer.out_first(layer.base_layer.weight)
                    magnitude.weight.copy_(weight.flatten(1).norm(dim=1).view(magnitude.weight.shape))


class WrongScaling(Mutant):
    """scaling = alpha / r is doubled after wrapping."""

    kills, test = ("LORA-FWD-001",), "test_fwd::test_linear_layer_formula"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            layer.scaling = {k: 2 * v for k, v in layer.scaling.items()}


class Conv1DNotTransposed(Mutant):
    """GPT-2's Conv1D treated like nn.Linear: B A used as an (in, out) matrix without the transpose."""

    kills, test = ("LORA-FWD-001",), "test_fwd::test_linear_layer_formula"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            if isinstance(layer, layers.Linear) and layer.fan_in_fan_out:
                layer.forward = _forward_with_weight_view(layer)


def _forward_with_weight_view(layer):
    def forward(x):
        result = layer.base_layer(x)
        for name in layer.active_adapters:
            A, B = layer.factors(name)
            result = result + x @ (B @ A).reshape(A.shape[1], B.shape[0]) * layer.scaling[name]
        return result
    return forward


class RsloraIgnored(Mutant):
    """use_rslora is read and dropped: scaling stays alpha / r."""

    kills, test = ("LORA-FWD-002",), "test_fwd::test_rslora_scaling"

    def edit_config(self, config):
        config.pop("use_rslora", None)
        return config


class EmbeddingDropout(Mutant):
    """lora_dropout is applied to the embedding adapter's lookup too (peft applies none to embeddings)."""

    kills, test = ("LORA-FWD-003",), "test_fwd::test_embedding_layer_formula"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            if isinstance(layer, layers.Embedding):
                layer.adapter_output = types.MethodType(_dropped_embedding_output, layer)


def _dropped_embedding_output(layer, name, x, result):
    A, B = layer.factors(name)
    looked_up = layer.lora_dropout[name](layer.lookup(x, A.T))
    return result + (looked_up @ B.T) * layer.scaling[name]


class DropoutNotApplied(Mutant):
    """lora_dropout is accepted and never applied, in train mode either."""

    kills, test = ("LORA-FWD-004",), "test_fwd::test_train_mode_dropout_matches_peft"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            for name in list(layer.lora_dropout):
                layer.lora_dropout[name] = torch.nn.Identity()


class OutputUpcast(Mutant):
    """An adapted layer returns float32 on a bf16 base (the LoRA branch's dtype wins)."""

    kills, test = ("LORA-FWD-005",), "test_fwd::test_half_precision_base_keeps_its_dtype"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            layer.register_forward_hook(lambda module, args, output: output.float())


class BranchInBaseDtype(Mutant):
    """On a bf16/fp16 base the LoRA branch of a Linear runs in the base dtype (x, A and B rounded to it), where peft
    computes it in the adapter's float32 and adds it to the upcast base output before rounding once."""

    kills, test, options = ("LORA-FWD-006",), "test_fwd::test_output_matches_peft", (
        "--peft-dtype=bfloat16,float16",)

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            if type(layer) is layers.Linear:  # nn.Linear and GPT-2's Conv1D
                layer.adapter_input = lambda name, x: x
                layer.adapter_output = types.MethodType(_branch_in_input_dtype, layer)


def _branch_in_input_dtype(layer, name, x, result):
    if name in layer.lora_magnitude_vector:  # DoRA as peft computes it: the mutant breaks plain LoRA only
        return layers.LoraLayer.adapter_output(layer, name, x.to(layer.lora_A[name].weight.dtype), result)
    down, up = layer.lora_A[name], layer.lora_B[name]
    bias = None if up.bias is None else up.bias.to(x.dtype)  # lora_bias
    hidden = F.linear(layer.lora_dropout[name](x), down.weight.to(x.dtype))
    return result + F.linear(hidden, up.weight.to(x.dtype), bias) * layer.scaling[name]


class AlphaPatternIgnored(Mutant):
    """alpha_pattern is read and dropped: every layer is scaled by the global lora_alpha."""

    kills, test = ("LORA-FWD-006",), "test_fwd::test_output_matches_peft"

    def edit_config(self, config):
        config.pop("alpha_pattern", None)
        return config


class DisableDoesNothing(Mutant):
    """disable_adapter() returns a context that changes nothing."""

    kills, test = ("LORA-FWD-007",), "test_fwd::test_disable_adapter_gives_base_output"

    def disable_adapter(self, model):
        import contextlib

        return contextlib.nullcontext()


class DoraWithoutMagnitude(Mutant):
    """use_dora creates the magnitude but the forward pass is plain LoRA."""

    kills, test = ("LORA-FWD-008",), "test_fwd::test_dora_linear_formula"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            if layer.lora_magnitude_vector and isinstance(layer, layers.Linear):
                layer.adapter_output = types.MethodType(_plain_linear_output, layer)


def _plain_linear_output(layer, name, x, result):
    return result + layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]


class ConvLoraIgnoresStride(Mutant):
    """lora_A of a conv is built with stride 1 whatever the base conv's stride."""

    kills, test = ("LORA-FWD-009",), "test_fwd::test_conv_layer_formula"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            if isinstance(layer, layers.Conv):
                for A in layer.lora_A.values():
                    A.stride = (1,) * len(A.stride)


class OnlyBTrains(Mutant):
    """A is frozen after initialisation and only B trains (a LoRA-FA-like shortcut): A gets no gradient."""

    kills, test = ("LORA-GRAD-001",), "test_grad::test_gradients_match_peft"

    def after_wrap(self, model, config):
        for layer in lora_layers(model):
            for name in layer.r:
                layer.factors(name)[0].requires_grad_(False)


class BaseNotFrozen(Mutant):
    """Base parameters keep requires_grad=True."""

    kills, test = ("LORA-GRAD-002",), "test_grad::test_base_parameters_get_no_gradient"

    def after_wrap(self, model, config):
        for param in model.parameters():
            param.requires_grad_(True)


class DoraNormNotDetached(Mutant):
    """DoRA's weight norm stays in the graph, so gradients flow through it (the paper detaches it, §4.3)."""

    kills, test = ("LORA-GRAD-003",), "test_grad::test_dora_gradients_match_peft"

    def __init__(self):
        super().__init__()
        dora._scale = _attached_scale  # this mutant's process only: reference_impl's DoRA, broken


def _attached_scale(layer, name, dtype):
    A, B = layer.factors(name)
    norm = dora._norm(layer, layer.base_layer.weight.to(dtype), layer.scaling[name] * layer.delta_from_factors(A, B))
    return layer.lora_magnitude_vector[name].weight / norm
