"""A conformance test's pytest report turned into what the requirement report needs (report.TestOutcome): which
requirements held, which failed and why (each distinct failure charged to its own requirement), which were
expected to fail, and the command that reruns the test when pasted."""

import os
import sys
from pathlib import Path
from typing import Optional

from hypothesis.errors import Unsatisfiable

from .. import api
from . import checks, report
from .run import NOT_APPLICABLE, NOT_RUN
from .verdict import SuiteError, Verdict


def build(item, call, rep, verdict: Optional[Verdict], excluded: dict, state) -> report.TestOutcome:
    """The outcome of one phase of a test (setup or call); adjusts `rep` for pytest's own summary."""
    found = verdict.summary() if verdict else {}
    result = report.TestOutcome(nodeid=stable_id(item), reqs=claimed(item), outcome="passed", cell=cell(item),
                                **excluded, **found)
    error = call.excinfo.value if call.excinfo else None
    if isinstance(error, Unsatisfiable) and verdict is not None:
        _no_usable_example(result, rep, verdict)
    elif rep.skipped:
        reason = str(rep.longrepr[2]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        result.outcome = "not applicable" if reason.startswith(NOT_APPLICABLE) else "not run"
        result.reason = reason.removeprefix(NOT_APPLICABLE).removeprefix(NOT_RUN)
    elif rep.failed:
        result.outcome = "failed"
        result.failures = _failures(call.excinfo, result)
        result.repro = repro(item, state)
        rep.sections.append(("reproduce", result.repro))
    _apply_expectations(result, rep, verdict, state.expectations.path if state.expectations else "")
    return result


SUITE = Path(__file__).resolve().parents[1] / "suite"


def stable_id(item) -> str:
    """The test's id for reports: relative to the suite ("conformance/suite/test_fwd.py::test_x[cpu-float32]")
    wherever pytest ran from and the suite is installed, so that two runs' reports can be compared."""
    path = Path(item.path).resolve()
    if path.is_relative_to(SUITE):
        return f"conformance/suite/{path.relative_to(SUITE).as_posix()}::{item.name}"
    return item.nodeid


def claimed(node) -> list[str]:
    """The requirement IDs a test states in @pytest.mark.req (a test function or item)."""
    return [i for marker in node.iter_markers("req") for i in marker.args]


def axis(item) -> tuple[str, str]:
    """(device, dtype) of a test's parametrization: cpu and float32 unless it is on another axis."""
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    return str(params.get("device", "cpu")), str(params.get("dtype", "float32"))


def cell(item) -> dict:
    device, dtype = axis(item)
    return {"test": item.originalname, "id": item.name, "device": device, "dtype": dtype}


def _no_usable_example(result: report.TestOutcome, rep, verdict: Verdict) -> None:
    """hypothesis found no example to keep: all outside the driver's scope, or all expected failures."""
    rep.outcome, rep.longrepr = "skipped", None
    if verdict.expected:
        result.outcome = "expected fail"
        rep.wasxfail = "expected: " + "; ".join(sorted(set(verdict.expected.values())))
    elif verdict.unmappable:  # the requirement applies: only the driver's layout kept it from being checked
        result.outcome = "not run"
        result.reason = ("no drawn case could be compared in peft's layout: " + "; ".join(sorted(verdict.unmappable))
                         + " (a layout.to_peft that maps these tensors, or a scope without them, makes it checkable)")
        rep.longrepr = (str(rep.fspath), 0, f"Skipped: {NOT_RUN}{result.reason}")
    elif verdict.out_of_scope:
        result.outcome = "not applicable"
        result.reason = "every drawn case is outside the driver's scope: " + "; ".join(sorted(verdict.out_of_scope))
        rep.longrepr = (str(rep.fspath), 0, f"Skipped: {NOT_APPLICABLE}{result.reason}")
    else:
        result.outcome, rep.outcome = "failed", "failed"
        result.failures = [{"req": r, "message": "hypothesis found no usable example", "example": ""}
                           for r in result.applicable()]


def _leaves(error) -> list[BaseException]:
    """The distinct failures behind one test failure (hypothesis groups them)."""
    if isinstance(getattr(error, "exceptions", None), (list, tuple)):  # an exception group (3.10: the backport)
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]


def _failures(excinfo, result: report.TestOutcome) -> list[dict]:
    """One entry per distinct failure and requirement: a requirement's own failure is charged to it; a crash, a
    hang or a suite bug to the applicable requirements that had not held in the case that failed."""
    failures, stopped = [], excinfo.value
    found = getattr(stopped, "found", None)  # a timeout while shrinking (plugin.TestTimeout): the failure it found
    note = f"\n({stopped})" if found is not None else ""
    for error in _leaves(found if found is not None else stopped):
        example = _example(error)
        if isinstance(error, checks.ConformanceFailure):
            failures.append({"req": error.req, "message": _first_lines(str(error)) + note, "example": example})
            continue
        applicable = result.applicable()
        charged = [r for r in applicable if r not in result.last_held] or applicable
        prefix = "SUITE BUG (not the implementation's): " if isinstance(error, SuiteError) else ""
        message = _first_lines(f"{prefix}{type(error).__name__}: {error}") + note
        failures += [{"req": req, "message": message, "example": example} for req in charged]
    return failures


def _example(error: BaseException) -> str:
    """The shrunk example hypothesis attached to this failure: its "Draw N (label): value" lines."""
    notes = getattr(error, "__notes__", [])
    return "\n".join(n.strip() for n in notes if n.strip().startswith("Draw "))[:4000]


def _first_lines(text: str, most: int = 8) -> str:
    return "\n".join(text.splitlines()[:most])


def _apply_expectations(result: report.TestOutcome, rep, verdict: Optional[Verdict], path: str) -> None:
    """Expected failures become "expected fail" (pytest: xfailed); a "fail" entry without `when` whose requirement
    held is an unexpected pass (a failure). `when` entries were applied per drawn case by the verdict."""
    entries = verdict.entries if verdict else []
    test_level = [e for e in entries if not e.when and e.status in ("fail", "flaky")]
    expected = dict(result.expected)
    for entry in test_level:
        if any(f["req"] == entry.req for f in result.failures):
            expected.setdefault(entry.req, entry.reason)
    result.expected = expected
    for failure in result.failures:
        failure["expected"] = failure["req"] in expected
    unexpected = {}
    for entry in test_level:
        if entry.status == "fail" and entry.req in result.held and entry.req not in expected:
            unexpected[entry.req] = f"{entry.describe()} is expected to fail in {path} but passed: remove the entry"
    result.unexpected = unexpected
    if unexpected:
        result.outcome = "unexpected pass" if result.outcome in ("passed", "expected fail") else result.outcome
        rep.outcome, rep.longrepr = "failed", "\n".join(unexpected.values())
    elif result.outcome == "failed" and all(f["expected"] for f in result.failures):
        result.outcome = "expected fail"
        rep.outcome, rep.wasxfail = "skipped", "expected: " + "; ".join(sorted(set(expected.values())))
    elif result.outcome == "passed" and expected:
        result.outcome = "expected fail"


def repro(item, state) -> str:
    """A command that reruns this test when pasted into a shell: the driver's import path and this checkout (when
    the suite is not installed) on PYTHONPATH, and the options that shaped the run."""
    impl, driver_root = api.driver_source(state.impl_spec)
    roots = [driver_root] if driver_root else []
    suite_root = Path(__file__).resolve().parents[2]  # the checkout: conformance/engine/ is two levels down
    if "site-packages" not in suite_root.parts:
        roots.append(str(suite_root))
    env = f"PYTHONPATH={os.pathsep.join(dict.fromkeys(roots))}{os.pathsep}$PYTHONPATH " if roots else ""
    options = [f"--peft-impl={impl}", f"--peft-profile={state.profile}"]
    if state.devices != ["cpu"]:
        options.append("--peft-device=" + ",".join(state.devices))
    options.append("--peft-dtype=" + ",".join(state.dtypes))  # the test id names its dtype: that axis must exist
    if state.expectations:
        options.append(f"--peft-expectations={Path(state.expectations.path).resolve()}")
    seed = item.config.getoption("hypothesis_seed", None)
    if seed is not None:  # a randomized profile: the draws come from this seed
        options.append(f"--hypothesis-seed={seed}")
    # This interpreter, by its path: after a tox run, a bare `pytest` in the user's shell cannot import the suite.
    return (f"{env}{sys.executable} -m pytest '{item.path}::{item.name}' -p conformance.plugin -p no:cacheprovider "
            f"{' '.join(options)}")
