"""GRAD: gradients reach the adapter, the same as peft's, and nothing else."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


def _backward(adapted: harness.Adapted, seed: int) -> None:
    output = adapted.output()
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.device)
    (output.float() * weights).sum().backward()


def _gradients(adapted: harness.Adapted) -> dict[str, torch.Tensor]:
    grads = {}
    for key, tensor in adapted.driver.adapter_state_dict(adapted.model).items():
        if tensor.is_floating_point() and tensor.requires_grad:
            checks.check(tensor.grad is not None, "LORA-KEYS-007",
                         f"{key} has no .grad after backward: adapter_state_dict must return live tensors")
            grads[key] = tensor.grad.detach().cpu()
    return grads


@pytest.mark.req("LORA-GRAD-001")
@pytest.mark.needs("autograd")
@pytest.mark.oracle
@given(data=st.data())
def test_gradients_match_peft(impl, oracle, device, data):
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), use_dora=None)  # GRAD-003
    mine, theirs = harness.adapted_pair(impl, oracle, case, device)
    for adapted in (mine, theirs):
        _backward(adapted, case.inputs_seed)
    checks.all_close(_gradients(mine), _gradients(theirs), "fp32",
                     "LORA-GRAD-001", "gradient of")


@pytest.mark.req("LORA-GRAD-002")
@pytest.mark.needs("autograd")
@given(data=st.data())
def test_base_parameters_get_no_gradient(impl, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    _backward(mine, case.inputs_seed)
    adapter = {id(t) for t in impl.adapter_state_dict(mine.model).values()}
    for name, param in mine.model.named_parameters():
        if id(param) not in adapter:
            checks.check(not param.requires_grad and param.grad is None, "LORA-GRAD-002",
                         f"base parameter {name} requires_grad={param.requires_grad}, "
                         f"grad {'set' if param.grad is not None else 'None'}")


@pytest.mark.req("LORA-GRAD-003")
@pytest.mark.needs("dora", "autograd")
@pytest.mark.oracle
@given(data=st.data())
def test_dora_gradients_match_peft(impl, oracle, device, data):
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), use_dora=True, lora_bias=None)
    mine, theirs = harness.adapted_pair(impl, oracle, case, device)
    for adapted in (mine, theirs):
        _backward(adapted, case.inputs_seed)
    grads = _gradients(mine)
    magnitudes = [k for k in grads if k.endswith("lora_magnitude_vector")]
    checks.check(bool(magnitudes), "LORA-GRAD-003", "no lora_magnitude_vector receives a gradient")
    checks.all_close(grads, _gradients(theirs), "dora", "LORA-GRAD-003", "DoRA gradient of")
