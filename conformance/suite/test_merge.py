"""MERGE: folding the adapter into the base weights, and taking it out again."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.engine import harness, scope
from conformance.zoo import models
from reference_impl.peft_format import is_conv1d

LINEAR_KINDS = {"linear", "conv1d"}


def _delta(layer: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s * B A in the layout the base layer stores its weight (LORA-MERGE-001)."""
    if isinstance(layer, torch.nn.Conv2d):
        return torch.einsum("or,ri...->oi...", B.flatten(1), A) * s
    delta = B @ A  # (out, in)
    return delta.T * s if isinstance(layer, torch.nn.Embedding) or is_conv1d(layer) else delta * s


@pytest.mark.req("LORA-MERGE-001")
@given(data=st.data())
def test_merged_weight_is_base_plus_delta(run, device, data):
    mine = run.adapted(run.draw(data, single_layer=True, extras=False))
    base = mine.base_layer()
    A, B = run.factors(mine.values, mine.path)
    run.impl.merge(mine.model)
    merged = mine.original_params[f"{mine.path}.weight"]  # injection is in place (LORA-INIT-007): merging writes here
    expected = base.weight + _delta(base, A, B, harness.scaling(mine.case.config))
    run.close(merged.detach(), expected.detach(), "merged weight vs W + s*BA")


@pytest.mark.req("LORA-MERGE-002")
@given(data=st.data())
def test_merged_output_equals_unmerged(run, device, data):
    case = run.draw(data)
    assume(not scope.adapts_a_shared_weight(models.build(case.model, case.model_seed), case.config))  # see quirk
    mine = run.adapted(case)
    unmerged = mine.output()
    run.impl.merge(mine.model)
    run.close(mine.output(), unmerged, "merged output vs unmerged output")


@pytest.mark.req("LORA-MERGE-009")
@given(data=st.data())
def test_half_precision_merge_matches_peft(run, device, dtype, data):
    mine, theirs = run.pair(run.draw(data))
    run.impl.merge(mine.model)
    run.oracle.merge(theirs.model)
    for name, param in mine.model.named_parameters():
        run.check(param.dtype == run.dtype or ".lora_" in name,
                  f"{name} is {param.dtype} after merging on a {dtype} base")
    run.close(mine.output(), theirs.output(), "merged output vs peft's merged output")


@pytest.mark.req("LORA-MERGE-008")
@given(data=st.data())
def test_merging_twice_changes_nothing(run, device, data):
    mine = run.adapted(run.draw(data))
    run.impl.merge(mine.model)
    merged = mine.output()
    run.impl.merge(mine.model)
    run.close(mine.output(), merged, "output after a second merge vs after the first")


@pytest.mark.req("LORA-MERGE-003")
@given(data=st.data())
def test_merge_then_unmerge_restores_base_weights(run, device, data):
    mine = run.adapted(run.draw(data))
    before = mine.output()
    run.impl.merge(mine.model)
    run.impl.unmerge(mine.model)
    run.close(mine.output(), before, "output after merge+unmerge vs before merging")


@pytest.mark.req("LORA-MERGE-004")
@given(data=st.data())
def test_merge_and_unload_returns_the_plain_model(run, device, data):
    case = run.draw(data)
    assume(not scope.adapts_a_shared_weight(models.build(case.model, case.model_seed), case.config))  # MERGE-002
    mine = run.adapted(case)
    adapted_output = mine.output()
    merged = run.impl.merge_and_unload(mine.model)
    run.check(merged is mine.original,
              f"merge_and_unload returned a {type(merged).__name__}, not the model object that was wrapped")
    base = mine.base()
    types = {n: type(m).__name__ for n, m in merged.named_modules()}
    expected_types = {n: type(m).__name__ for n, m in base.named_modules()}
    run.check(types == expected_types, "module types after merge_and_unload differ: "
              f"{sorted(set(types.items()) ^ set(expected_types.items()))[:4]}")
    run.same_keys(merged.state_dict(), base.state_dict(), "state-dict keys")
    run.close(mine.output(merged), adapted_output, "merged model output")


@pytest.mark.req("LORA-MERGE-006")
@given(data=st.data())
def test_dora_merge_formula(run, device, data):
    case = run.draw(data, single_layer=True, kinds=LINEAR_KINDS, extras=False, config={"use_dora": True})
    mine = run.adapted(case)
    layer = mine.base_layer()
    A, B = run.factors(mine.values, mine.path)
    magnitude = run.tensor(mine.values, f"{harness.PREFIX}{mine.path}.lora_magnitude_vector", "LORA-KEYS-005")
    conv1d = is_conv1d(layer)
    adapted = (layer.weight.T if conv1d else layer.weight) + harness.scaling(case.config) * B @ A  # (out, in)
    expected = (magnitude / adapted.norm(dim=1))[:, None] * adapted
    run.impl.merge(mine.model)
    merged = mine.original_params[f"{mine.path}.weight"]
    run.close(merged.detach(), (expected.T if conv1d else expected).detach(),
              "merged DoRA weight vs m/||W + sBA|| (W + sBA)")


@pytest.mark.req("LORA-MERGE-007")
@given(data=st.data())
def test_lora_bias_is_merged_into_the_base_bias(run, device, data):
    case = run.draw(data, single_layer=True, kinds=LINEAR_KINDS, extras=False,
                    config={"lora_bias": True, "init_lora_weights": True})
    mine = run.adapted(case)
    lora_bias = run.tensor(mine.values, f"{harness.PREFIX}{mine.path}.lora_B.bias", "LORA-KEYS-006")
    expected = mine.base_layer().bias + harness.scaling(case.config) * lora_bias
    run.impl.merge(mine.model)
    merged = mine.original_params[f"{mine.path}.bias"]
    run.close(merged.detach(), expected.detach(), "merged bias vs b + s * B.bias")


@pytest.mark.req("LORA-MERGE-010")
@given(data=st.data())
def test_tied_embeddings_config_tells_the_truth_after_merge(run, device, data):
    tied = [m for m in scope.models_in_scope(run.impl) if m == "qwen2-tied"]
    if not tied:
        pytest.skip("not applicable: the zoo's tied-embedding model (qwen2-tied) is not in "
                    f"{run.impl.name}'s scope")
    target = data.draw(st.sampled_from(scope.targets_in_scope(run.impl, tied[0])), label="target")
    split = data.draw(st.booleans(), label="embeddings split before wrapping (as after a vocabulary resize)")
    case = run.fixed(tied[0], {"target_modules": [target], "r": 4})._replace(values_seed=data.draw(st.integers(0, 99)))
    base = models.build(case.model, 0, run.device)
    if split:
        base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    adapted = harness.Adapted(run.impl, run.impl.wrap(base, dict(case.config)), case, run.device, run.dtype)
    run.load(adapted, harness.adapter_values(run.peft_state(adapted.model), case.values_seed))
    merged = run.impl.merge_and_unload(adapted.model)
    shared = merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()
    run.check(shared != split, f"target {target}: embeddings {'shared' if shared else 'split'} after merging, "
                               f"{'split' if split else 'tied'} before")
    run.check(merged.config.tie_word_embeddings == shared,
              f"config.tie_word_embeddings={merged.config.tie_word_embeddings} while the merged embeddings "
              f"{'share' if shared else 'do not share'} storage")
