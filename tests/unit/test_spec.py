"""The spec itself: a consistent registry, a current SPEC.md, and a test for every MUST requirement."""

import importlib
import importlib.util
import pkgutil
import re

import pytest

import conformance.suite
from conformance import api, spec
from tests.claims import claims_and_bindings
from tests.conftest import ROOT

REQ_IN_MARKER = re.compile(r"mark\.req\(([^)]*)\)")
REQ_ID = re.compile(r"(?:LORA|QLORA|IA3|LOHA|LOKR)-[A-Z]+-\d{3}")


def _suite_tests():
    for info in pkgutil.iter_modules(conformance.suite.__path__):
        module = importlib.import_module(f"conformance.suite.{info.name}")
        for name, function in vars(module).items():
            if name.startswith("test_") and callable(function):
                yield f"{info.name}::{name}", function


def _ids_tested(paths) -> set[str]:
    found = set()
    for path in paths:
        for marker in REQ_IN_MARKER.findall(path.read_text()):
            found.update(REQ_ID.findall(marker))
    return found


def test_registry_is_consistent():
    tolerances, requirements = spec.tolerances(), spec.requirements()
    for req in requirements.values():
        assert REQ_ID.fullmatch(req.id), req.id
        assert req.level in spec.LEVELS and req.comparison in spec.COMPARISONS and req.scope in spec.SCOPES, req.id
        assert req.comparison != "close" or req.tolerance in tolerances, f"{req.id}: close needs a tolerance class"
        assert not req.tolerance or req.tolerance in tolerances, f"{req.id}: unknown class {req.tolerance}"
        assert set(req.depends_on) <= set(requirements), f"{req.id}: depends on unknown IDs"
        assert set(req.capabilities) <= set(api.CAPABILITIES), f"{req.id}: unknown capabilities"
        assert req.source.strip() and req.title.strip(), req.id


def _claims(mark) -> bool:
    """A req marker, or a parametrize whose parameters each carry one."""
    if mark.name == "req":
        return True
    return mark.name == "parametrize" and any(any(m.name == "req" for m in getattr(p, "marks", ()))
                                              for p in mark.args[1])


def test_every_suite_test_names_its_requirements():
    missing = [name for name, function in _suite_tests()
               if not any(_claims(mark) for mark in getattr(function, "pytestmark", []))]
    assert not missing, f"conformance tests without @pytest.mark.req: {missing}"


def test_no_test_claims_a_requirement_it_never_asserts():
    overclaims = {}
    for path in (ROOT / "conformance" / "suite").glob("test_*.py"):
        for test, (claimed, bound) in claims_and_bindings(path.read_text()).items():
            if claimed - bound:
                overclaims[f"{path.name}::{test}"] = sorted(claimed - bound)
            assert bound <= claimed, f"{path.name}::{test} asserts {sorted(bound - claimed)} without claiming them"
    assert not overclaims, f"tests claim requirements no assertion of theirs is bound to: {overclaims}"


PLANTED = """
@pytest.mark.req("LORA-FWD-001", "LORA-FWD-002")
def test_claims_two_and_checks_one(run):
    run.check(output_ok(), "the output", req="LORA-FWD-001")


@pytest.mark.req("LORA-MERGE-001")
def test_checks_through_a_helper(run):
    _helper(run)


def _helper(run):
    run.close(merged(), expected(), "merged weight")
"""


def test_the_over_claim_check_catches_a_planted_test():
    found = claims_and_bindings(PLANTED)
    claimed, bound = found["test_claims_two_and_checks_one"]
    assert claimed - bound == {"LORA-FWD-002"}
    assert found["test_checks_through_a_helper"] == ({"LORA-MERGE-001"}, {"LORA-MERGE-001"})


def test_applicability_comes_from_the_registry_alone():
    """No capability is declared outside requirements.toml: no `needs` markers, no golden manifest lookups."""
    sources = [p.read_text() for p in (ROOT / "conformance").rglob("*.py")]
    assert not any("mark.needs" in s for s in sources), "capabilities belong in requirements.toml"
    assert not any('manifest["needs"]' in s for s in sources), "golden cases apply by their config (scope.py)"


def test_every_must_requirement_has_a_test():
    suite_ids = _ids_tested((ROOT / "conformance" / "suite").glob("test_*.py"))
    project_ids = _ids_tested((ROOT / "tests").rglob("test_*.py"))
    untested = [req.id for req in spec.requirements().values() if req.level == "MUST" and not req.deprecated
                and req.id not in (suite_ids if req.scope == "driver" else project_ids)]
    assert not untested, f"MUST requirements without a test in their scope: {untested}"
    unknown = (suite_ids | project_ids) - set(spec.requirements())
    assert not unknown, f"tests cite unknown requirement IDs: {sorted(unknown)}"


def test_reference_impl_cites_known_requirements():
    cited = {i for path in (ROOT / "reference_impl").glob("*.py") for i in REQ_ID.findall(path.read_text())}
    assert cited, "reference_impl docstrings should name the requirements they implement"
    assert cited <= set(spec.requirements()), f"unknown IDs cited: {sorted(cited - set(spec.requirements()))}"


def test_spec_md_is_generated_from_the_registry():
    assert (ROOT / "SPEC.md").read_text() == spec.render_markdown(), \
        "SPEC.md is stale: regenerate it with `peft-conformance spec > SPEC.md`"


# The library each shipped driver wraps; its own tox env (`tox -e NAME`) installs it and loads the driver too.
WRAPPED_LIBRARY = {"reference": "reference_impl", "peft": "peft", "loralib": "loralib", "torchtune": "torchtune",
                   "mlx": "mlx_lm", "lycoris": "lycoris"}


@pytest.mark.parametrize("name", sorted(api.BUILTIN_DRIVERS))
def test_shipped_drivers_follow_the_protocol(name):
    if importlib.util.find_spec(WRAPPED_LIBRARY[name]) is None:
        pytest.skip(f"{WRAPPED_LIBRARY[name]} is not installed here; `tox -e {name}` checks this driver")
    assert not api.protocol_problems(api.load_driver(name))
