"""KEYS: the names and shapes under which adapter tensors are exchanged and saved."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases

PREFIX = "base_model.model."


@pytest.mark.req("LORA-KEYS-001")
@pytest.mark.oracle
@given(data=st.data())
def test_keys_match_peft(impl, oracle, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = harness.initial_state(impl, case, device)
    theirs = harness.initial_state(oracle, case, device)
    checks.same_keys(mine, theirs, "LORA-KEYS-001", "adapter keys (implementation vs peft)")


@pytest.mark.req("LORA-KEYS-001", "LORA-KEYS-002")
@given(data=st.data())
def test_keys_name_the_module_not_the_adapter(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, extras=False), label="case")
    keys = set(harness.initial_state(impl, case, device))
    if "embedding" in case.model:
        checks.check(keys == {PREFIX + "layer.lora_embedding_A", PREFIX + "layer.lora_embedding_B"},
                     "LORA-KEYS-002", f"embedding adapter keys {sorted(keys)}")
    else:
        checks.check(keys == {PREFIX + "layer.lora_A.weight", PREFIX + "layer.lora_B.weight"},
                     "LORA-KEYS-001", f"adapter keys {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-003")
@pytest.mark.oracle
@given(data=st.data())
def test_shapes_and_dtypes_match_peft(impl, oracle, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = harness.initial_state(impl, case, device)
    theirs = harness.initial_state(oracle, case, device)
    for key in sorted(set(mine) & set(theirs)):
        found, expected = (tuple(mine[key].shape), mine[key].dtype), (tuple(theirs[key].shape), theirs[key].dtype)
        checks.check(found == expected, "LORA-KEYS-003", f"{key}: shape and dtype {found}, peft {expected}")


@pytest.mark.req("LORA-KEYS-005")
@pytest.mark.needs("dora")
@given(data=st.data())
def test_dora_magnitude_key(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, extras=False), label="case")
    keys = set(impl.adapter_state_dict(harness.wrap(impl, harness.with_config(case, use_dora=True), device,
                                                    torch.float32).model))
    checks.check(PREFIX + "layer.lora_magnitude_vector" in keys, "LORA-KEYS-005",
                 f"no key {PREFIX}layer.lora_magnitude_vector among {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-006")
@pytest.mark.needs("bias", "linear")
@given(data=st.data(), bias=st.sampled_from(["lora_only", "all"]))
def test_bias_keys(impl, device, data, bias):
    case = data.draw(cases(impl.capabilities, model="mlp", extras=False), label="case")
    mine = harness.wrap(impl, harness.with_config(case, bias=bias), device, torch.float32)
    keys = set(impl.adapter_state_dict(mine.model))
    adapted = harness.adapted_modules(keys)
    if bias == "lora_only":
        expected = {f"{PREFIX}{path}.base_layer.bias" for path in adapted}
    else:
        expected = {PREFIX + (f"{n[:-5]}.base_layer.bias" if n[:-5] in adapted else n)
                    for n, _ in mine.base().named_parameters() if n.endswith(".bias")}
    found = {k for k in keys if k.endswith(".bias")}
    checks.check(found == expected, "LORA-KEYS-006", f"bias={bias!r}: bias keys {sorted(found)}, "
                                                      f"expected {sorted(expected)}")


@pytest.mark.req("LORA-KEYS-006")
@pytest.mark.needs("lora_bias")
@given(data=st.data())
def test_lora_bias_key(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear", "conv1d"}, extras=False))
    case = harness.with_config(case, lora_bias=True, init_lora_weights=True)
    keys = set(harness.initial_state(impl, case, device))
    checks.check(PREFIX + "layer.lora_B.bias" in keys, "LORA-KEYS-006", f"no lora_B.bias among {sorted(keys)}")


@pytest.mark.req("LORA-MULTI-005")
@pytest.mark.needs("multi_adapter")
@given(data=st.data())
def test_second_adapter_keys_carry_no_name(impl, device, data):
    case = data.draw(cases(impl.capabilities, extras=False), label="case")
    mine = harness.wrap(impl, case, device, torch.float32)
    impl.add_adapter(mine.model, dict(case.config), "other")
    default, other = impl.adapter_state_dict(mine.model), impl.adapter_state_dict(mine.model, "other")
    checks.same_keys(other, default, "LORA-MULTI-005", "keys of adapter 'other' (vs 'default', same config)")


@pytest.mark.req("LORA-KEYS-007")
@pytest.mark.needs("autograd")
@given(data=st.data())
def test_adapter_state_dict_is_live(impl, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)  # loads values and reads them back
    mine.output().float().pow(2).sum().backward()
    for key, tensor in impl.adapter_state_dict(mine.model).items():
        if tensor.requires_grad:
            checks.check(tensor.grad is not None, "LORA-KEYS-007", f"{key} has no .grad after backward")
