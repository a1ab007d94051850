"""INIT: the adapter tensors right after wrapping: shapes, values, device and dtype, and no copies."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


def _expected_shapes(layer: torch.nn.Module, r: int) -> dict[str, tuple]:
    """LORA-INIT-001 by layer type; GPT-2's Conv1D stores its weight (in, out)."""
    if isinstance(layer, torch.nn.Embedding):
        return {"lora_embedding_A": (r, layer.num_embeddings), "lora_embedding_B": (layer.embedding_dim, r)}
    if isinstance(layer, torch.nn.Conv2d):
        ones = (1,) * (layer.weight.dim() - 2)
        return {"lora_A.weight": (r, layer.in_channels, *layer.kernel_size),
                "lora_B.weight": (layer.out_channels, r // layer.groups, *ones)}
    in_features, out_features = (layer.weight.shape if type(layer).__name__ == "Conv1D"
                                 else (layer.in_features, layer.out_features))
    return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}


@pytest.mark.req("LORA-INIT-001")
@given(data=st.data())
def test_factor_shapes(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, extras=False), label="case")
    mine = harness.wrap(impl, case, device, torch.float32)
    shapes = {k.removeprefix("base_model.model.layer."): tuple(v.shape)
              for k, v in impl.adapter_state_dict(mine.model).items()}
    expected = _expected_shapes(mine.base().layer, case.config["r"])
    checks.check(shapes == expected, "LORA-INIT-001", f"adapter shapes {shapes}, expected {expected}")


@pytest.mark.req("LORA-INIT-002")
@given(data=st.data())
def test_fresh_adapter_is_a_no_op(impl, device, data):
    case = data.draw(cases(impl.capabilities, extras=False), label="case")
    inits = [True, "gaussian"] if "init_variants" in impl.capabilities else [True]
    case = harness.with_config(case, init_lora_weights=data.draw(st.sampled_from(inits), label="init"))
    mine = harness.wrap(impl, case, device, torch.float32)
    checks.equal(mine.output(), mine.output(mine.base()), "LORA-INIT-002", "output of a fresh adapter vs the base")


@pytest.mark.req("LORA-INIT-003")
@pytest.mark.needs("init_rng")
@pytest.mark.oracle
@given(data=st.data())
def test_initial_values_match_peft_for_the_same_seed(impl, oracle, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = harness.initial_state(impl, case, device)
    theirs = harness.initial_state(oracle, case, device)
    checks.same_keys(mine, theirs, "LORA-KEYS-001", "adapter keys")
    for key in sorted(theirs):
        if not key.endswith("lora_magnitude_vector"):  # a norm, computed: LORA-INIT-008 compares it
            checks.equal(mine[key].detach(), theirs[key].detach(), "LORA-INIT-003", f"initial {key}")


@pytest.mark.req("LORA-INIT-005")
@pytest.mark.needs("init_variants")
@given(data=st.data())
def test_init_false_keeps_constructor_values(impl, device, data):
    case = harness.with_config(data.draw(cases(impl.capabilities, extras=False), label="case"),
                               init_lora_weights=False)
    mine = harness.wrap(impl, case, device, torch.float32)
    for key, tensor in impl.adapter_state_dict(mine.model).items():
        checks.check(bool(tensor.detach().abs().sum() > 0), "LORA-INIT-005", f"{key} is all zeros")
    checks.check(not torch.equal(mine.output(), mine.output(mine.base())), "LORA-INIT-005",
                 "with init_lora_weights=False the output equals the base output")


@pytest.mark.req("LORA-INIT-006")
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_adapters_on_base_device_in_float32(impl, device, data, dtype):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = harness.wrap(impl, case, device, dtype)
    for key, tensor in impl.adapter_state_dict(mine.model).items():
        checks.check(tensor.device.type == torch.device(device).type, "LORA-INIT-006",
                     f"{key} is on {tensor.device}, the base model on {device}")
        if ".lora_" in key and tensor.is_floating_point():
            checks.check(tensor.dtype == torch.float32, "LORA-INIT-006",
                         f"{key} is {tensor.dtype} on a {dtype} base; peft upcasts adapters to float32")


@pytest.mark.req("LORA-INIT-007")
@given(data=st.data())
def test_injection_is_in_place(impl, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = harness.wrap(impl, case, device, torch.float32)
    wrapped = {id(p) for p in mine.model.parameters()}  # the originals are alive in original_params: ids unique
    copied = [name for name, p in mine.original_params.items() if id(p) not in wrapped]
    checks.check(not copied, "LORA-INIT-007", f"base parameters replaced by copies: {copied[:5]}")


@pytest.mark.req("LORA-INIT-008")
@pytest.mark.needs("dora")
@given(data=st.data())
def test_dora_magnitude_starts_at_the_weight_norm(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, extras=False), label="case")
    case = harness.with_config(case, use_dora=True, init_lora_weights=True)
    mine = harness.wrap(impl, case, device, torch.float32)
    magnitude = impl.adapter_state_dict(mine.model)["base_model.model.layer.lora_magnitude_vector"].detach()
    layer = mine.base().layer
    weight = layer.weight if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) else layer.weight.T
    expected = weight.flatten(1).norm(dim=1)  # one norm per output feature, (out, in, ...) orientation
    checks.close(magnitude.flatten(), expected, "fp32", "LORA-INIT-008", "initial DoRA magnitude vs ||W||_row")
    checks.check(math.prod(magnitude.shape) == expected.numel(), "LORA-INIT-008", "magnitude size")
