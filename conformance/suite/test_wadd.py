"""WADD: add_weighted_adapter, a new adapter combining existing ones (linear, cat, svd). Expected factors come from
the formulas of SPEC.md, computed here from the values loaded into the two adapters."""

import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.engine import harness, scope

WEIGHTS = st.sampled_from([-1.5, -0.5, 0.3, 1.0, 2.0])


def _two_adapters(run, data, same_rank: bool, other_targets: bool = False):
    """A drawn case (no rsLoRA: see LORA-WADD-004's quirk) with adapter "other" added: same targets, its own
    alpha, and its own rank unless `same_rank`; with `other_targets`, drawn targets of its own."""
    case = run.draw(data, extras=False, config={"use_rslora": None})
    other = {**case.config, "lora_alpha": data.draw(st.sampled_from([1, 4, 16]), label="other alpha"),
             "r": case.config["r"] if same_rank else data.draw(st.integers(1, 8), label="other r")}
    if other_targets:
        names = scope.targets_in_scope(run.impl, case.model)
        targets = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True),
                            label="other targets")
        # Both lists or both regexes: peft refuses to combine the two forms.
        regex = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
        other["target_modules"] = regex if isinstance(case.config["target_modules"], str) else targets
    run.within_scope(case._replace(config=other), "other")
    mine = run.adapted(case)
    return mine, other, run.add_second_adapter(mine, other)


def _combine(run, data, mine, combination: str, svd_rank=None) -> list[float]:
    weights = data.draw(st.lists(WEIGHTS, min_size=2, max_size=2), label="weights")
    run.impl.add_weighted_adapter(mine.model, ["default", "other"], weights, "combined", combination, svd_rank)
    mine.model.eval()  # the new adapter's dropout starts in train mode, as after add_adapter (LORA-FWD-004)
    return weights


def _parts(run, mine, other: dict, other_values: dict, weights: list[float], path: str) -> list:
    """(w_i * s_i, A_i, B_i) of the adapters that adapt `path` (both, or one where their targets differ), the
    factors as (out, r) and (r, in) matrices."""
    parts = []
    for config, values, weight in ((mine.case.config, mine.values, weights[0]), (other, other_values, weights[1])):
        if path not in harness.adapted_modules(values):
            continue
        A, B = run.factors(values, path)
        parts.append((weight * harness.scaling(config), A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)))
    return parts


def _combined(run, mine, path: str):
    A, B = run.factors(run.peft_state(mine.model, "combined"), path)
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


def _scaling_is_one(run, mine, combined: dict, rank: int, req: str) -> None:
    """The combined adapter, active, computes as an adapter of rank and alpha `rank` (scaling 1) holding its
    factors."""
    run.impl.set_adapter(mine.model, "combined")
    # the modules 'combined' adapts, by path: the union of both adapters' targets
    paths = sorted(harness.adapted_modules(combined))
    alone = run.wrap(mine.case._replace(config={**mine.case.config, "r": rank, "lora_alpha": rank,
                                                "target_modules": paths}))
    harness.load(alone, combined)
    run.close(mine.output(), alone.output(), f"output with 'combined' active vs an adapter of r = alpha = {rank} "
                                             "holding its factors", req=req)


@pytest.mark.req("LORA-WADD-001")
@given(data=st.data())
def test_linear_combination(run, device, data):
    mine, other, other_values = _two_adapters(run, data, same_rank=True,
                                              other_targets=data.draw(st.booleans(), label="other targets?"))
    weights = _combine(run, data, mine, "linear")
    for path in sorted(harness.adapted_modules(mine.values) | harness.adapted_modules(other_values)):
        parts = _parts(run, mine, other, other_values, weights, path)
        roots = [abs(ws) ** 0.5 for ws, _, _ in parts]
        expected_A = sum(root * (1 if ws >= 0 else -1) * A for root, (ws, A, _) in zip(roots, parts))
        expected_B = sum(root * B for root, (_, _, B) in zip(roots, parts))
        A, B = _combined(run, mine, path)
        run.close(A, expected_A, f"{path}: combined A vs sum sign(w s) sqrt|w s| A_i")
        run.close(B, expected_B, f"{path}: combined B vs sum sqrt|w s| B_i")
    _scaling_is_one(run, mine, run.peft_state(mine.model, "combined"), mine.case.config["r"], "LORA-WADD-001")


@pytest.mark.req("LORA-WADD-002")
@given(data=st.data())
def test_cat_combination(run, device, data):
    mine, other, other_values = _two_adapters(run, data, same_rank=False)
    weights = _combine(run, data, mine, "cat")
    for path in sorted(harness.adapted_modules(mine.values)):
        parts = _parts(run, mine, other, other_values, weights, path)
        A, B = _combined(run, mine, path)
        run.close(A, torch.cat([ws * A_i for ws, A_i, _ in parts]), f"{path}: combined A vs [w_i s_i A_i] stacked")
        run.close(B, torch.cat([B_i for _, _, B_i in parts], dim=1), f"{path}: combined B vs [B_i] side by side")
    _scaling_is_one(run, mine, run.peft_state(mine.model, "combined"), mine.case.config["r"] + other["r"],
                    "LORA-WADD-002")


@pytest.mark.req("LORA-WADD-003")
@given(data=st.data())
def test_svd_combination(run, device, data):
    mine, other, other_values = _two_adapters(run, data, same_rank=False,
                                              other_targets=data.draw(st.booleans(), label="other targets?"))
    largest = max(mine.case.config["r"], other["r"])
    # Ranks up to 4: every zoo layer has at least 4 inputs and outputs, so the truncation is well defined.
    svd_rank = data.draw(st.sampled_from([1, 2, 3, 4] + ([None] if largest <= 4 else [])), label="svd_rank")
    weights = _combine(run, data, mine, "svd", svd_rank)
    rank = svd_rank or largest
    for path in sorted(harness.adapted_modules(mine.values) | harness.adapted_modules(other_values)):
        delta = sum(ws * B_i.double() @ A_i.double() for ws, A_i, B_i in
                    _parts(run, mine, other, other_values, weights, path))
        U, S, Vh = torch.linalg.svd(delta)
        singular = S.tolist() + [0.0]
        # B A is unique only when the k-th and (k+1)-th singular values are apart (tolerance class "svd").
        assume(singular[rank - 1] - singular[rank] > 1e-2 * singular[0])
        A, B = _combined(run, mine, path)
        run.check(A.shape[0] == rank, f"{path}: combined rank {A.shape[0]}, expected {rank}")
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        s1 = float(S[0])  # the SVD's error is relative to the largest singular value (tolerance class "svd")
        run.close(B @ A / s1, (best / s1).to(A.dtype),
                  f"{path}: combined B A vs the rank-{rank} truncated SVD of sum w_i s_i B_i A_i, both divided by s1")
    _scaling_is_one(run, mine, run.peft_state(mine.model, "combined"), rank, "LORA-WADD-003")


@pytest.mark.req("LORA-WADD-004")
@given(data=st.data())
def test_new_adapter_is_inactive_frozen_and_checked(run, device, data):
    mine, other, _ = _two_adapters(run, data, same_rank=False, other_targets=True)
    assume(other["r"] != mine.case.config["r"])
    before, counts = mine.output(), run.impl.trainable_parameters(mine.model)
    _combine(run, data, mine, "cat")
    run.close(mine.output(), before, "output after add_weighted_adapter (the new adapter must be inactive)")
    after = run.impl.trainable_parameters(mine.model)
    run.check(after[0] == counts[0] and after[1] > counts[1],
              f"(trainable, total) {counts} before add_weighted_adapter, {after} after")
    union = harness.adapted_modules(mine.values) | harness.adapted_modules(run.peft_state(mine.model, "other"))
    found = harness.adapted_modules(run.peft_state(mine.model, "combined"))
    run.check(found == union, f"the combined adapter adapts {sorted(found)[:4]}, expected the union "
                              f"{sorted(union)[:4]} of both adapters' modules")
    combine = run.impl.add_weighted_adapter
    run.raises(ValueError, lambda: combine(mine.model, ["default", "no-such-adapter"], [1.0, 1.0], "x", "cat"),
               "combining an adapter that does not exist")
    run.raises(ValueError, lambda: combine(mine.model, ["default", "other"], [1.0, 1.0], "y", "linear"),
               f"'linear' over ranks {mine.case.config['r']} and {other['r']}")
    run.raises(ValueError, lambda: combine(mine.model, ["default", "other"], [1.0, 1.0], "z", "no-such-type"),
               "combination_type 'no-such-type'")
