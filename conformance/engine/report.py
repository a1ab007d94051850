"""Per-requirement results: collected from test reports (also across pytest-xdist workers), rolled up to one
status per requirement, and rendered as a terminal table, JSON and Markdown.

Statuses: pass, fail, expected fail (an expectations-file entry), not applicable (a capability the driver does
not declare), blocked (a prerequisite failed), not run (e.g. no oracle, no GPU).
"""

import json
import platform
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Optional

from .. import SPEC_VERSION, __version__, spec

REPORT_SCHEMA = "peft-conformance/report/v1"
STATUS_ORDER = ("fail", "blocked", "expected fail", "pass", "not applicable", "not run")


@dataclass
class TestOutcome:
    """What one test run contributes: the requirements it claims, and for each what it found."""

    nodeid: str
    reqs: list[str]  # claimed by the test's @pytest.mark.req
    outcome: str  # passed | failed | not applicable | not run | expected fail | unexpected pass
    failures: list[dict] = field(default_factory=list)  # {req, message, example, expected}: one per failure
    held: list[str] = field(default_factory=list)  # requirements with an assertion that ran and held
    last_held: list[str] = field(default_factory=list)
    not_applicable: dict = field(default_factory=dict)  # req -> why: capabilities the driver does not declare
    not_run: dict = field(default_factory=dict)  # req -> why: outside this run's axes (a dtype not asked for)
    expected: dict = field(default_factory=dict)  # req -> the expectations file's reason
    blocked_by: list[str] = field(default_factory=list)  # preconditions that failed
    unexpected: dict = field(default_factory=dict)  # req -> message: expected failures that passed
    out_of_scope: dict = field(default_factory=dict)  # the driver's scope refusals -> count
    comparisons: dict = field(default_factory=dict)  # req -> how it was compared, where not directly
    expectations_seen: list[str] = field(default_factory=list)
    reason: str = ""  # why the whole test did not run
    repro: str = ""
    measurements: list[dict] = field(default_factory=list)
    cell: dict = field(default_factory=dict)

    def applicable(self) -> list[str]:
        return [r for r in self.reqs if r not in self.not_applicable and r not in self.not_run]

    def failed_reqs(self) -> list[str]:
        return sorted({f["req"] for f in self.failures if not f.get("expected")})

    def verdict(self, req: str) -> tuple[str, str]:
        """(count, reason) for one requirement: what this test says about it."""
        if req in self.not_applicable:
            return "not applicable", self.not_applicable[req]
        if req in self.not_run:
            return "not run", self.not_run[req]
        if req in self.failed_reqs():
            return "failed", ""
        if req in self.expected:
            return "expected fail", self.expected[req]
        if req in self.unexpected:
            return "unexpected pass", ""
        if self.outcome in ("not applicable", "not run"):
            return self.outcome, self.reason
        if req in self.held:
            return "passed", self.comparisons.get(req, "")
        if self.blocked_by:
            return "not run", f"blocked: {', '.join(self.blocked_by)} failed first"
        if self.outcome == "failed":
            return "not run", "the test stopped on another requirement before asserting it"
        return "not run", "no assertion bound to it ran (no drawn case reached it)"


@dataclass
class RequirementResult:
    req: str
    counts: dict = field(default_factory=lambda: {"passed": 0, "failed": 0, "expected fail": 0,
                                                   "unexpected pass": 0, "not applicable": 0, "not run": 0})
    worst: Optional[dict] = None
    failures: list[dict] = field(default_factory=list)
    reasons: set = field(default_factory=set)
    status: str = "not run"
    widened: bool = False
    axes: dict = field(default_factory=dict)  # "cpu/float32" -> counts on that axis


class Results:
    def __init__(self):
        self.outcomes: list[TestOutcome] = []

    def add(self, outcome: TestOutcome) -> None:
        self.outcomes.append(outcome)

    def by_requirement(self) -> dict[str, RequirementResult]:
        results: dict[str, RequirementResult] = {}
        for outcome in self.outcomes:
            axis = f"{outcome.cell.get('device', 'cpu')}/{outcome.cell.get('dtype', 'float32')}"
            for req in dict.fromkeys([*outcome.reqs, *(f["req"] for f in outcome.failures)]):
                result = results.setdefault(req, RequirementResult(req))
                kind, reason = outcome.verdict(req)
                result.counts[kind] += 1
                on_axis = result.axes.setdefault(axis, dict.fromkeys(result.counts, 0))
                on_axis[kind] += 1
                if reason:  # a pass has one only when compared otherwise than directly
                    result.reasons.add(reason)
                for failure in outcome.failures:
                    if failure["req"] == req and not failure.get("expected"):
                        result.failures.append({"test": outcome.nodeid, "message": failure["message"],
                                                "repro": outcome.repro, "cell": outcome.cell,
                                                "example": failure.get("example", "")})
                if kind == "unexpected pass":
                    result.failures.append({"test": outcome.nodeid, "message": outcome.unexpected[req],
                                            "repro": "", "cell": outcome.cell, "example": ""})
            for m in outcome.measurements:
                result = results.get(m["req"])
                if result is None:
                    continue
                result.widened |= m.get("widened", False)
                if result.worst is None or m["ratio"] > result.worst["ratio"]:
                    result.worst = m
        for result in results.values():
            result.status = status_of(result.counts)
        for result in results.values():  # blocked: it did not pass, and something it depends on failed
            deps = spec.requirements()[result.req].depends_on if result.req in spec.requirements() else ()
            if result.status in ("fail", "not run") and any(
                    results.get(d) is not None and results[d].status == "fail" for d in deps):
                result.status = "blocked"
        return dict(sorted(results.items(), key=lambda item: _sort_key(item[0])))

    def closest_per_class(self) -> dict[str, dict]:
        """Per tolerance class (exact aside), the comparison that came closest to its bound: how near a pass was.
        {class: {ratio, max_abs, req, axis, test, tests}}; a ratio above 1 is a failure, `tests` counts the tests
        that compared under the class."""
        closest: dict[str, dict] = {}
        for outcome in self.outcomes:
            axis = f"{outcome.cell.get('device', 'cpu')}/{outcome.cell.get('dtype', 'float32')}"
            for m in outcome.measurements:
                if m["tolerance"] == "exact":
                    continue
                entry = closest.setdefault(m["tolerance"], {"ratio": -1.0, "tests": 0})
                entry["tests"] += 1
                if m["ratio"] > entry["ratio"]:
                    entry.update(ratio=m["ratio"], max_abs=m["max_abs"], req=m["req"], axis=axis,
                                 test=outcome.nodeid, widened=m.get("widened", False))
        return dict(sorted(closest.items()))

    def summary(self) -> dict[str, int]:
        totals = {status: 0 for status in STATUS_ORDER}
        for result in self.by_requirement().values():
            totals[result.status] += 1
        return totals


def status_of(counts: dict) -> str:
    if counts["failed"] or counts["unexpected pass"]:
        return "fail"
    if counts["expected fail"]:
        return "expected fail"
    if counts["passed"]:
        return "pass"
    if counts["not applicable"]:
        return "not applicable"
    return "not run"


def _sort_key(req: str):
    ids = list(spec.requirements())
    return ids.index(req) if req in ids else len(ids)


def worst_text(result: RequirementResult) -> str:
    worst = result.worst
    if not worst:
        return ""
    if worst["max_abs"] == 0:
        return "0"
    if worst["tolerance"] == "exact":
        return f"{worst['max_abs']:.2g} (exact)"
    return f"{worst['max_abs']:.2g} ({worst['ratio']:.2g}x {worst['tolerance']})"


def to_json(results: Results, implementation: dict, environment: dict) -> dict:
    """The JSON report (schema peft-conformance/report/v1)."""
    by_req = results.by_requirement()
    return {
        "schema": REPORT_SCHEMA,
        "suite_version": __version__,
        "spec_version": SPEC_VERSION,
        "implementation": implementation,
        "environment": {"python": platform.python_version(), "platform": platform.platform(), **environment},
        "summary": results.summary(),
        "tolerance_classes": results.closest_per_class(),
        "requirements": {
            req: {"status": r.status, "title": spec.requirements()[req].title if req in spec.requirements() else "",
                  "level": spec.requirements()[req].level if req in spec.requirements() else "",
                  "counts": r.counts, "axes": {axis: status_of(c) for axis, c in r.axes.items()},
                  "worst": r.worst, "widened": r.widened, "reasons": sorted(r.reasons), "failures": r.failures}
            for req, r in by_req.items()},
        "tests": [{"test": o.nodeid, "claims": o.reqs, "outcome": o.outcome, "held": o.held,
                   "failed": o.failed_reqs(), "not_applicable": sorted(o.not_applicable),
                   "reason": o.reason or "; ".join(sorted(set(o.expected.values())))} for o in results.outcomes],
    }


def to_markdown(report: dict) -> str:
    """A summary for a CI job page: the totals, one row per requirement (with the reason behind any status but a
    pass), each failure with its message and the command that reproduces it, and how close each tolerance class
    came. Requirement IDs are plain text: the texts are in SPEC.md, which `peft-conformance spec` prints."""
    impl = report["implementation"]
    totals = ", ".join(f"{n} {status}" for status, n in report["summary"].items() if n)
    lines = [f"### peft-conformance: {impl.get('name')} {impl.get('version', '')}", "",
             f"{totals} (spec v{report['spec_version']}, suite {report['suite_version']}; the requirements' texts: "
             "SPEC.md, printed by `peft-conformance spec`)", "",
             "| requirement | level | status | worst error | title | why not a pass, or how it was compared |",
             "|---|---|---|---|---|---|"]
    for req, r in report["requirements"].items():
        worst = f"{r['worst']['max_abs']:.2g} ({r['worst']['tolerance']})" if r["worst"] else ""
        why = _cell("; ".join(r["reasons"]) or (
            r["failures"][0]["message"].splitlines()[0] if r["failures"] and r["status"] != "pass" else ""))
        lines.append(f"| {req} | {r['level']} | {r['status']} | {worst} | {_cell(r['title'])} | {why} |")
    failing = [(req, f) for req, r in report["requirements"].items() for f in r["failures"][:2]]
    if failing:
        lines += ["", "#### Failures", ""]
        for req, failure in failing:
            lines += [f"**{req}** `{failure['test']}`", "", "```", failure["message"], *(
                [f"\n{failure['example']}"] if failure.get("example") else []), "```"]
            if failure.get("repro"):
                lines += ["", "reproduce:", "", "```bash", failure["repro"], "```"]
            lines.append("")
    closest = report.get("tolerance_classes") or {}
    if closest:
        lines += ["",
                  "How close the comparisons came to each tolerance class (worst |diff| / allowed; 1 is the bound):",
                  "", "| class | worst ratio | its abs diff | where | tests |", "|---|---|---|---|---|"]
        lines += [f"| `{name}` | {c['ratio']:.3g} | {c['max_abs']:.3g} | {c['req']} ({c['axis']}) | {c['tests']} |"
                  for name, c in closest.items()]
    return "\n".join(lines) + "\n"


def _cell(text: str, most: int = 160) -> str:
    """Text for one Markdown table cell: one line, no pipes, cut at `most` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= most else text[:most - 3] + "..."


def closest_text(closest: dict[str, dict]) -> str:
    """One line per tolerance class: how close this run came to its bound."""
    return "\n".join(f"  {name:8} worst {c['ratio']:.3g}x of the bound (|diff| {c['max_abs']:.2g}, {c['req']} on "
                     f"{c['axis']}; {c['tests']} tests)" for name, c in closest.items())


def write(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    md_path = path[:-5] + ".md" if path.endswith(".json") else path + ".md"
    with open(md_path, "w") as handle:
        handle.write(to_markdown(report))


def outcome_from_dict(data: dict) -> TestOutcome:
    return TestOutcome(**data)


def outcome_to_dict(outcome: TestOutcome) -> dict:
    return asdict(outcome)


SHORT = {"pass": "pass", "fail": "**FAIL**", "blocked": "blocked", "expected fail": "xfail", "not applicable": "n/a",
         "not run": "-"}


def _column(report: dict) -> str:
    """A report's column heading: the implementation, its transformers, and the axes when more than CPU float32."""
    impl, env = report["implementation"], report["environment"]
    extra = f"<br>transformers {env['transformers']}" if env.get("transformers") else ""
    devices, dtypes = env.get("devices", ["cpu"]), env.get("dtypes", ["float32"])
    if devices != ["cpu"] or dtypes != ["float32"]:
        gpu = f" ({env.get('gpu', 'GPU')})" if any(d.startswith("cuda") for d in devices) else ""
        extra += f"<br>{','.join(devices)}{gpu} x {','.join(dtypes)}"
    return f"{impl['name']} {impl['version']}{extra}"


def compare_markdown(paths) -> str:
    """Several reports side by side: one column per report, one row per requirement, and the totals."""
    reports = [json.loads(open(p).read()) for p in paths]
    reqs = [r for r in spec.requirements() if any(r in rep["requirements"] for rep in reports)]
    lines = ["| requirement | level | " + " | ".join(_column(r) for r in reports) + " |",
             "|---|---|" + "---|" * len(reports)]
    for req in reqs:
        cells = [SHORT[rep["requirements"][req]["status"]] if req in rep["requirements"] else "" for rep in reports]
        lines.append(f"| [{req}](../SPEC.md#{req.lower()}) | {spec.requirements()[req].level} | "
                     + " | ".join(cells) + " |")
    totals = [", ".join(f"{n} {SHORT[s]}" for s, n in rep["summary"].items() if n) for rep in reports]
    lines.append("| **totals** | | " + " | ".join(totals) + " |")
    failures = []
    for rep in reports:
        for req, entry in rep["requirements"].items():
            if entry["status"] == "fail" and entry["failures"]:
                first = entry["failures"][0]["message"].splitlines()[0]
                failures.append(f"- {_column(rep).replace('<br>', ', ')}, {req}: {first}")
    known = [f"- {_column(rep).replace('<br>', ', ')}, {req}: {'; '.join(entry['reasons'])}"
             for rep in reports for req, entry in rep["requirements"].items()
             if entry["status"] == "expected fail" and entry.get("reasons")]
    return "\n".join(lines) + ("\n\nFirst failure of each failing requirement:\n\n" + "\n".join(failures)
                               if failures else "") + ("\n\nExpected failures, with the reasons their expectations "
                                                       "files give:\n\n" + "\n".join(known) if known else "") + "\n"


CASE_OUTPUTS = ("unmerged", "merged", "disabled")
CASE_SHORT = {"passed": "pass", "failed": "**FAIL**", "expected fail": "xfail", "unexpected pass": "**XPASS**",
              "not applicable": "n/a", "not run": "-"}


def cases_markdown(paths) -> str:
    """Reports of golden-check --corpus side by side, by case: which cases each consumer computes as peft does
    (unmerged / merged / disabled), then each reason behind a cell that is not a pass, once, with its cases."""
    reports = [json.loads(open(p).read()) for p in paths]
    by_report = [{t["test"]: t for t in rep["tests"]} for rep in reports]
    cases = list(dict.fromkeys(t["test"].rsplit("::", 1)[0] for rep in reports for t in rep["tests"]))
    lines = ["| case (unmerged / merged / disabled) | " + " | ".join(_column(r) for r in reports) + " |",
             "|---|" + "---|" * len(reports)]
    reasons: dict[tuple[str, str], list[str]] = {}
    for case in cases:
        cells = []
        for rep, tests in zip(reports, by_report):
            found = [tests.get(f"{case}::{output}") for output in CASE_OUTPUTS]
            cells.append(" / ".join(CASE_SHORT[t["outcome"]] if t else "" for t in found))
            for test in found:
                if test and test["outcome"] != "passed" and test.get("reason"):
                    affected = reasons.setdefault((_column(rep).replace("<br>", ", "), test["reason"]), [])
                    affected += [] if case in affected else [case]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    notes = [f"- {column} ({'all cases' if len(affected) == len(cases) else ', '.join(affected)}): {reason}"
             for (column, reason), affected in reasons.items()]
    return "\n".join(lines) + ("\n\nWhy a cell is not a pass:\n\n" + "\n".join(notes) if notes else "") + "\n"
