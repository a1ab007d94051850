"""KEYS: the names and shapes under which adapter tensors are exchanged and saved.

For a driver with its own layout these compare the adapter in peft's layout (`layout.to_peft`); the saved files
(SER, LOAD, GOLD) are compared as they are.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness, scope
from conformance.engine.run import NOT_APPLICABLE
from conformance.zoo import models

PREFIX = harness.PREFIX


@pytest.mark.req("LORA-KEYS-001")
@given(data=st.data())
def test_keys_match_peft(run, device, data):
    case = run.draw(data)
    run.same_keys(run.initial_keys(case), run.initial_keys(case, run.oracle), "adapter keys (implementation vs peft)")


@pytest.mark.req("LORA-KEYS-001", "LORA-KEYS-003")
def test_keys_and_shapes_match_peft_on_every_zoo_model(run, device):
    # Every model once, all its targets at once: key prefixes (LLaVA's model.language_model.), grouped-query k/v
    # shapes (Llama: 2 key/value heads of 4), biased projections (Qwen2), heads, T5 and ViT names.
    from conformance.engine.strategies import Case

    for name in scope.models_in_scope(run.impl, single_layer=False):
        case = run.admit(Case(name, {"target_modules": scope.targets_in_scope(run.impl, name), "r": 4}))
        mine, theirs = run.initial_state(case), run.initial_state(case, run.oracle)
        run.same_keys(mine, theirs, f"{name}: adapter keys (implementation vs peft)", req="LORA-KEYS-001")
        for key in sorted(set(mine) & set(theirs)):
            found, expected = tuple(mine[key].shape), tuple(theirs[key].shape)
            run.check(found == expected, f"{name}: {key} has shape {found}, peft {expected}", req="LORA-KEYS-003")


@pytest.mark.req("LORA-KEYS-001")
@given(data=st.data())
def test_keys_name_the_module_not_the_adapter(run, device, data):
    case = run.draw(data, single_layer=True, kinds={"linear", "conv1d", "conv2d"}, extras=False)
    keys, layer = run.initial_keys(case), PREFIX + models.ZOO[case.model].layer
    run.check(keys == {layer + ".lora_A.weight", layer + ".lora_B.weight"}, f"adapter keys {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-002")
@given(data=st.data())
def test_embedding_keys_have_no_weight_suffix(run, device, data):
    case = run.draw(data, single_layer=True, kinds={"embedding"}, extras=False)
    keys, layer = run.initial_keys(case), PREFIX + models.ZOO[case.model].layer
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
    keys, key = run.initial_keys(case), f"{PREFIX}{models.ZOO[case.model].layer}.lora_magnitude_vector"
    run.check(key in keys, f"no key {key} among {sorted(keys)}")


@pytest.mark.req("LORA-KEYS-006")
@given(data=st.data(), bias=st.sampled_from(["lora_only", "all"]))
def test_bias_keys(run, device, data, bias):
    case = run.draw(data, extras=False, config={"bias": bias})
    keys, base = run.initial_keys(case), models.build(case.model)
    adapted = run.adapted_paths(keys, base)
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
    keys, key = run.initial_keys(case), f"{PREFIX}{models.ZOO[case.model].layer}.lora_B.bias"
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
    values = harness.adapter_values(harness.initial_values(mine), case.values_seed)
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
    # A parameter the forward pass never uses (LLaVA's vision post_layernorm under bias="all") stays without .grad;
    # a copy is never one of the model's parameters.
    parameters = {id(p) for p in mine.model.parameters()}
    for key, tensor in run.impl.adapter_state_dict(mine.model).items():
        if tensor.requires_grad:
            run.check(tensor.grad is not None or id(tensor) in parameters,
                      f"{key} has no .grad after backward and is not one of the model's parameters")


def _first_difference(mine: list[str], theirs: list[str]) -> str:
    for index, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"at position {index}: {a!r}, peft {b!r}"
    return f"{len(mine)} names, peft {len(theirs)}; extra {sorted(set(mine) ^ set(theirs))[:4]}"


@pytest.mark.req("LORA-KEYS-009")
@given(data=st.data())
def test_in_memory_names_match_peft(run, device, data):
    case = run.draw(data)
    mine, theirs = run.wrap(case).model, run.wrap(case, run.oracle).model
    for what, names in (("named_parameters()", lambda m: [n for n, _ in m.named_parameters()]),
                        ("state_dict()", lambda m: list(m.state_dict()))):
        found, expected = names(mine), names(theirs)
        run.check(found == expected,
                  f"{what} of the wrapped model differs from peft's {_first_difference(found, expected)}")


@pytest.mark.req("LORA-KEYS-010")
@given(data=st.data())
def test_targeted_embeddings_save_their_base_weights(run, device, data):
    pairs = [(m, t) for m in scope.models_in_scope(run.impl) for t in scope.targets_in_scope(run.impl, m)
             if t in ("embed_tokens", "lm_head")]
    if not pairs:
        pytest.skip(f"{NOT_APPLICABLE}no zoo model with embed_tokens or lm_head is in {run.impl.name}'s scope")
    model, target = data.draw(st.sampled_from(pairs), label="model and target")
    case = run.draw(data, extras=False, model=model, config={"target_modules": [target]})
    base = models.build(model, case.model_seed)
    paths = {id(module): path for path, module in base.named_modules()}
    targeted = scope.targeted(base, case.config)
    carrying = [paths[id(layer)] for layer in (base.get_input_embeddings(), base.get_output_embeddings())
                if paths.get(id(layer)) in targeted]
    expected = {f"{PREFIX}{path}.base_layer.weight": base.get_submodule(path).weight for path in carrying}
    state = run.initial_state(case)
    saved_base = {key for key in state if ".base_layer." in key}
    run.check(saved_base == set(expected), f"target_modules={[target]}: base weights saved {sorted(saved_base)}, "
                                           f"expected {sorted(expected)}")
    for key in sorted(saved_base & set(expected)):
        run.equal(state[key].cpu(), expected[key].detach(), f"{key} (the base weight as it was)")
