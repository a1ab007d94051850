"""Matching an expectations entry to a test's cell."""

from conformance.engine.expectations import Entry


def test_an_id_without_the_device_matches_the_test_on_every_device():
    entry = Entry("LORA-GOLD-006", "fail", "why", where={"id": "test_x[v2/case]"})
    assert entry.matches(["LORA-GOLD-006"], {"id": "test_x[cpu-v2/case]"})
    assert entry.matches(["LORA-GOLD-006"], {"id": "test_x[cuda-v2/case]"})
    assert entry.matches(["LORA-GOLD-006"], {"id": "test_x[v2/case]"})
    assert not entry.matches(["LORA-GOLD-006"], {"id": "test_x[cpu-v3/case]"})
    assert not entry.matches(["LORA-GOLD-001"], {"id": "test_x[cpu-v2/case]"})
    pinned = Entry("LORA-GOLD-006", "fail", "why", where={"id": "test_x[cuda-v2/case]"})
    assert not pinned.matches(["LORA-GOLD-006"], {"id": "test_x[cpu-v2/case]"})
