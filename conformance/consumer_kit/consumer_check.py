"""Results computed in another process (a consumer, a runtime in another language, a library that cannot share this
venv), checked against golden cases per requirement and rendered in the suite's report formats.

One implementation for both kinds of golden cases: the consumer corpus (RESULTS/<case>/) and the fixtures
(RESULTS/<version>/<case>/). Each case's folder holds

    logits.safetensors   float32 logits under the names the consumer computed: unmerged, merged, disabled (second)
    not_applicable.txt   optional: the consumer cannot express this case; the file says why
    errors.json          optional: {output: message} for outputs the consumer tried and could not compute (they fail)
    error.txt            optional: the consumer crashed on this case (its traceback); the case fails
    adapter/             optional (fixtures): the adapter saved again, compared bit for bit (LORA-GOLD-006)

Every (case, output) is one outcome, claiming that output's requirement and, for "unmerged", the requirements the
case exercises: a pass credits them only when the comparison ran and held. A failure is charged to the output's
requirement; a kohya-layout case exists to check the format's own requirements (LORA-KOHYA-*), so its failing
unmerged output is charged to those too.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from reference_impl.peft_format import adapter_directory

from .. import golden, spec
from ..engine import checks, report
from ..engine.expectations import Expectations
from . import corpus

NOT_APPLICABLE = "not_applicable.txt"
LOGITS = "logits.safetensors"
CORPUS_OUTPUTS = {"unmerged": "LORA-CONS-001", "merged": "LORA-CONS-002", "disabled": "LORA-CONS-003",
                  "weighted": "LORA-CONS-004"}
FIXTURE_OUTPUTS = {"unmerged": "LORA-GOLD-003", "merged": "LORA-GOLD-004", "disabled": "LORA-GOLD-005",
                   "second": "LORA-GOLD-007"}


@dataclass
class Golden:
    """What one case's results are compared with."""

    id: str
    folder: str  # where its results are, relative to RESULTS
    expected: dict[str, torch.Tensor]
    outputs: dict[str, str]  # output name -> requirement
    exercises: tuple[str, ...] = ()  # credited with the "unmerged" output
    tolerance: str = "golden"
    resaved: Optional[dict] = None  # (fixtures) the adapter tensors a re-save must reproduce
    adapter_name: str = "default"
    cell: dict = field(default_factory=dict)
    breaks: tuple[str, ...] = ()  # of the exercised requirements, those a wrong "unmerged" output fails as well


def corpus_goldens(root: Path) -> list[Golden]:
    return [Golden(c.name, c.name, c.expected(), {o: CORPUS_OUTPUTS[o] for o in c.manifest["outputs"]},
                   tuple(c.manifest["requirements"]), c.manifest["tolerance"],
                   breaks=tuple(c.manifest["requirements"]) if c.manifest.get("adapter_format") == "kohya" else ())
            for c in corpus.read(root)]


def fixture_goldens(folder: Optional[Path] = None) -> list[Golden]:
    out = []
    for case in golden.cases(folder):
        expected = case.expected()
        out.append(Golden(case.id, case.id, expected, {o: r for o, r in FIXTURE_OUTPUTS.items() if o in expected},
                          resaved=case.tensors(), adapter_name=case.adapter_name))
    return out


def check(goldens: list[Golden], results: Path, expectations: Optional[Expectations] = None) -> report.Results:
    """One outcome per (case, output): passed, failed (with the requirement and the numbers), not applicable (the
    consumer's not_applicable.txt, or an output its consumer.json says it never computes) or not run."""
    results, collected = Path(results), report.Results()
    never = consumer_identity(results).get("not_applicable", {})
    for case in goldens:
        done = results / case.folder
        produced, problem = _read_logits(done)
        failed = _read_errors(done)
        for output, req in case.outputs.items():
            why = f"the consumer failed to compute it: {failed[output]}" if output in failed else problem
            outcome = _compare(case, output, req, produced, why, done, never.get(output, ""))
            _expect(outcome, expectations)
            collected.add(outcome)
        if case.resaved is not None and (done / "adapter").is_dir():
            collected.add(_compare_resaved(case, adapter_directory(done / "adapter", case.adapter_name)))
    return collected


def _read_logits(done: Path) -> tuple[dict, str]:
    if (done / NOT_APPLICABLE).is_file():
        return {}, ""
    if (done / "error.txt").is_file():
        lines = (done / "error.txt").read_text().strip().splitlines() or ["(no message)"]
        return {}, f"the consumer crashed on this case: {lines[-1]} (traceback in {done / 'error.txt'})"
    path = done / LOGITS
    if not path.is_file():
        return {}, (f"no {path}: the consumer computed nothing for this case (write {NOT_APPLICABLE} with the reason "
                    "if it cannot express it)")
    try:
        return load_file(path), ""
    except (SafetensorError, OSError, ValueError) as error:
        return {}, f"{path}: not a readable safetensors file ({error})"


def _read_errors(done: Path) -> dict:
    import json

    try:
        found = json.loads((done / "errors.json").read_text()) if (done / "errors.json").is_file() else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _compare(case: Golden, output: str, req: str, produced: dict, problem: str, done: Path,
             never: str) -> report.TestOutcome:
    reqs = [req, *case.exercises] if output == "unmerged" else [req]
    outcome = report.TestOutcome(nodeid=f"{case.id}::{output}", reqs=reqs, outcome="passed",
                                 cell={"test": output, "id": case.id, "device": "cpu", "dtype": "float32"})
    if (done / NOT_APPLICABLE).is_file() or never:
        why = never or (done / NOT_APPLICABLE).read_text().strip() or "the consumer cannot express this case"
        outcome.outcome, outcome.reason = "not applicable", why
        outcome.not_applicable = dict.fromkeys(reqs, why)
        return outcome
    if not problem and output not in produced:
        outcome.outcome, outcome.reason = "not run", f"{done / LOGITS} has no {output!r} logits"
        outcome.not_run = dict.fromkeys(reqs, outcome.reason)
        return outcome
    if not problem:
        actual = produced[output]
        measured, problem = checks.compare(actual.float() if actual.is_floating_point() else actual,
                                           case.expected[output], spec.tolerances()[case.tolerance],
                                           f"case {case.id}: {output} logits")
        if measured is not None:
            outcome.measurements.append({"req": req, "tolerance": case.tolerance, "max_abs": measured.max_abs,
                                         "max_rel": measured.max_rel, "ratio": measured.ratio})
    if problem:  # charged to the output's requirement: a wrong output does not say which exercised one broke
        outcome.outcome = "failed"
        charged = [req, *(case.breaks if output == "unmerged" else ())]
        outcome.failures = [{"req": r, "message": str(checks.failure(r, problem)), "example": case.id}
                            for r in charged]
        outcome.not_run = {r: f"not judged on case {case.id}: its {output} output failed ({req})"
                           for r in reqs if r not in charged}
    else:
        outcome.held = list(reqs)
    return outcome


def _compare_resaved(case: Golden, saved: Path) -> report.TestOutcome:
    req = "LORA-GOLD-006"
    outcome = report.TestOutcome(nodeid=f"{case.id}::resaved", reqs=[req], outcome="passed",
                                 cell={"test": "resaved", "id": case.id, "device": "cpu", "dtype": "float32"})
    try:
        checks.all_close(load_file(saved / "adapter_model.safetensors"), case.resaved, "exact", req,
                         f"case {case.id}: re-saved")
        outcome.held = [req]
    except (checks.ConformanceFailure, SafetensorError, OSError) as error:
        outcome.outcome = "failed"
        outcome.failures = [{"req": req, "message": str(error), "example": case.id}]
    return outcome


def _expect(outcome: report.TestOutcome, expectations: Optional[Expectations]) -> None:
    """An expectations entry (req, where = { id = "<case>", test = "<output>" }) turns its failure into "expected
    fail"; an entry whose case passes is an unexpected pass, and fails the check."""
    if expectations is None:
        return
    for entry in expectations.for_test(outcome.reqs, outcome.cell):
        if entry.status not in ("fail", "flaky"):
            continue
        if any(f["req"] == entry.req for f in outcome.failures):
            outcome.expected[entry.req] = entry.reason
        elif entry.req in outcome.held and entry.status == "fail":
            outcome.unexpected[entry.req] = f"{entry.describe()} is expected to fail in {expectations.path} but " \
                                            "passed: remove the entry"
    for failure in outcome.failures:
        failure["expected"] = failure["req"] in outcome.expected
    if outcome.unexpected:
        outcome.outcome = "unexpected pass"
    elif outcome.failures and all(f["expected"] for f in outcome.failures):
        outcome.outcome = "expected fail"


def consumer_identity(results: Path) -> dict:
    """RESULTS/consumer.json when the consumer wrote one: {"name", "version", "not_applicable": {output: why}}."""
    import json

    path = Path(results) / "consumer.json"
    try:
        found = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        found = {}
    never = found.get("not_applicable", {})
    return {"name": str(found.get("name", "consumer")), "version": str(found.get("version", "")),
            "not_applicable": {str(k): str(v) for k, v in never.items()} if isinstance(never, dict) else {},
            **{k: str(v) for k, v in found.items() if k not in ("name", "version", "not_applicable")}}
