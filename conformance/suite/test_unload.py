"""UNLOAD: taking the adapter out hands back the original model, bit for bit."""

import pytest
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.req("LORA-UNLOAD-001")
@given(data=st.data())
def test_unload_restores_the_base_state_dict(run, device, dtype, data):
    # bias and modules_to_save train base tensors themselves; unload keeps those (LORA-MTS-003)
    mine = run.adapted(run.draw(data, config={"bias": None, "modules_to_save": None, "task_type": None}))
    unloaded, base = run.impl.unload(mine.model), mine.base()
    run.all_close(unloaded.state_dict(), base.state_dict(), "unloaded")
    for (name, module), (_, original) in zip(unloaded.named_modules(), base.named_modules()):
        run.check(type(module) is type(original),
                  f"{name or 'the model'} is a {type(module).__name__} after unload, was {type(original).__name__}")


@pytest.mark.req("LORA-UNLOAD-002")
@given(data=st.data())
def test_unload_returns_the_original_objects(run, device, data):
    mine = run.wrap(run.draw(data, config={"modules_to_save": None, "task_type": None}))
    originals = mine.original_modules
    unloaded = run.impl.unload(mine.model)
    run.check(unloaded is mine.original,
              f"unload returned a {type(unloaded).__name__}, not the model object that was wrapped")
    replaced = [name for name, module in unloaded.named_modules() if originals.get(name) is not module]
    run.check(not replaced, f"modules that are not the original objects: {replaced[:5]}")
