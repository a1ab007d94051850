"""MULTI: several adapters in one model."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases

pytestmark = pytest.mark.needs("multi_adapter")


def _second(impl, mine: harness.Adapted, case, seed: int) -> dict:
    """Add adapter "other" (same targets, its own r and alpha) and load values into it."""
    impl.add_adapter(mine.model, dict(case.config), "other")
    mine.model.eval()  # new LoRA layers start in train mode (see LORA-FWD-004)
    initial = impl.adapter_state_dict(mine.model, "other")
    values = harness.adapter_values(initial, seed)
    impl.load_adapter_state_dict(mine.model, {k: v.to(mine.device) for k, v in values.items()}, "other")
    return values


def _other_case(data, impl, case):
    config = {**case.config, "r": data.draw(st.integers(1, 8), label="other r"),
              "lora_alpha": data.draw(st.sampled_from([1, 4, 16]), label="other alpha")}
    return case._replace(config=config)


@pytest.mark.req("LORA-MULTI-001")
@given(data=st.data())
def test_added_adapter_is_inactive_and_frozen(impl, device, data):
    case = data.draw(cases(impl.capabilities, extras=False), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    before, counts = mine.output(), impl.trainable_parameters(mine.model)
    other = _other_case(data, impl, case)
    _second(impl, mine, other, case.values_seed + 1)
    checks.close(mine.output(), before, "fp32", "LORA-MULTI-001", "output after add_adapter")
    after = impl.trainable_parameters(mine.model)
    checks.check(after[0] == counts[0] and after[1] > counts[1], "LORA-MULTI-001",
                 f"(trainable, total) {counts} before add_adapter, {after} after")


@pytest.mark.req("LORA-MULTI-002", "LORA-MULTI-003")
@given(data=st.data())
def test_set_and_delete_adapter(impl, device, data):
    case = data.draw(cases(impl.capabilities, extras=False), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    default_output = mine.output()
    other = _other_case(data, impl, case)
    values = _second(impl, mine, other, case.values_seed + 1)
    alone = harness.wrap(impl, other, device, torch.float32)
    harness.load_values(alone, values)
    impl.set_adapter(mine.model, "other")
    checks.close(mine.output(), alone.output(), "fp32", "LORA-MULTI-002", "output with 'other' active")
    found, expected = impl.trainable_parameters(mine.model)[0], impl.trainable_parameters(alone.model)[0]
    checks.check(found == expected, "LORA-MULTI-002", f"{found} trainable with 'other' active, expected {expected}")
    impl.set_adapter(mine.model, "default")
    impl.delete_adapter(mine.model, "other")
    checks.close(mine.output(), default_output, "fp32", "LORA-MULTI-003", "output after deleting 'other'")
    total = impl.trainable_parameters(mine.model)[1]
    checks.check(total == impl.trainable_parameters(harness.wrap(impl, case, device, torch.float32).model)[1],
                 "LORA-MULTI-003", f"{total} parameters remain after deleting 'other'")
