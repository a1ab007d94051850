"""MULTI: several adapters in one model."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness


def _second(run, mine: harness.Adapted, config: dict, seed: int) -> dict:
    """Add adapter "other" (same targets, its own r and alpha) and load values into it."""
    run.within_scope(mine.case._replace(config=config), "other")
    run.impl.add_adapter(mine.model, dict(config), "other")
    mine.model.eval()  # new LoRA layers start in train mode (see LORA-FWD-004)
    values = harness.adapter_values(run.peft_state(mine.model, "other"), seed)
    run.load(mine, values, "other")
    return values


def _other_config(run, data, case) -> dict:
    """Its own r and alpha, and its own use_rslora where the driver has rslora: per-adapter fields, never the first
    adapter's."""
    other = {**case.config, "r": data.draw(st.integers(1, 8), label="other r"),
             "lora_alpha": data.draw(st.sampled_from([1, 4, 16]), label="other alpha")}
    if "rslora" in run.impl.capabilities:
        other["use_rslora"] = data.draw(st.booleans(), label="other use_rslora")
    return other


@pytest.mark.req("LORA-MULTI-001")
@given(data=st.data())
def test_added_adapter_is_inactive_and_frozen(run, device, data):
    mine = run.adapted(run.draw(data, extras=False))
    before, counts = mine.output(), run.impl.trainable_parameters(mine.model)
    _second(run, mine, _other_config(run, data, mine.case), mine.case.values_seed + 1)
    run.close(mine.output(), before, "output after add_adapter")
    after = run.impl.trainable_parameters(mine.model)
    run.check(after[0] == counts[0] and after[1] > counts[1],
              f"(trainable, total) {counts} before add_adapter, {after} after")


@pytest.mark.req("LORA-MULTI-002", "LORA-MULTI-003")
@given(data=st.data())
def test_set_and_delete_adapter(run, device, data):
    mine = run.adapted(run.draw(data, extras=False))
    default_output = mine.output()
    other = mine.case._replace(config=_other_config(run, data, mine.case))
    values = _second(run, mine, other.config, mine.case.values_seed + 1)
    alone = run.wrap(other)
    run.load(alone, values)
    run.impl.set_adapter(mine.model, "other")
    run.close(mine.output(), alone.output(), "output with 'other' active", req="LORA-MULTI-002")
    found, expected = run.impl.trainable_parameters(mine.model)[0], run.impl.trainable_parameters(alone.model)[0]
    run.check(found == expected, f"{found} trainable with 'other' active, expected {expected}", req="LORA-MULTI-002")
    run.impl.set_adapter(mine.model, "default")
    run.impl.delete_adapter(mine.model, "other")
    run.close(mine.output(), default_output, "output after deleting 'other'", req="LORA-MULTI-003")
    total = run.impl.trainable_parameters(mine.model)[1]
    run.check(total == run.impl.trainable_parameters(run.wrap(mine.case).model)[1],
              f"{total} parameters remain after deleting 'other'", req="LORA-MULTI-003")
