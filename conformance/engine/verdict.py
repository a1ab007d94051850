"""What one conformance test found, kept on its pytest item: which requirements it asserted, which held, which
failed and why, the worst comparisons, and the expected failures it saw.

A test claims its requirements once, in `@pytest.mark.req(...)`. Each assertion is bound to one of them (the only
one, unless the test claims several and names it), so a requirement is credited "pass" only when an assertion
bound to it ran and held. A precondition (`require`) is charged to its own requirement when it fails and credits
nothing when it holds.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import spec
from . import checks
from .expectations import Entry


class SuiteError(Exception):
    """A bug in the suite itself, never the implementation's: an assertion bound to a requirement the test does not
    claim, or one that does not apply to the driver."""


@dataclass
class Example:
    """One drawn case and the requirements whose assertions held in it."""

    case: object = None
    held: set = field(default_factory=set)


@dataclass
class Verdict:
    claimed: tuple[str, ...]
    applicable: tuple[str, ...]
    dtype: str = "float32"
    entries: list[Entry] = field(default_factory=list)  # expectations whose exact part matches this test
    held: set = field(default_factory=set)
    measurements: list[checks.Measurement] = field(default_factory=list)
    expected: dict = field(default_factory=dict)  # req -> reason: failures an expectation predicate covers
    seen: set = field(default_factory=set)  # `when` entries some drawn case matched
    blocked_by: set = field(default_factory=set)  # preconditions that failed
    out_of_scope: dict = field(default_factory=dict)  # reason -> how many draws the driver's scope refused
    unmappable: dict = field(default_factory=dict)  # reason -> how many draws the driver's layout could not map
    comparisons: dict = field(default_factory=dict)  # req -> how it was compared, where not directly (the report says)
    example: Example = field(default_factory=Example)

    # --- examples ------------------------------------------------------------------------------------------

    def start_example(self, case) -> None:
        """A new drawn case: what its assertions hold and fail is tracked apart (a crash is charged to what had not
        yet held in the case that crashed)."""
        self.example = Example(case)
        self.seen |= {e.describe() for e in self._when_entries() if e.matches_case(case)}

    def crashed(self) -> None:
        """The current example raised something other than a failed assertion (the implementation crashed). Where
        a `when` entry of a requirement that had not yet held in this example covers the case, the crash is that
        expected failure: recorded, and the example dropped as _fail drops one. A test of one requirement was still
        checking it whatever had held (QLORA-UNLOAD-001 crashes after its state check held, on the output)."""
        still_checked = set(self.claimed) if len(self.claimed) == 1 else set(self.claimed) - self.example.held
        covering = [e for e in self._when_entries() if e.req in self.applicable and e.req in still_checked
                    and e.status in ("fail", "flaky") and e.matches_case(self.example.case)]
        for entry in covering:
            self.expected[entry.req] = entry.reason
        if covering:
            _discard_example()

    def _when_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.when]

    # --- assertions ----------------------------------------------------------------------------------------

    def compared_as(self, how: str, req: Optional[str] = None) -> None:
        """Say in the report how `req` was compared when not directly (an adapter's contribution, say)."""
        self.comparisons[self._bind(req)] = how

    def check(self, condition: bool, message: str, req: Optional[str] = None) -> None:
        """A structural requirement: `message` says what was found instead."""
        __tracebackhide__ = True
        req = self._bind(req)
        if not condition:
            self._fail(req, message)
        self._held(req)

    def fail(self, message: str, req: Optional[str] = None) -> None:
        __tracebackhide__ = True
        self._fail(self._bind(req), message)

    def raises(self, errors, action, what: str, req: Optional[str] = None) -> None:
        """The requirement holds when `action()` raises one of `errors` (a refusal); another exception is a crash."""
        __tracebackhide__ = True
        req = self._bind(req)
        try:
            action()
        except errors:
            self._held(req)
            return
        names = " or ".join(e.__name__ for e in (errors if isinstance(errors, tuple) else (errors,)))
        self._fail(req, f"{what}: no {names} was raised")

    def same_keys(self, actual, expected, what: str, req: Optional[str] = None) -> None:
        __tracebackhide__ = True
        req = self._bind(req)
        problem = checks.key_difference(actual, expected, what)
        if problem:
            self._fail(req, problem)
        self._held(req)

    def close(self, actual: torch.Tensor, expected: torch.Tensor, what: str = "output", req: Optional[str] = None,
              tolerance: Optional[str] = None) -> None:
        """Within the requirement's tolerance class (from the registry, for this test's dtype axis)."""
        __tracebackhide__ = True
        req = self._bind(req)
        self._compare(req, actual, expected, what, tolerance)
        self._held(req)

    def equal(self, actual: torch.Tensor, expected: torch.Tensor, what: str, req: Optional[str] = None) -> None:
        __tracebackhide__ = True
        self.close(actual, expected, what, req, tolerance="exact")

    def all_close(self, actual: dict, expected: dict, what: str, req: Optional[str] = None,
                  tolerance: Optional[str] = None) -> None:
        """Two dicts of tensors: the same keys, then each tensor close."""
        __tracebackhide__ = True
        req = self._bind(req)
        problem = checks.key_difference(actual, expected, f"{what} keys")
        if problem:
            self._fail(req, problem)
        for key in sorted(expected):
            self._compare(req, actual[key], expected[key], f"{what} {key}", tolerance)
        self._held(req)

    def require(self, condition: bool, req: str, message: str) -> None:
        """A precondition of this test that is another requirement's subject: charged to `req` when it fails (the
        claimed requirements are then blocked by it), credits nothing when it holds."""
        __tracebackhide__ = True
        if req not in spec.requirements():
            raise SuiteError(f"precondition names unknown requirement {req}")
        if not condition:
            self.blocked_by.add(req)
            raise checks.failure(req, message)

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def _bind(self, req: Optional[str]) -> str:
        if req is None:
            if len(self.claimed) != 1:
                raise SuiteError(f"this test claims {list(self.claimed)}: an assertion must name one of them")
            req = self.claimed[0]
        if req not in self.claimed:
            raise SuiteError(f"assertion bound to {req}, which this test does not claim ({list(self.claimed)})")
        if req not in self.applicable:
            raise SuiteError(f"assertion bound to {req}, which does not apply to this driver by the registry's "
                             "capabilities: the draw should not have reached it")
        return req

    def _tolerance(self, req: str, name: Optional[str]) -> tuple[spec.Tolerance, bool]:
        for entry in self.entries:
            if entry.req == req and entry.status == "tolerance" and entry.matches_case(self.example.case):
                return spec.Tolerance(f"widened:{req}", entry.reason, entry.rtol, entry.atol), True
        return spec.tolerances()[name or spec.requirement(req).tolerance_class(self.dtype)], False

    def _compare(self, req: str, actual, expected, what: str, tolerance: Optional[str]) -> None:
        __tracebackhide__ = True
        chosen, widened = self._tolerance(req, tolerance)
        measured, problem = checks.compare(actual, expected, chosen, what)
        if measured is not None:
            measured.req, measured.widened = req, widened
            self.measurements.append(measured)
        if problem:
            self._fail(req, problem + (" [widened by the expectations file]" if widened else ""))

    def _held(self, req: str) -> None:
        self.held.add(req)
        self.example.held.add(req)

    def _fail(self, req: str, message: str) -> None:
        __tracebackhide__ = True
        for entry in self._when_entries():
            if entry.req == req and entry.status in ("fail", "flaky") and entry.matches_case(self.example.case):
                self.expected[req] = entry.reason
                _discard_example()
        raise checks.failure(req, message)

    def summary(self) -> dict:
        """What the report needs from this test, beyond the exception that ended it."""
        return {"held": sorted(self.held), "last_held": sorted(self.example.held), "expected": dict(self.expected),
                "blocked_by": sorted(self.blocked_by),
                "measurements": _worst_per_class(self.measurements), "expectations_seen": sorted(self.seen),
                "out_of_scope": dict(self.out_of_scope), "comparisons": dict(self.comparisons)}


def _worst_per_class(measurements: list[checks.Measurement]) -> list[dict]:
    """The worst measurement per requirement and tolerance class: a thorough run compares thousands of tensors."""
    worst: dict[tuple[str, str], checks.Measurement] = {}
    for m in measurements:
        if (m.req, m.tolerance) not in worst or m.ratio > worst[m.req, m.tolerance].ratio:
            worst[m.req, m.tolerance] = m
    return [vars(m) for m in worst.values()]


def _discard_example() -> None:
    """An expected failure inside a hypothesis test: drop the example, so that hypothesis neither shrinks towards it
    nor stops there, and goes on drawing cases the expectation does not cover."""
    from hypothesis import reject
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        reject()
