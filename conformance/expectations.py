"""The expectations file: known failures of an implementation, kept by its authors, checked strictly.

    [[expect]]
    req = "LORA-INIT-007"                       # the requirement
    status = "fail"                             # fail | flaky | tolerance
    reason = "loralib layers copy the base weight into a new module"   # required
    where = { device = "cuda", test = "test_injection_is_in_place" }   # optional: test, id, device, dtype
    # status = "tolerance" takes rtol / atol: a widened tolerance, reported as such

Strict: an expected failure that passes, and an entry that matches no test, fail the run.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATUSES = ("fail", "flaky", "tolerance")
WHERE_KEYS = ("test", "id", "device", "dtype")  # id: the test's name with its parameters, "test_x[r=0]"


@dataclass
class Entry:
    req: str
    status: str
    reason: str
    where: dict = field(default_factory=dict)
    rtol: Optional[float] = None
    atol: Optional[float] = None

    def matches(self, reqs, cell: dict) -> bool:
        return self.req in reqs and all(str(cell.get(k)) == str(v) for k, v in self.where.items())

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.where.items())
        return f"{self.req} ({self.status}{', ' + where if where else ''})"


class Expectations:
    def __init__(self, entries: list[Entry], path: str):
        self.entries, self.path = entries, path

    def widened(self, reqs, cell: dict) -> dict[str, spec.Tolerance]:
        """Tolerances that 'tolerance' entries widen for this test."""
        out = {}
        for entry in self.entries:
            if entry.status == "tolerance" and entry.matches(reqs, cell):
                out[entry.req] = spec.Tolerance(f"widened:{entry.req}", entry.reason, entry.rtol, entry.atol)
        return out

    def apply(self, outcome, rep) -> None:
        """Turn a failure that an entry expects into an expected failure (pytest: xfailed), and an expected
        failure that passed into a failure (strict)."""
        expected = [e for e in self.entries if e.status in ("fail", "flaky") and e.matches(outcome.reqs, outcome.cell)]
        if outcome.outcome == "failed":
            covered = {e.req for e in expected}
            if outcome.failed_reqs and set(outcome.failed_reqs) <= covered:
                outcome.outcome = "expected fail"
                outcome.reason = "; ".join(e.reason for e in expected if e.req in outcome.failed_reqs)
                rep.outcome, rep.wasxfail = "skipped", f"expected by {self.path}: {outcome.reason}"
        elif outcome.outcome == "passed":
            stale = [e for e in expected if e.status == "fail"]
            if stale:
                outcome.outcome = "unexpected pass"
                outcome.message = (f"{', '.join(e.describe() for e in stale)} is expected to fail in {self.path} "
                                   "but passed: remove the entry")
                rep.outcome, rep.longrepr = "failed", outcome.message

    def unused(self, outcomes) -> list[Entry]:
        """Entries that matched no test of this run: stale, or misspelled."""
        return [e for e in self.entries if not any(e.matches(o.reqs, o.cell) for o in outcomes)]


def load(path: str) -> Expectations:
    """Read and validate an expectations file; every problem names the entry and the field."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"expectations file {path} does not exist")
    try:
        raw = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None
    unknown_top = set(raw) - {"expect"}
    if unknown_top:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown_top)}; entries go in [[expect]] tables")
    entries = []
    for number, item in enumerate(raw.get("expect", []), start=1):
        where = f"{path}, entry {number}"
        extra = set(item) - {"req", "status", "reason", "where", "rtol", "atol", "issue"}
        if extra:
            raise ValueError(f"{where}: unknown keys {sorted(extra)}")
        if item.get("req") not in spec.requirements():
            raise ValueError(f"{where}: req {item.get('req')!r} is not a requirement ID (see SPEC.md)")
        if item.get("status") not in STATUSES:
            raise ValueError(f"{where}: status {item.get('status')!r}; expected one of {STATUSES}")
        if not str(item.get("reason", "")).strip():
            raise ValueError(f"{where}: every entry needs a reason")
        bad_where = set(item.get("where", {})) - set(WHERE_KEYS)
        if bad_where:
            raise ValueError(f"{where}: where-keys {sorted(bad_where)}; expected some of {WHERE_KEYS}")
        if item["status"] == "tolerance" and not ("rtol" in item and "atol" in item):
            raise ValueError(f"{where}: status 'tolerance' needs rtol and atol")
        entries.append(Entry(item["req"], item["status"], item["reason"], dict(item.get("where", {})),
                             item.get("rtol"), item.get("atol")))
    return Expectations(entries, path)
