"""LOAD: an adapter directory comes back as the same adapter, in the implementation and in peft."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from conformance import checks, harness
from conformance.strategies import cases

pytestmark = pytest.mark.needs("save_load")


def _reload(driver, adapted: harness.Adapted, directory, is_trainable: bool = False):
    return driver.load(adapted.base(), str(directory), is_trainable=is_trainable)


@pytest.mark.req("LORA-LOAD-001")
@given(data=st.data())
def test_round_trip(impl, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    directory = tmp_path_factory.mktemp("round_trip")
    impl.save(mine.model, str(directory))
    checks.equal(mine.output(_reload(impl, mine, directory)), mine.output(), "LORA-LOAD-001", "reloaded output")


@pytest.mark.req("LORA-LOAD-002", "LORA-LOAD-003")
@pytest.mark.oracle
@given(data=st.data())
def test_directories_cross_between_implementation_and_peft(impl, oracle, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, theirs = harness.adapted_pair(impl, oracle, case, device)
    directory = tmp_path_factory.mktemp("cross")
    impl.save(mine.model, str(directory / "mine"))
    oracle.save(theirs.model, str(directory / "peft"))
    checks.close(theirs.output(_reload(oracle, theirs, directory / "mine")), theirs.output(), "fp32",
                 "LORA-LOAD-002", "peft's output with the implementation's directory")
    checks.close(mine.output(_reload(impl, mine, directory / "peft")), theirs.output(), "fp32",
                 "LORA-LOAD-003", "the implementation's output with peft's directory")


@pytest.mark.req("LORA-LOAD-004")
@given(data=st.data())
def test_loaded_adapter_is_frozen_unless_trainable(impl, device, data, tmp_path_factory):
    # peft leaves bias='all'/'lora_only' biases trainable even when loading frozen: see the quirk in the spec
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), bias=None)
    mine = harness.wrap(impl, case, device, torch.float32)
    trainable = impl.trainable_parameters(mine.model)[0]
    directory = tmp_path_factory.mktemp("frozen")
    impl.save(mine.model, str(directory))
    frozen = _reload(impl, mine, directory)
    training = [name or "the model" for name, m in frozen.named_modules() if m.training]
    checks.check(not training, "LORA-LOAD-004", f"modules in train mode after loading: {training[:4]}")
    checks.check(impl.trainable_parameters(frozen)[0] == 0, "LORA-LOAD-004",
                 f"{impl.trainable_parameters(frozen)[0]} trainable parameters after loading without is_trainable")
    loaded = impl.trainable_parameters(_reload(impl, mine, directory, is_trainable=True))[0]
    checks.check(loaded == trainable, "LORA-LOAD-004",
                 f"is_trainable=True gives {loaded} trainable parameters, wrapping gave {trainable}")


@pytest.mark.req("LORA-LOAD-006")
@given(data=st.data())
def test_minimal_config_takes_defaults(impl, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear", "conv1d"}, extras=False))
    case = case._replace(config={k: case.config[k] for k in ("target_modules", "r", "lora_alpha")})
    mine, _ = harness.adapted_pair(impl, None, case, device)
    directory = tmp_path_factory.mktemp("minimal")
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **case.config}))
    save_file({k: v.contiguous() for k, v in mine.values.items()}, directory / "adapter_model.safetensors")
    A, B = (t.to(device) for t in harness.factors(mine.values))
    x = mine.inputs["x"]
    expected = mine.base().layer(x) + (x @ A.T) @ B.T * harness.scaling(case.config)
    checks.close(mine.output(_reload(impl, mine, directory)), expected, "fp32", "LORA-LOAD-006",
                 "output with a 4-key adapter_config.json")
