"""UNLOAD: taking the adapter out hands back the original model, bit for bit."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


@pytest.mark.req("LORA-UNLOAD-001")
@pytest.mark.needs("unload")
@given(data=st.data())
def test_unload_restores_the_base_state_dict(impl, device, data):
    # bias and modules_to_save train base tensors themselves; unload keeps those (LORA-MTS-003)
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), bias=None, modules_to_save=None)
    mine, _ = harness.adapted_pair(impl, None, case, device)
    unloaded, base = impl.unload(mine.model), mine.base()
    checks.all_close(unloaded.state_dict(), base.state_dict(), "exact", "LORA-UNLOAD-001", "unloaded")
    for (name, module), (_, original) in zip(unloaded.named_modules(), base.named_modules()):
        checks.check(type(module) is type(original), "LORA-UNLOAD-001",
                     f"{name or 'the model'} is a {type(module).__name__} after unload, was {type(original).__name__}")


@pytest.mark.req("LORA-UNLOAD-002")
@pytest.mark.needs("unload")
@given(data=st.data())
def test_unload_returns_the_original_objects(impl, device, data):
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), modules_to_save=None)
    mine = harness.wrap(impl, case, device, torch.float32)
    originals = mine.original_modules
    unloaded = impl.unload(mine.model)
    checks.check(unloaded is mine.original, "LORA-UNLOAD-002",
                 f"unload returned a {type(unloaded).__name__}, not the model object that was wrapped")
    replaced = [name for name, module in unloaded.named_modules() if originals.get(name) is not module]
    checks.check(not replaced, "LORA-UNLOAD-002", f"modules that are not the original objects: {replaced[:5]}")
