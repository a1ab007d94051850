"""The suite catches broken implementations, each on the requirement one would expect."""

import json

import pytest

from tests.conftest import run_suite
from tests.mutants import MUTANTS


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_suite_fails_a_broken_driver_on_the_right_requirement(mutant, tmp_path):
    test, req = MUTANTS[mutant]
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", f"conformance.suite.{test}", f"--peft-impl=tests.mutants:{mutant}",
                       f"--peft-report={report}")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    statuses = {r: v["status"] for r, v in json.loads(report.read_text())["requirements"].items()}
    assert statuses.get(req) == "fail", f"{mutant}: {req} is {statuses.get(req)}; statuses {statuses}"
    # what a user sees without reading tracebacks: the requirement, the numbers and a reproduce command
    summary = result.stdout[result.stdout.index("peft-conformance: requirements"):]
    assert req in summary and "reproduce: pytest" in summary, summary[-2000:]


def test_reference_driver_passes_the_same_modules(tmp_path):
    report = tmp_path / "report.json"
    tests = sorted({f"conformance.suite.{test}" for test, _ in MUTANTS.values()})
    result = run_suite("--pyargs", *tests, "--peft-impl=reference", f"--peft-report={report}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert json.loads(report.read_text())["summary"]["fail"] == 0
