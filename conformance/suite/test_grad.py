"""GRAD: gradients reach the adapter, the same as peft's, and nothing else."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness


def _backward(adapted: harness.Adapted, seed: int) -> None:
    output = adapted.output()
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.device)
    (output.float() * weights).sum().backward()


@pytest.mark.req("LORA-GRAD-001")
@given(data=st.data())
def test_gradients_match_peft(run, device, dtype, data):
    mine, theirs = run.pair(run.draw(data, config={"use_dora": None}))  # DoRA: LORA-GRAD-003
    for adapted in (mine, theirs):
        _backward(adapted, mine.case.inputs_seed)
    run.all_close(run.gradients(mine), run.gradients(theirs), "gradient of")


@pytest.mark.req("LORA-GRAD-002")
@given(data=st.data())
def test_base_parameters_get_no_gradient(run, device, data):
    mine = run.adapted(run.draw(data))
    _backward(mine, mine.case.inputs_seed)
    adapter = {id(t) for t in run.impl.adapter_state_dict(mine.model).values()}
    for name, param in mine.model.named_parameters():
        if id(param) not in adapter:
            run.check(not param.requires_grad and param.grad is None,
                      f"base parameter {name} requires_grad={param.requires_grad}, "
                      f"grad {'set' if param.grad is not None else 'None'}")


@pytest.mark.req("LORA-GRAD-003")
@given(data=st.data())
def test_dora_gradients_match_peft(run, device, data):
    mine, theirs = run.pair(run.draw(data, config={"use_dora": True, "lora_bias": None}))
    for adapted in (mine, theirs):
        _backward(adapted, mine.case.inputs_seed)
    grads = run.gradients(mine)
    magnitudes = [k for k in grads if k.endswith("lora_magnitude_vector")]
    run.check(bool(magnitudes), "no lora_magnitude_vector receives a gradient")
    run.all_close(grads, run.gradients(theirs), "DoRA gradient of")
