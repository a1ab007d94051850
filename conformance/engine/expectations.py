"""The expectations file: known failures of an implementation, kept by its authors, checked strictly.

    [[expect]]
    req = "LORA-INIT-007"                       # the requirement
    status = "fail"                             # fail | flaky | tolerance
    reason = "loralib layers copy the base weight into a new module"   # required
    where = { device = "cuda", test = "test_injection_is_in_place" }   # optional: test, id, device, dtype
    when = { targets = ["c_proj"] }             # optional: only drawn cases that match (see below)
    # status = "tolerance" takes rtol / atol: a widened tolerance, reported as such

`where` picks tests and axes exactly. `when` is a predicate over the drawn case, for a requirement that fails on
some draws and holds on others: `model` (a zoo name or a list of them), `targets` (any of these names among the
case's target_modules), or any config field of a method (LoraConfig, IA3Config, ...: a value, or a list of accepted
values).

Strict where the scope is exact: an entry whose `where` matches no test that ran fails the run (unless the run checked
its requirement on no test of its device and dtype, as a `-k` selection may: then it is noted), and a "fail" entry
without `when` whose test passes fails the run. With `when`, a failure in a drawn case inside the predicate is
expected (a crash there too: an exception from the implementation, for a requirement not yet held in that case) and
a failure outside it is a real one; a case inside it that passes is fine (a predicate cannot always say
exactly which draws fail: rsLoRA ignored shows only when r > 1). A `when` entry under which no drawn case failed is
reported, not failed: which cases hypothesis draws is not in the file's control.
"""

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATUSES = ("fail", "flaky", "tolerance")
WHERE_KEYS = ("test", "id", "device", "dtype")  # id: the test's name with its parameters, "test_x[r=0]"
CASE_KEYS = ("model", "targets")  # besides config fields


def _forms(key: str, value) -> tuple[str, ...]:
    """The values of a cell's `key` an expectation may name: the test id also without its device parameter."""
    value = str(value)
    return (value, re.sub(r"\[(cpu|cuda)-", "[", value, count=1)) if key == "id" else (value,)


@dataclass
class Entry:
    req: str
    status: str
    reason: str
    where: dict = field(default_factory=dict)
    when: dict = field(default_factory=dict)
    rtol: Optional[float] = None
    atol: Optional[float] = None

    def matches(self, reqs, cell: dict) -> bool:
        """The exact part: this requirement, in this test and axis. An `id` without the device parameter
        ("test_x[v2/case]") matches that test on every device ("test_x[cpu-v2/case]", "test_x[cuda-v2/case]")."""
        return self.req in reqs and all(str(v) in _forms(k, cell.get(k)) for k, v in self.where.items())

    def matches_case(self, case) -> bool:
        """The predicate over a drawn case (always true without `when`)."""
        if not self.when:
            return True
        if case is None:
            return False
        for key, wanted in self.when.items():
            if key == "model":
                found = case.model in (wanted if isinstance(wanted, list) else [wanted])
            elif key == "targets":
                targets = case.config.get("target_modules")
                names = set(targets) if isinstance(targets, (list, tuple, set)) else {targets}
                found = bool(names & set(wanted if isinstance(wanted, list) else [wanted]))
            else:
                value = case.config.get(key)
                found = value == wanted or (isinstance(wanted, list) and value in wanted)
            if not found:
                return False
        return True

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in {**self.where, **self.when}.items())
        return f"{self.req} ({self.status}{', ' + where if where else ''})"


class Expectations:
    def __init__(self, entries: list[Entry], path: str):
        self.entries, self.path = entries, path

    def for_test(self, reqs, cell: dict) -> list[Entry]:
        """The entries whose exact part matches this test."""
        return [e for e in self.entries if e.matches(reqs, cell)]

    def unused(self, outcomes) -> list[Entry]:
        """Entries whose exact part matched no test of this run, or only tests where the requirement does not apply
        to the driver, although the run checked their requirement on their axis: stale, or misspelled."""
        return [e for e in self.entries if _in_run(e, outcomes) and not any(
            e.matches(o.reqs, o.cell) and o.verdict(e.req)[0] != "not applicable" for o in outcomes)]

    def not_judged(self, outcomes) -> list[Entry]:
        """Entries this run cannot judge: no test of it checked their requirement on their device and dtype (a
        selection with -k, or an axis the run does not cover)."""
        return [e for e in self.entries if not _in_run(e, outcomes)]

    def unexercised(self, outcomes) -> list[Entry]:
        """`when` entries whose tests ran but under which no drawn case failed: stale, or not drawn this run."""
        unused = self.unused(outcomes)
        return [e for e in self.entries if e.when and e not in unused and _in_run(e, outcomes)
                and not any(e.req in o.expected and e.describe() in o.expectations_seen for o in outcomes)]


def _in_run(entry: Entry, outcomes) -> bool:
    axes = {k: v for k, v in entry.where.items() if k in ("device", "dtype")}
    return any(entry.req in o.reqs and all(str(o.cell.get(k)) == str(v) for k, v in axes.items()) for o in outcomes)


def load(path: str) -> Expectations:
    """Read and validate an expectations file; every problem names the entry and the field."""
    from reference_impl import METHODS  # the field names a `when` predicate may use

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
    case_keys = set(CASE_KEYS) | {f for m in METHODS.values() for f in m.config_class.__dataclass_fields__}
    entries = []
    for number, item in enumerate(raw.get("expect", []), start=1):
        where = f"{path}, entry {number}"
        extra = set(item) - {"req", "status", "reason", "where", "when", "rtol", "atol", "issue"}
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
        bad_when = set(item.get("when", {})) - case_keys
        if bad_when:
            raise ValueError(f"{where}: when-keys {sorted(bad_when)}; expected model, targets or config fields")
        if item["status"] == "tolerance" and not ("rtol" in item and "atol" in item):
            raise ValueError(f"{where}: status 'tolerance' needs rtol and atol")
        entries.append(Entry(item["req"], item["status"], item["reason"], dict(item.get("where", {})),
                             dict(item.get("when", {})), item.get("rtol"), item.get("atol")))
    return Expectations(entries, path)
