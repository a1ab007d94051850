"""LOAD: an adapter directory comes back as the same adapter, in the implementation and in peft."""

import json
import shutil

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conformance.engine import harness, scope


def _reload(driver, adapted: harness.Adapted, directory, is_trainable: bool = False):
    return driver.load(adapted.base(), str(directory), is_trainable=is_trainable)


@pytest.mark.req("LORA-LOAD-001")
@given(data=st.data())
def test_round_trip(run, device, dtype, data, tmp_path_factory):
    mine = run.adapted(run.draw(data, overlap=False))  # overlapping pattern keys: LORA-SER-006
    directory = tmp_path_factory.mktemp("round_trip")
    run.impl.save(mine.model, str(directory))
    run.equal(mine.output(_reload(run.impl, mine, directory)), mine.output(), "reloaded output")


@pytest.mark.req("LORA-LOAD-002")
@given(data=st.data())
def test_peft_loads_the_implementation_s_directory(run, device, dtype, data, tmp_path_factory):
    mine, theirs = run.pair(run.draw(data, overlap=False))  # overlapping pattern keys: LORA-SER-006
    directory = tmp_path_factory.mktemp("mine")
    run.impl.save(mine.model, str(directory))
    run.close(theirs.output(_reload(run.oracle, theirs, directory)), theirs.output(),
              "peft's output with the implementation's directory")


@pytest.mark.req("LORA-LOAD-003")
@given(data=st.data())
def test_implementation_loads_peft_s_directory(run, device, dtype, data, tmp_path_factory):
    mine, theirs = run.pair(run.draw(data, overlap=False))
    directory = tmp_path_factory.mktemp("peft")
    run.oracle.save(theirs.model, str(directory))
    run.close(mine.output(_reload(run.impl, mine, directory)), theirs.output(),
              "the implementation's output with peft's directory")


@pytest.mark.req("LORA-LOAD-004")
@given(data=st.data())
def test_loaded_adapter_is_frozen_unless_trainable(run, device, data, tmp_path_factory):
    # peft leaves bias='all'/'lora_only' biases trainable even when loading frozen: see the quirk in the spec.
    # Loaded values, not fresh ones: a fused layout may hold a fresh adapter that peft's files cannot.
    mine = run.adapted(run.draw(data, config={"bias": None}, overlap=False))
    trainable = run.impl.trainable_parameters(mine.model)[0]
    directory = tmp_path_factory.mktemp("frozen")
    run.impl.save(mine.model, str(directory))
    frozen = _reload(run.impl, mine, directory)
    training = [name or "the model" for name, m in frozen.named_modules() if m.training]
    run.check(not training, f"modules in train mode after loading: {training[:4]}")
    run.check(run.impl.trainable_parameters(frozen)[0] == 0,
              f"{run.impl.trainable_parameters(frozen)[0]} trainable parameters after loading without is_trainable")
    loaded = run.impl.trainable_parameters(_reload(run.impl, mine, directory, is_trainable=True))[0]
    run.check(loaded == trainable, f"is_trainable=True gives {loaded} trainable parameters, wrapping gave {trainable}")


@pytest.mark.req("LORA-LOAD-008")
@given(data=st.data(), p=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_loaded_adapter_keeps_its_dropout(run, device, data, p, seed, tmp_path_factory):
    mine = run.adapted(run.draw(data, kinds={"linear", "conv1d", "conv2d"}, extras=False, config={"lora_dropout": p}))
    directory = tmp_path_factory.mktemp("dropout")
    run.impl.save(mine.model, str(directory))
    resumed = _reload(run.impl, mine, directory, is_trainable=True)
    outputs = []
    for model in (mine.model, resumed):
        model.train()
        torch.manual_seed(seed)
        outputs.append(mine.output(model))
    run.equal(outputs[1], outputs[0], f"train-mode output (lora_dropout={p}) loaded with is_trainable=True vs "
                                      "the adapter it was saved from, same seed")


@pytest.mark.req("LORA-LOAD-006")
@given(data=st.data())
def test_minimal_config_takes_defaults(run, device, data, tmp_path_factory):
    case = run.draw(data, single_layer=True, kinds={"linear", "conv1d"}, extras=False)
    case = run.admit(case._replace(config={k: case.config[k] for k in ("target_modules", "r", "lora_alpha")}))
    mine = run.adapted(case)
    directory = tmp_path_factory.mktemp("minimal")
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **case.config}))
    save_file({k: v.contiguous() for k, v in mine.values.items()}, directory / "adapter_model.safetensors")
    A, B = run.factors(mine.values, mine.path)
    x = mine.inputs["x"]
    expected = mine.base_layer()(x) + (x @ A.T) @ B.T * harness.scaling(case.config)
    run.close(mine.output(_reload(run.impl, mine, directory)), expected, "output with a 4-key adapter_config.json")


@pytest.mark.req("LORA-LOAD-007")
@given(data=st.data())
def test_base_tensors_in_the_file_load_into_the_base(run, device, data, tmp_path_factory):
    # Only save_load is needed: the model loaded from a file that carries a base tensor must compute exactly as the
    # same adapter loaded onto a base whose parameter already holds that value.
    case = run.draw(data, single_layer=False, extras=False)
    mine = run.adapted(case)
    plain = tmp_path_factory.mktemp("adapter_only")
    run.impl.save(mine.model, str(plain))
    base = mine.base()
    adapted = scope.targeted(base, case.config)
    outside = [name for name, _ in base.named_parameters() if name.rpartition(".")[0] not in adapted]
    assume(outside)  # every parameter adapted (the embedder with all three targets): nothing to put in the file
    name = data.draw(st.sampled_from(outside), label="base parameter")
    value = base.get_parameter(name).detach().cpu() + 1.0
    carrying = tmp_path_factory.mktemp("with_base_tensor")
    shutil.copy(plain / "adapter_config.json", carrying / "adapter_config.json")
    save_file({**load_file(plain / "adapter_model.safetensors"), harness.PREFIX + name: value},
              carrying / "adapter_model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        base.get_parameter(name).copy_(value)
    expected = mine.output(run.impl.load(base, str(plain)))
    assume(not torch.equal(expected, mine.output()))  # a parameter the output does not use (an unused head)
    run.equal(mine.output(_reload(run.impl, mine, carrying)), expected,
              f"output with {name} loaded from the adapter file, vs the same adapter on a base already holding it")
