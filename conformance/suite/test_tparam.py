"""TPARAM: target_parameters, LoRA on bare parameters (a mixture-of-experts block's 3-d expert weights, a 2-d
weight). Expected deltas come from SPEC.md's formula applied to the values loaded."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness, strategies
from conformance.engine.harness import PREFIX
from conformance.zoo import models

MODEL = "moe"


@st.composite
def _configs(draw, driver) -> dict:
    caps = set(driver.capabilities)
    config = {"target_parameters": draw(st.lists(st.sampled_from(models.ZOO[MODEL].parameters), min_size=1,
                                                 unique=True), label="target_parameters"),
              "r": draw(st.integers(1, 4), label="r"), "lora_alpha": draw(st.sampled_from([1, 4, 16, 0.5]),
                                                                        label="lora_alpha"),
              "init_lora_weights": draw(st.sampled_from([True, "gaussian", False] if "init_variants" in caps
                                                        else [True]), label="init")}
    if "rslora" in caps:
        config["use_rslora"] = draw(st.booleans(), label="use_rslora")
    if "linear" in caps and draw(st.booleans(), label="and target_modules?"):
        config["target_modules"] = ["head"]
    return config


def _draw(run, data):
    config = data.draw(_configs(run.impl), label="config")
    seeds = [data.draw(strategies.seeds, label=label) for label in ("init_seed", "values_seed", "inputs_seed")]
    return run.admit(strategies.Case(MODEL, config, 0, *seeds))


def _layout(config: dict) -> dict[str, str]:
    """Each targeted parameter -> the module path its keys use: parameters of one module nest, each later one (in
    the module's parameter order) outside the earlier ones (LORA-TPARAM-002)."""
    base = models.build(MODEL)
    by_module: dict[str, list[str]] = {}
    for target in config["target_parameters"]:
        module, _, name = target.rpartition(".")
        by_module.setdefault(module, []).append(name)
    paths = {}
    for module, names in by_module.items():
        ordered = [n for n, _ in base.get_submodule(module).named_parameters(recurse=False) if n in names]
        for depth, name in enumerate(reversed(ordered)):
            paths[f"{module}.{name}"] = module + ".base_layer" * depth
    return paths


def _delta(run, values: dict, path: str, weight: torch.Tensor, config: dict) -> torch.Tensor:
    """s * delta for `weight` from the adapter at `path`, by the formula."""
    A, B = run.tensor(values, f"{PREFIX}{path}.lora_A.weight", "LORA-TPARAM-002"), \
        run.tensor(values, f"{PREFIX}{path}.lora_B.weight", "LORA-TPARAM-002")
    s = harness.scaling(config)
    if weight.dim() == 2:
        return s * B @ A
    E, r = weight.shape[0], A.shape[0] // weight.shape[0]
    return s * torch.stack([B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)])


def _expected_model(run, mine: harness.Adapted) -> torch.nn.Module:
    """The base model with every targeted parameter replaced by W + s * delta (and the head, if targeted, by its
    LoRA formula folded in)."""
    expected = mine.base()
    config = mine.case.config
    with torch.no_grad():
        for target, path in _layout(config).items():
            weight = expected.get_parameter(target)
            weight += _delta(run, mine.values, path, weight, config).to(weight.dtype)
        if config.get("target_modules"):
            head = expected.head
            A, B = run.factors(mine.values, "head")
            head.weight += harness.scaling(config) * B @ A
    return expected


@pytest.mark.req("LORA-TPARAM-001")
@given(data=st.data())
def test_parameter_computes_with_its_delta(run, device, data):
    mine = run.adapted(_draw(run, data))
    run.close(mine.output(), mine.output(_expected_model(run, mine)),
              "output vs the base model with each targeted W replaced by W + s * delta")
    if run.oracle_driver is None:
        return
    mine, theirs = run.pair(mine.case)
    run.close(mine.output(), theirs.output(), "output vs peft's")
    for adapted in (mine, theirs):
        adapted.output().square().sum().backward()
    run.all_close(run.gradients(mine), run.gradients(theirs), "adapter gradients vs peft's")


@pytest.mark.req("LORA-TPARAM-002")
@given(data=st.data())
def test_keys_and_shapes(run, device, data):
    case = _draw(run, data)
    state = run.peft_state(run.wrap(case).model)
    base, r = models.build(MODEL), case.config["r"]
    expected = {}
    for target, path in _layout(case.config).items():
        shape = tuple(base.get_parameter(target).shape)
        E, X, Y = shape if len(shape) == 3 else (1, *shape)
        expected[f"{PREFIX}{path}.lora_A.weight"] = (r * E, Y)
        expected[f"{PREFIX}{path}.lora_B.weight"] = (X, r * E)
    found = {key: tuple(value.shape) for key, value in state.items() if ".head." not in key}
    run.same_keys(found, expected, "adapter keys of the targeted parameters")
    for key, shape in sorted(expected.items()):
        run.check(found[key] == shape, f"{key}: shape {found[key]}, expected {shape}")


@pytest.mark.req("LORA-TPARAM-003")
@given(data=st.data())
def test_merge_and_unload_folds_the_delta(run, device, data):
    mine = run.adapted(_draw(run, data))
    unmerged = mine.output()
    expected = _expected_model(run, mine)
    run.impl.merge(mine.model)
    run.close(mine.output(), unmerged, "output after merge vs unmerged")
    run.impl.unmerge(mine.model)  # a delta left in the expert weights would now count twice
    run.close(mine.output(), unmerged, "output after merge and unmerge vs unmerged")
    merged = run.impl.merge_and_unload(mine.model)
    run.close(mine.output(merged), unmerged, "output after merge_and_unload vs unmerged")
    names = sorted(name for name, _ in merged.named_parameters())
    run.check(names == sorted(name for name, _ in expected.named_parameters()),
              f"parameters after merge_and_unload: {names[:6]}, expected the base model's")
    for target in mine.case.config["target_parameters"]:
        run.close(merged.get_parameter(target), expected.get_parameter(target), f"{target} after merge_and_unload")


@pytest.mark.req("LORA-TPARAM-004")
@pytest.mark.parametrize("field, value", [("lora_dropout", 0.1), ("use_dora", True), ("lora_bias", True)])
def test_unfoldable_options_are_refused(run, field, value):
    config = {"target_parameters": ["experts.down_proj"], "r": 2}
    run.fixed(MODEL, config)
    run.raises(ValueError, lambda: run.impl.wrap(models.build(MODEL), {**config, field: value}),
               f"target_parameters with {field}={value}")
