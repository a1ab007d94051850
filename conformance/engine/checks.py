"""How two results are compared: tensors against a tolerance class, key sets, and the failure a requirement raises.

Pure functions: they measure and explain, and keep no state. A conformance test asserts through its `run`
(conformance/engine/verdict.py), which binds each comparison to a requirement and records it on the test item.
"""

from dataclasses import dataclass
from functools import cache
from typing import Optional

import torch

from .. import spec


class ConformanceFailure(AssertionError):
    """A requirement does not hold. `req` names it; the message explains it, with numbers."""

    def __init__(self, req: str, message: str):
        self.req, self.detail = req, message
        title = spec.requirement(req).title
        super().__init__(f"{req} failed: {message}\n  requirement: {title}\n  spec: SPEC.md#{req.lower()}")


def failure(req: str, message: str) -> ConformanceFailure:
    """The failure of `req`, as an instance of a subclass of its own: hypothesis keeps failures of distinct types
    apart, so two requirements failing in one test come back as two failures, each with its shrunk example."""
    return _failure_type(req)(req, message)


@cache
def _failure_type(req: str) -> type:
    return type(f"ConformanceFailure[{req}]", (ConformanceFailure,), {})


@dataclass
class Measurement:
    req: str
    tolerance: str
    max_abs: float
    max_rel: float
    ratio: float  # worst |diff| / allowed; <= 1 passes
    widened: bool = False


def compare(actual: torch.Tensor, expected: torch.Tensor, tolerance: spec.Tolerance,
            what: str) -> tuple[Optional[Measurement], Optional[str]]:
    """|actual - expected| <= atol + rtol * |expected| everywhere (torch.equal for the class "exact"); with
    atol_per_unit, atol * max(1, max|expected|).
    Returns the measurement (None when shapes or dtypes differ) and what went wrong (None when it holds)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return None, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return None, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    if torch.equal(actual.detach().cpu(), expected.detach().cpu()):  # the common case, without the arithmetic
        return Measurement("", tolerance.name, 0.0, 0.0, 0.0), None
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    diff[torch.isnan(a) & torch.isnan(e)] = 0  # NaN where NaN is expected counts as equal
    diff[torch.isnan(a) ^ torch.isnan(e)] = float("inf")
    # Rounding in a sum grows with its terms, not with the one element: atol_per_unit scales atol by the tensor.
    unit = max(1.0, float(e.abs().max())) if tolerance.atol_per_unit and e.numel() else 1.0
    allowed = tolerance.atol * unit + tolerance.rtol * e.abs()
    bad = diff > allowed if not tolerance.exact else diff > 0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / e.abs().clamp_min(1e-30)).max()) if diff.numel() else 0.0
    ratio = float((diff / allowed.clamp_min(1e-30)).max()) if diff.numel() and not tolerance.exact else (
        float(bool(bad.any())) * float("inf"))
    measured = Measurement("", tolerance.name, max_abs, max_rel, ratio)
    if not bad.any():
        return measured, None
    # The element that breaks the bound most: the largest |diff| may sit where the bound is wide and hold.
    excess = diff if tolerance.exact else diff / allowed.clamp_min(1e-30)
    index = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
    bound = "bit-identical" if tolerance.exact else f"rtol {tolerance.rtol:g}, atol {tolerance.atol:g}"
    allowed_here = "" if tolerance.exact else f", allowed {float(allowed[index]):.3g}"
    return measured, (f"{what} differs beyond tolerance class '{tolerance.name}' ({bound})\n"
                      f"  worst element {list(index)}: actual {float(a[index]):.9g}, expected {float(e[index]):.9g}, "
                      f"|diff| {float(diff[index]):.3g}{allowed_here}\n"
                      f"  {int(bad.sum())} of {bad.numel()} elements out of tolerance; max |diff| {max_abs:.3g}, "
                      f"max rel error {max_rel:.3g}")


def key_difference(actual, expected, what: str) -> Optional[str]:
    """What differs between two key sets, or None."""
    actual, expected = set(actual), set(expected)
    if actual == expected:
        return None
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    return f"{what} differ: missing {_some(missing)}; unexpected {_some(extra)}"


def _some(items: list, most: int = 6) -> str:
    shown = ", ".join(map(str, items[:most]))
    return f"[{shown}{', ...' if len(items) > most else ''}] ({len(items)})" if items else "none"


def close(actual: torch.Tensor, expected: torch.Tensor, tol: str, req: str, what: str = "output") -> None:
    """Outside a conformance test (golden-check of results from another process): raise on a difference."""
    problem = compare(actual, expected, spec.tolerances()[tol], what)[1]
    if problem:
        raise failure(req, problem)


def all_close(actual: dict, expected: dict, tol: str, req: str, what: str) -> None:
    """Two dicts of tensors, outside a conformance test: same keys, then each tensor close."""
    problem = key_difference(actual, expected, f"{what} keys")
    if problem:
        raise failure(req, problem)
    for key in sorted(expected):
        close(actual[key], expected[key], tol, req, f"{what} {key}")
