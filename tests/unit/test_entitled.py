"""A test may call only the driver members its requirements' capabilities entitle it to (conformance/engine/run.py)."""

import functools

import pytest

from conformance import api
from conformance.drivers.reference import ReferenceDriver
from conformance.engine.run import EntitledDriver
from conformance.engine.verdict import SuiteError


def test_a_member_no_requirement_entitles_is_a_suite_bug():
    driver = ReferenceDriver()
    seen = EntitledDriver(driver, api.members_entitled({"save_load"}), ("LORA-LOAD-007",))
    assert seen.save == driver.save and seen.wrap == driver.wrap  # entitled, and the core members
    with pytest.raises(SuiteError, match=r"unload\(\).*LORA-LOAD-007"):
        seen.unload
    with pytest.raises(SuiteError, match="disable_adapter"):
        seen.disable_adapter


def test_it_stands_for_its_driver_in_caches():
    """scope.py caches per driver: the view a test sees must hit the same entries."""
    driver = ReferenceDriver()
    seen = EntitledDriver(driver, frozenset(), ())
    assert seen == driver and driver == seen and hash(seen) == hash(driver)
    calls = []

    @functools.lru_cache(maxsize=None)
    def probe(d):
        calls.append(d)
        return d.name

    probe(driver), probe(seen)
    assert len(calls) == 1


def test_every_gated_member_belongs_to_a_declared_capability():
    assert set(api.MEMBERS_OF_CAPABILITY) <= set(api.CAPABILITIES)
    assert api.GATED_MEMBERS <= set(api.DRIVER_MEMBERS) | {"add_weighted_adapter"}
