"""MTS: modules_to_save, whole modules trained and saved beside the adapter."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness, scope
from conformance.zoo import models


@pytest.mark.req("LORA-MTS-001")
def test_names_match_without_a_dot_boundary(run):
    # 'proj' must also wrap every '...c_proj': modules_to_save matches with a plain endswith
    run.fixed("gpt2-tiny", {"target_modules": ["c_attn"], "modules_to_save": ["proj"]})
    base = models.build("gpt2-tiny")
    model = run.impl.wrap(models.build("gpt2-tiny"), {"target_modules": ["c_attn"], "modules_to_save": ["proj"]})
    state = run.peft_state(model)
    expected = {f"{harness.PREFIX}{n}" for n, _ in base.named_parameters() if n.rsplit(".", 1)[0].endswith("proj")}
    run.check(expected <= set(state), f"modules_to_save=['proj'] must save every '...c_proj' (plain endswith): "
                                      f"missing {sorted(expected - set(state))[:4]}")
    live = run.impl.adapter_state_dict(model)
    for key in sorted(expected & set(live)):
        run.check(live[key].requires_grad, f"{key} (a modules_to_save copy) does not train")


@pytest.mark.req("LORA-MTS-003")
@given(data=st.data())
def test_unload_keeps_the_trained_copy(run, device, data):
    saveable = [m for m in scope.models_in_scope(run.impl) if models.ZOO[m].saveable]
    if not saveable:
        pytest.skip(f"not applicable: no zoo model with a module to save is in {run.impl.name}'s scope")
    name = data.draw(st.sampled_from(saveable), label="model")
    module = models.ZOO[name].saveable[0]
    mine = run.adapted(run.draw(data, extras=False, model=name, config={"modules_to_save": [module]}))
    unloaded = run.impl.unload(mine.model)
    for name, param in unloaded.named_parameters():
        if name.rsplit(".", 1)[0].endswith(module):
            run.equal(param.detach().cpu(), run.tensor(mine.values, harness.PREFIX + name, "LORA-MTS-002").cpu(),
                      f"{name} after unload")
