"""KEYS: the names and shapes under which adapter tensors are exchanged and saved.

For a driver with its own layout these compare the adapter in peft's layout (`layout.to_peft`); the saved files
(SER, LOAD, GOLD) are compared as they are.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import harness, models

PREFIX = harness.PREFIX


@pytest.mark.req("LORA-KEYS-001")
@given(data=st.data())
def test_keys_match_peft(run, device, data):
    case = run.draw(data)
    theirs = run.initial_state(case, run.oracle)
    run.same_keys(run.initial_state(case), theirs, "adapter keys (implementation vs peft)")


@pytest.mark.req("LORA-KEYS-001")
@given(data=st.data())
def test_keys_name_the_module_not_the_adapter(run, device, data):
    case = run.draw(data, single_layer=True, kinds={"linear", "conv1d", "conv2d"}, extras=False)
    keys, layer = set(run.initial_state(case)), PREFIX + models.ZOO[case.model].layer
    run.check(keys == {layer + ".lora_A.weight", layer + ".lora_B.weight"}, f"adapter keys {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-002")
@given(data=st.data())
def test_embedding_keys_have_no_weight_suffix(run, device, data):
    case = run.draw(data, single_layer=True, kinds={"embedding"}, extras=False)
    keys, layer = set(run.initial_state(case)), PREFIX + models.ZOO[case.model].layer
    run.check(keys == {layer + ".lora_embedding_A", layer + ".lora_embedding_B"},
              f"embedding adapter keys {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-003")
@given(data=st.data())
def test_shapes_and_dtypes_match_peft(run, device, data):
    case = run.draw(data)
    theirs = run.initial_state(case, run.oracle)
    mine = run.initial_state(case)
    for key in sorted(set(mine) & set(theirs)):
        found, expected = (tuple(mine[key].shape), mine[key].dtype), (tuple(theirs[key].shape), theirs[key].dtype)
        run.check(found == expected, f"{key}: shape and dtype {found}, peft {expected}")


@pytest.mark.req("LORA-KEYS-005")
@given(data=st.data())
def test_dora_magnitude_key(run, device, data):
    case = run.draw(data, single_layer=True, extras=False, config={"use_dora": True})
    keys, key = set(run.initial_state(case)), f"{PREFIX}{models.ZOO[case.model].layer}.lora_magnitude_vector"
    run.check(key in keys, f"no key {key} among {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-006")
@given(data=st.data(), bias=st.sampled_from(["lora_only", "all"]))
def test_bias_keys(run, device, data, bias):
    case = run.draw(data, extras=False, config={"bias": bias})
    state, base = run.initial_state(case), models.build(case.model)
    keys, adapted = set(state), run.adapted_paths(state, base)
    biases = {n[:-5] for n, _ in base.named_parameters() if n.endswith(".bias")}  # modules that have a bias
    if bias == "lora_only":
        expected = {f"{PREFIX}{path}.base_layer.bias" for path in adapted & biases}
    else:
        expected = {PREFIX + (f"{path}.base_layer.bias" if path in adapted else f"{path}.bias") for path in biases}
    found = {k for k in keys if k.endswith(".bias")}
    run.check(found == expected, f"bias={bias!r}: bias keys {sorted(found)}, expected {sorted(expected)}")


@pytest.mark.req("LORA-KEYS-006")
@given(data=st.data())
def test_lora_bias_key(run, device, data):
    case = run.draw(data, single_layer=True, kinds={"linear", "conv1d"}, extras=False,
                    config={"lora_bias": True, "init_lora_weights": True})
    keys, key = set(run.initial_state(case)), f"{PREFIX}{models.ZOO[case.model].layer}.lora_B.bias"
    run.check(key in keys, f"no {key} among {sorted(keys)}")


@pytest.mark.req("LORA-MULTI-005")
@given(data=st.data())
def test_second_adapter_keys_carry_no_name(run, device, data):
    case = run.draw(data, extras=False)
    mine = run.wrap(case)
    run.impl.add_adapter(mine.model, dict(case.config), "other")
    default, other = run.peft_state(mine.model), run.peft_state(mine.model, "other")
    run.same_keys(other, default, "keys of adapter 'other' (vs 'default', same config)")


@pytest.mark.req("LORA-KEYS-007")
@given(data=st.data())
def test_loaded_values_read_back(run, device, data):
    case = run.draw(data)
    mine = run.wrap(case)
    values = harness.adapter_values(run.initial_in_peft_layout(mine), case.values_seed)
    own = harness.to_driver(run.impl, mine.model, values)
    run.impl.load_adapter_state_dict(mine.model, {k: v.to(device) for k, v in own.items()})
    readback = run.impl.adapter_state_dict(mine.model)
    run.require(set(readback) == set(own), "LORA-KEYS-001", f"keys read back differ from the keys loaded: "
                                                            f"{sorted(set(readback) ^ set(own))[:6]}")
    for key in sorted(own):
        run.equal(readback[key].detach().cpu(), own[key], f"value read back for {key}")


@pytest.mark.req("LORA-KEYS-008")
@given(data=st.data())
def test_adapter_state_dict_is_live(run, device, data):
    mine = run.adapted(run.draw(data))
    mine.output().float().pow(2).sum().backward()
    for key, tensor in run.impl.adapter_state_dict(mine.model).items():
        if tensor.requires_grad:
            run.check(tensor.grad is not None, f"{key} has no .grad after backward")
