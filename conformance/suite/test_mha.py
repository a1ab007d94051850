"""MHA: LoRA on torch's nn.MultiheadAttention, whose fused in-projection and out_proj are adapted together.
Expected weights come from SPEC.md's formula (with peft 0.21.2's factor 2 on out_proj, LORA-MHA-001's quirk)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness, strategies
from conformance.engine.harness import PREFIX
from conformance.zoo import models

MODEL = "attention-net"
ATTENTION = ("blocks.0.attn", "blocks.1.attn")


@st.composite
def _configs(draw, driver) -> dict:
    caps = set(driver.capabilities)
    targets = draw(st.lists(st.sampled_from(models.ZOO[MODEL].targets[models.ATTENTION]), min_size=1, unique=True),
                   label="attention targets")
    if "linear" in caps:
        targets += draw(st.lists(st.sampled_from(models.ZOO[MODEL].targets[models.LINEAR]), unique=True),
                        label="linear targets")
    # Moderate scalings: with s B A much larger than W, softmax saturates and amplifies float32 rounding past any
    # tolerance (r 1, alpha 16 and gaussian init: 3e-5 between two orders of the same sums).
    config = {"target_modules": targets, "r": draw(st.integers(2, 6), label="r"),
              "lora_alpha": draw(st.sampled_from([1, 2, 4, 0.5]), label="lora_alpha"),
              "init_lora_weights": draw(st.sampled_from([True, "gaussian", False] if "init_variants" in caps
                                                        else [True]), label="init")}
    if "rslora" in caps:
        config["use_rslora"] = draw(st.booleans(), label="use_rslora")
    return config


def _draw(run, data) -> strategies.Case:
    config = data.draw(_configs(run.impl), label="config")
    seeds = [data.draw(strategies.seeds, label=label) for label in ("init_seed", "values_seed", "inputs_seed")]
    return run.admit(strategies.Case(MODEL, config, 0, *seeds))


def _attention_paths(case) -> list[str]:
    targets = case.config["target_modules"]
    return [path for path in ATTENTION if any(path == t or path.endswith("." + t) for t in targets)]


def _expected_model(run, mine: harness.Adapted) -> torch.nn.Module:
    """The base model with each adapted attention's weights changed by the formula, and adapted Linear layers by
    theirs."""
    expected = mine.base()
    s = harness.scaling(mine.case.config)
    with torch.no_grad():
        for path in _attention_paths(mine.case):
            attention = expected.get_submodule(path)
            A, B = run.factors(mine.values, path)
            attention.in_proj_weight += s * B @ A
            A, B = run.factors(mine.values, f"{path}.base_layer.out_proj")
            attention.out_proj.weight += 2 * s * B @ A
        for path in harness.adapted_modules(mine.values):
            if "attn" not in path:
                A, B = run.factors(mine.values, path)
                expected.get_submodule(path).weight += s * B @ A
    return expected


@pytest.mark.req("LORA-MHA-001")
@given(data=st.data())
def test_attention_computes_with_both_deltas(run, device, data):
    mine = run.adapted(_draw(run, data))
    run.close(mine.output(), mine.output(_expected_model(run, mine)),
              "output vs the base model with in_proj_weight + s B A and out_proj.weight + 2 s B' A'")
    if run.oracle_driver is None:
        return
    mine, theirs = run.pair(mine.case)
    run.close(mine.output(), theirs.output(), "output vs peft's")
    for adapted in (mine, theirs):
        adapted.output().square().sum().backward()
    run.all_close(run.gradients(mine), run.gradients(theirs), "adapter gradients vs peft's")


@pytest.mark.req("LORA-MHA-002")
@given(data=st.data())
def test_keys_and_shapes(run, device, data):
    case = _draw(run, data)
    state = run.peft_state(run.wrap(case).model)
    r, d = case.config["r"], 16
    expected = {}
    for path in _attention_paths(case):
        expected.update({f"{PREFIX}{path}.lora_A.weight": (r, d), f"{PREFIX}{path}.lora_B.weight": (3 * d, r),
                         f"{PREFIX}{path}.base_layer.out_proj.lora_A.weight": (r, d),
                         f"{PREFIX}{path}.base_layer.out_proj.lora_B.weight": (d, r)})
    found = {key: tuple(value.shape) for key, value in state.items() if ".attn." in key}
    run.same_keys(found, expected, "adapter keys of the attention layers")
    for key, shape in sorted(expected.items()):
        run.check(found[key] == shape, f"{key}: shape {found[key]}, expected {shape}")


@pytest.mark.req("LORA-MHA-003")
@given(data=st.data())
def test_merge_and_unload_gives_back_torch_s_attention(run, device, data):
    mine = run.adapted(_draw(run, data))
    unmerged = mine.output()
    expected = _expected_model(run, mine)
    _merge_twice_then_unmerge(run, mine, unmerged)
    merged = run.impl.merge_and_unload(mine.model)
    run.close(mine.output(merged), unmerged, "output after merge_and_unload vs unmerged")
    for path in _attention_paths(mine.case):
        attention, reference = merged.get_submodule(path), expected.get_submodule(path)
        run.check(type(attention) is torch.nn.MultiheadAttention and type(attention.out_proj) is
                  type(reference.out_proj), f"{path} after merge_and_unload: {type(attention).__name__} with out_proj "
                                            f"{type(getattr(attention, 'out_proj', None)).__name__}, expected torch's")
        run.close(attention.in_proj_weight, reference.in_proj_weight, f"{path}.in_proj_weight after merging")
        run.close(attention.out_proj.weight, reference.out_proj.weight, f"{path}.out_proj.weight after merging")


def _merge_twice_then_unmerge(run, mine, unmerged) -> None:
    """A second merge changes nothing (peft warns and skips), and unmerge takes the deltas out again."""
    run.impl.merge(mine.model)
    run.impl.merge(mine.model)
    run.close(mine.output(), unmerged, "output after merging twice vs unmerged")
    run.impl.unmerge(mine.model)
    run.close(mine.output(), unmerged, "output after merge, merge, unmerge vs unmerged")
