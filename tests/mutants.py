"""Deliberately broken drivers: the suite must fail each one on the requirement named in MUTANTS.

Each wraps reference_impl and breaks one thing the way real implementations get it wrong.
"""

import contextlib

import torch

import reference_impl
from conformance.drivers.peft_shaped import PeftShapedDriver
from conformance.drivers.reference import ReferenceDriver
from reference_impl import layers, save_load


class _Mutant(PeftShapedDriver):
    def __init__(self):
        base = ReferenceDriver()
        super().__init__(f"mutant-{type(self).__name__}", reference_impl, base.version, save_load.adapter_state_dict)


class WrongScaling(_Mutant):
    """scaling = alpha / r is doubled after wrapping."""

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, config, adapter_name)
        for module in wrapped.modules():
            if isinstance(module, layers.LoraLayer):
                module.scaling = {k: 2 * v for k, v in module.scaling.items()}
        return wrapped


class KeysKeepAdapterName(_Mutant):
    """Saved keys keep '.default.' (lora_A.default.weight), as peft <= 0.3 consumers sometimes expect."""

    def adapter_state_dict(self, model, adapter_name="default"):
        live = super().adapter_state_dict(model, adapter_name)
        return {k.replace(".lora_A.", f".lora_A.{adapter_name}.").replace(".lora_B.", f".lora_B.{adapter_name}."): v
                for k, v in live.items()}

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        fixed = {k.replace(f".{adapter_name}.", "."): v for k, v in state_dict.items()}
        super().load_adapter_state_dict(model, fixed, adapter_name)


class UnloadLeavesWrapper(_Mutant):
    """unload() returns the model with the LoRA layers still in it."""

    def unload(self, model):
        return model.get_base_model()


class MergeWithoutScaling(_Mutant):
    """merge() adds B A, forgetting the scaling."""

    def merge(self, model):
        for module in model.modules():
            if isinstance(module, layers.LoraLayer):
                for name in module.active_adapters:
                    A, B = module.factors(name)
                    module.base_layer.weight.data += module.out_first(module.delta_from_factors(A, B))
                    module.merged_adapters.append(name)


class Conv1DNotTransposed(_Mutant):
    """GPT-2 Conv1D treated like nn.Linear: B A used as (in, out) without the transpose, via A and B swapped."""

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, config, adapter_name)
        for module in wrapped.modules():
            if isinstance(module, layers.Linear) and module.fan_in_fan_out:
                module.forward = _forward_with_weight_view(module)
        return wrapped


def _forward_with_weight_view(module):
    def forward(x):
        result = module.base_layer(x)
        for name in module.active_adapters:
            A, B = module.factors(name)
            result = result + x @ (B @ A).reshape(A.shape[1], B.shape[0]) * module.scaling[name]
        return result
    return forward


class BaseNotFrozen(_Mutant):
    """Base parameters keep requires_grad=True."""

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, config, adapter_name)
        for param in wrapped.parameters():
            param.requires_grad_(True)
        return wrapped


class CopiesBaseWeights(_Mutant):
    """Injection that copies the base layer instead of wrapping it in place."""

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, config, adapter_name)
        for module in wrapped.modules():
            if isinstance(module, layers.LoraLayer):
                module.base_layer.weight = torch.nn.Parameter(module.base_layer.weight.detach().clone(),
                                                              requires_grad=False)
        return wrapped


class DisableDoesNothing(_Mutant):
    def disable_adapter(self, model):
        return contextlib.nullcontext()


# mutant -> (the suite test to run, the requirement that must fail)
MUTANTS = {
    "WrongScaling": ("test_fwd::test_linear_layer_formula", "LORA-FWD-001"),
    "KeysKeepAdapterName": ("test_keys::test_keys_match_peft", "LORA-KEYS-001"),
    "UnloadLeavesWrapper": ("test_unload::test_unload_restores_the_base_state_dict", "LORA-UNLOAD-001"),
    "MergeWithoutScaling": ("test_merge::test_merged_output_equals_unmerged", "LORA-MERGE-002"),
    "Conv1DNotTransposed": ("test_fwd::test_linear_layer_formula", "LORA-FWD-001"),
    "BaseNotFrozen": ("test_grad::test_base_parameters_get_no_gradient", "LORA-GRAD-002"),
    "CopiesBaseWeights": ("test_init::test_injection_is_in_place", "LORA-INIT-007"),
    "DisableDoesNothing": ("test_fwd::test_disable_adapter_gives_base_output", "LORA-FWD-007"),
}


class OneLogitOff(_Mutant):
    """A loaded model whose output is off by 1e-3 in a single logit."""

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        model = super().load(base_model, directory, adapter_name, is_trainable)

        def nudge(module, args, kwargs, output):
            output.logits[0, 0, 0] += 1e-3
            return output

        model.register_forward_hook(nudge, with_kwargs=True)
        return model


class RaisesOnWrap(_Mutant):
    def wrap(self, model, config, adapter_name="default"):
        raise RuntimeError("driver bug: wrap exploded")


class WrapReturnsNone(_Mutant):
    def wrap(self, model, config, adapter_name="default"):
        super().wrap(model, config, adapter_name)
        return None


class HangsOnWrap(_Mutant):
    def wrap(self, model, config, adapter_name="default"):
        import time

        time.sleep(600)
