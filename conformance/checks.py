"""The only assertion helpers the suite uses. Each names its requirement; a failure says what differed, by how
much, against which tolerance class, so that nobody needs to read a traceback.

Comparisons are recorded (worst error against the tolerance) for the report.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from . import spec


class ConformanceFailure(AssertionError):
    """A requirement does not hold. `req` names it; the message explains it."""

    def __init__(self, req: str, message: str):
        self.req = req
        title = spec.requirement(req).title
        super().__init__(f"{req} failed: {message}\n  requirement: {title}\n  spec: SPEC.md#{req.lower()}")


@dataclass
class Measurement:
    req: str
    tolerance: str
    max_abs: float
    max_rel: float
    ratio: float  # worst |diff| / allowed; <= 1 passes
    widened: bool = False


# Filled during a test, read and cleared by the plugin after it: the worst comparisons of that test.
measurements: list[Measurement] = []
# Tolerances an expectations file widened for this test: {req: spec.Tolerance}. Set by the plugin.
widened: dict[str, spec.Tolerance] = {}


def fail(req: str, message: str):
    __tracebackhide__ = True
    raise ConformanceFailure(req, message)


def check(condition: bool, req: str, message: str) -> None:
    """A structural requirement: `message` says what was found instead."""
    __tracebackhide__ = True
    if not condition:
        fail(req, message)


def same_keys(actual, expected, req: str, what: str) -> None:
    __tracebackhide__ = True
    actual, expected = set(actual), set(expected)
    if actual != expected:
        missing, extra = sorted(expected - actual), sorted(actual - expected)
        fail(req, f"{what} differ: missing {_some(missing)}; unexpected {_some(extra)}")


def _some(items: list, most: int = 6) -> str:
    shown = ", ".join(map(str, items[:most]))
    return f"[{shown}{', ...' if len(items) > most else ''}] ({len(items)})" if items else "none"


def close(actual: torch.Tensor, expected: torch.Tensor, tol: str, req: str, what: str = "output") -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere (torch.equal for the class "exact")."""
    __tracebackhide__ = True
    tolerance = widened.get(req, spec.tolerances()[tol])
    check(tuple(actual.shape) == tuple(expected.shape), req,
          f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        fail(req, f"{what}: dtype {actual.dtype}, expected {expected.dtype}")
    if torch.equal(actual.detach().cpu(), expected.detach().cpu()):  # the common case, without the arithmetic
        measurements.append(Measurement(req, tolerance.name, 0.0, 0.0, 0.0, req in widened))
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    diff[torch.isnan(a) & torch.isnan(e)] = 0  # NaN where NaN is expected counts as equal
    diff[torch.isnan(a) ^ torch.isnan(e)] = float("inf")
    allowed = tolerance.atol + tolerance.rtol * e.abs()
    bad = diff > allowed if not tolerance.exact else diff > 0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / e.abs().clamp_min(1e-30)).max()) if diff.numel() else 0.0
    ratio = float((diff / allowed.clamp_min(1e-30)).max()) if diff.numel() and not tolerance.exact else (
        float(bool(bad.any())) * float("inf"))
    measurements.append(Measurement(req, tolerance.name, max_abs, max_rel, ratio, req in widened))
    if bad.any():
        index = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        bound = "bit-identical" if tolerance.exact else f"rtol {tolerance.rtol:g}, atol {tolerance.atol:g}"
        fail(req, f"{what} differs beyond tolerance class '{tolerance.name}' ({bound})"
                  f"{' [widened by the expectations file]' if req in widened else ''}\n"
                  f"  worst element {list(index)}: actual {float(a[index]):.9g}, expected {float(e[index]):.9g}, "
                  f"|diff| {max_abs:.3g}\n"
                  f"  {int(bad.sum())} of {bad.numel()} elements out of tolerance; max rel error {max_rel:.3g}")


def equal(actual: torch.Tensor, expected: torch.Tensor, req: str, what: str) -> None:
    __tracebackhide__ = True
    close(actual, expected, "exact", req, what)


def all_close(actual: dict, expected: dict, tol: str, req: str, what: str, keys_req: Optional[str] = None) -> None:
    """Two dicts of tensors: same keys (checked against `keys_req`, default `req`), then each tensor close."""
    __tracebackhide__ = True
    same_keys(actual, expected, keys_req or req, f"{what} keys")
    for key in sorted(expected):
        close(actual[key], expected[key], tol, req, f"{what} {key}")
