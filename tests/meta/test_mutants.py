"""The suite catches broken implementations, each on the requirement it breaks.

Every MUST requirement of the driver scope has a broken driver in tests/mutants/; `tox -e mutants` runs the whole
suite against all of them (docs/mutants.md). Here: that every MUST has one, that the committed table shows each
killed, and a fast subset run on every CI build (each broken driver against the test built to catch it)."""

import json
import re

import pytest
import torch

from conformance import spec
from tests.conftest import ROOT, run_suite
from tests.mutants import MUTANTS

FAST = ["WrongScaling", "KeysKeepAdapterName", "UnloadLeavesWrapper", "MergeWithoutScaling", "BaseNotFrozen",
        "CopiesBaseWeights", "DisableDoesNothing", "LastPatternKeyWins", "StateDictCopies", "MergeTwiceAddsTwice",
        "DoraMagnitudeIgnoresInitialDelta", "SavesAndReadsBTransposed", "TamperedFixtures"]
MUST = [r.id for r in spec.requirements().values() if r.level == "MUST" and r.scope == "driver" and not r.deprecated]


def test_every_must_requirement_has_a_broken_driver():
    built = {req for cls in MUTANTS.values() for req in cls.kills}
    assert not [r for r in MUST if r not in built], "MUST requirements without a broken driver in tests/mutants/"
    for name, cls in MUTANTS.items():
        assert set(cls.kills) <= set(spec.requirements()), name
        assert (cls.__doc__ or "").strip(), f"{name}: say what the bug is"
        module, _, test = cls.test.partition("::")
        assert (ROOT / "conformance" / "suite" / f"{module}.py").read_text().count(f"def {test}(") == 1, name


def test_the_committed_table_shows_every_must_killed():
    table = (ROOT / "docs" / "mutants.md").read_text()
    row = r"^\| \[((?:LORA|QLORA|IA3|LOHA|LOKR)-[A-Z]+-\d{3})\]\S* \| MUST \| .*? \| (.*?) \|$"
    rows = {m.group(1): m.group(2) for m in re.finditer(row, table, re.M)}
    for req in MUST:
        assert req in rows, f"{req} is not in docs/mutants.md: run `tox -e mutants`"
        verdicts = rows[req]
        assert "yes" in verdicts or "needs a GPU" in verdicts, f"{req}: its broken driver survived ({verdicts})"


@pytest.mark.parametrize("name", FAST)
def test_suite_fails_a_broken_driver_on_the_right_requirement(name, tmp_path):
    cls = MUTANTS[name]
    report = tmp_path / "report.json"
    env = cls.environment(tmp_path)
    result = run_suite("--pyargs", f"conformance.suite.{cls.test}", f"--peft-impl=tests.mutants:{name}",
                       f"--peft-report={report}", *cls.options, env=env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    statuses = {r: v["status"] for r, v in json.loads(report.read_text())["requirements"].items()}
    for req in cls.kills:
        if req in statuses:  # a broken driver built for two tests' requirements is caught by its own test here
            assert statuses[req] == "fail", f"{name}: {req} is {statuses[req]}; statuses {statuses}"
    # what a user sees without reading tracebacks: the requirement, the numbers and a reproduce command
    summary = result.stdout[result.stdout.index("peft-conformance: requirements"):]
    assert cls.kills[0] in summary and "reproduce: PYTHONPATH=" in summary, summary[-2000:]


def test_reference_driver_passes_every_requirement_it_can(tmp_path):
    """The whole suite against reference_impl, profile ci, on float32, bfloat16 and float16 bases: every requirement
    passes on every axis, and none is left "not run" because no drawn case reached its assertions (a test that
    rarely checks what it claims)."""
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite", "--peft-impl=reference", "--peft-profile=ci",
                       "--peft-dtype=float32,bfloat16,float16", f"--peft-report={report}")
    assert result.returncode == 0, result.stdout[-3000:]
    requirements = json.loads(report.read_text())["requirements"]
    not_passing = {r: v["status"] for r, v in requirements.items() if v["status"] != "pass"}
    assert not_passing == ({} if torch.cuda.is_available() else {"LORA-DEV-001": "not run"}), not_passing
    half = {r for r, v in requirements.items() if "cpu/bfloat16" in v["axes"] and "cpu/float16" in v["axes"]}
    assert half == {r for r in spec.requirements() if "bfloat16" in spec.requirement(r).dtypes and r in requirements}
