"""MTS: modules_to_save, whole modules trained and saved beside the adapter."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness, models
from conformance.strategies import cases

pytestmark = pytest.mark.needs("modules_to_save", "conv1d")


@pytest.mark.req("LORA-MTS-001", "LORA-MTS-002")
def test_names_match_without_a_dot_boundary(impl):
    base = models.build("gpt2-tiny")
    model = impl.wrap(models.build("gpt2-tiny"), {"target_modules": ["c_attn"], "modules_to_save": ["proj"]})
    keys = set(impl.adapter_state_dict(model))
    expected = {f"base_model.model.{n}" for n, _ in base.named_parameters() if n.rsplit(".", 1)[0].endswith("proj")}
    checks.check(expected <= keys, "LORA-MTS-001", f"modules_to_save=['proj'] must save every '...c_proj' "
                                                    f"(plain endswith): missing {sorted(expected - keys)[:4]}")
    for key in sorted(expected):
        checks.check(keys and impl.adapter_state_dict(model)[key].requires_grad, "LORA-MTS-001",
                     f"{key} (a modules_to_save copy) does not train")


@pytest.mark.req("LORA-MTS-003")
@pytest.mark.needs("unload")
@given(data=st.data())
def test_unload_keeps_the_trained_copy(impl, device, data):
    case = harness.with_config(data.draw(cases(impl.capabilities, model="gpt2-tiny", extras=False), label="case"),
                               modules_to_save=["ln_f"])
    mine, _ = harness.adapted_pair(impl, None, case, device)
    unloaded = impl.unload(mine.model)
    checks.equal(unloaded.transformer.ln_f.weight.detach().cpu(),
                 mine.values["base_model.model.transformer.ln_f.weight"], "LORA-MTS-003", "ln_f weight after unload")
