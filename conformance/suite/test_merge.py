"""MERGE: folding the adapter into the base weights, and taking it out again."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


def _delta(layer: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s * B A in the layout the base layer stores its weight (LORA-MERGE-001)."""
    if isinstance(layer, torch.nn.Conv2d):
        return torch.einsum("or,ri...->oi...", B.flatten(1), A) * s
    delta = B @ A  # (out, in)
    return delta.T * s if isinstance(layer, torch.nn.Embedding) or type(layer).__name__ == "Conv1D" else delta * s


@pytest.mark.req("LORA-MERGE-001")
@pytest.mark.needs("merge")
@given(data=st.data())
def test_merged_weight_is_base_plus_delta(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, extras=False), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    base = mine.base().layer
    A, B = (t.to(device) for t in harness.factors(mine.values))
    merged = impl.merge_and_unload(mine.model).layer.weight
    expected = base.weight + _delta(base, A, B, harness.scaling(case.config))
    checks.close(merged.detach(), expected.detach(), "merge", "LORA-MERGE-001", "merged weight vs W + s*BA")


@pytest.mark.req("LORA-MERGE-002")
@pytest.mark.needs("merge")
@given(data=st.data())
def test_merged_output_equals_unmerged(impl, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    unmerged = mine.output()
    impl.merge(mine.model)
    checks.close(mine.output(), unmerged, "merge", "LORA-MERGE-002", "merged output vs unmerged output")


@pytest.mark.req("LORA-MERGE-003")
@pytest.mark.needs("merge", "unload")
@given(data=st.data())
def test_merge_then_unmerge_restores_base_weights(impl, device, data):
    # Without trained biases or modules_to_save copies, the base weights are exactly the pristine model's.
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), bias=None, modules_to_save=None)
    mine, _ = harness.adapted_pair(impl, None, case, device)
    impl.merge(mine.model)
    impl.unmerge(mine.model)
    restored = impl.unload(mine.model).state_dict()
    checks.all_close(restored, mine.base().state_dict(), "merge", "LORA-MERGE-003", "weight after merge+unmerge:")


@pytest.mark.req("LORA-MERGE-004")
@pytest.mark.needs("merge")
@given(data=st.data())
def test_merge_and_unload_returns_the_plain_model(impl, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    adapted_output = mine.output()
    merged = impl.merge_and_unload(mine.model)
    checks.check(merged is mine.original, "LORA-MERGE-004",
                 f"merge_and_unload returned a {type(merged).__name__}, not the model object that was wrapped")
    base = mine.base()
    types = {n: type(m).__name__ for n, m in merged.named_modules()}
    expected_types = {n: type(m).__name__ for n, m in base.named_modules()}
    checks.check(types == expected_types, "LORA-MERGE-004", "module types after merge_and_unload differ: "
                 f"{sorted(set(types.items()) ^ set(expected_types.items()))[:4]}")
    checks.same_keys(merged.state_dict(), base.state_dict(), "LORA-MERGE-004", "state-dict keys")
    checks.close(mine.output(merged), adapted_output, "merge", "LORA-MERGE-004", "merged model output")


@pytest.mark.req("LORA-MERGE-006")
@pytest.mark.needs("dora", "merge")
@given(data=st.data())
def test_dora_merge_formula(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear", "conv1d"}, extras=False))
    mine, _ = harness.adapted_pair(impl, None, harness.with_config(case, use_dora=True), device)
    layer = mine.base().layer
    A, B = (t.to(device) for t in harness.factors(mine.values))
    magnitude = mine.values["base_model.model.layer.lora_magnitude_vector"].to(device)
    conv1d = type(layer).__name__ == "Conv1D"
    adapted = (layer.weight.T if conv1d else layer.weight) + harness.scaling(case.config) * B @ A  # (out, in)
    expected = (magnitude / adapted.norm(dim=1))[:, None] * adapted
    merged = impl.merge_and_unload(mine.model).layer.weight
    checks.close(merged.detach(), (expected.T if conv1d else expected).detach(), "merge", "LORA-MERGE-006",
                 "merged DoRA weight vs m/||W + sBA|| (W + sBA)")


@pytest.mark.req("LORA-MERGE-007")
@pytest.mark.needs("lora_bias", "merge")
@given(data=st.data())
def test_lora_bias_is_merged_into_the_base_bias(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear", "conv1d"}, extras=False))
    case = harness.with_config(case, lora_bias=True, init_lora_weights=True)
    mine, _ = harness.adapted_pair(impl, None, case, device)
    lora_bias = mine.values["base_model.model.layer.lora_B.bias"].to(device)
    expected = mine.base().layer.bias + harness.scaling(case.config) * lora_bias
    merged = impl.merge_and_unload(mine.model).layer.bias
    checks.close(merged.detach(), expected.detach(), "merge", "LORA-MERGE-007", "merged bias vs b + s * B.bias")
