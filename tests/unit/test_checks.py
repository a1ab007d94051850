"""How two tensors are compared (conformance/engine/checks.py): what a failure message points at, and the report of how
close each tolerance class came."""

import torch

from conformance import spec
from conformance.engine import checks
from conformance.engine.report import Results, TestOutcome


def test_the_worst_element_is_the_one_that_breaks_the_bound():
    """The largest |diff| sits on a large value, where rtol allows it; the element shown is the small value that
    breaks the bound, with what was allowed there."""
    expected = torch.tensor([100.0, 0.5, 0.001])
    actual = expected + torch.tensor([1.2e-4, 0.0, 5e-5])
    measured, problem = checks.compare(actual, expected, spec.tolerances()["fp32"], "output")
    assert problem is not None and "worst element [2]" in problem and "allowed 1e-05" in problem
    assert "1 of 3 elements" in problem and "max |diff| 0.000122" in problem and measured.ratio > 1


def test_the_report_gives_the_closest_comparison_per_class():
    results = Results()
    for ratio, req, dtype in ((0.2, "LORA-FWD-006", "bfloat16"), (0.7, "LORA-LOAD-003", "bfloat16"),
                              (0.1, "LORA-FWD-006", "float32")):
        tolerance = "bf16" if dtype == "bfloat16" else "fp32"
        results.add(TestOutcome(nodeid=f"t::{req}", reqs=[req], outcome="passed", held=[req],
                                cell={"device": "cpu", "dtype": dtype},
                                measurements=[{"req": req, "tolerance": tolerance, "max_abs": ratio / 100,
                                               "max_rel": 0.0, "ratio": ratio}]))
    closest = results.closest_per_class()
    assert closest["bf16"]["ratio"] == 0.7 and closest["bf16"]["req"] == "LORA-LOAD-003"
    assert closest["bf16"]["axis"] == "cpu/bfloat16" and closest["bf16"]["tests"] == 2
    assert closest["fp32"]["ratio"] == 0.1
