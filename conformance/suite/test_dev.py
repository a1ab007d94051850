"""DEV: the same adapter on CUDA computes what it computes on the CPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


@pytest.mark.req("LORA-DEV-001")
@pytest.mark.needs("cuda")
@given(data=st.data())
def test_cuda_output_matches_cpu(impl, data, peft_devices):
    cuda = next((d for d in peft_devices if d.startswith("cuda")), None)
    if cuda is None:
        pytest.skip("not run: no CUDA device in --peft-device (torch sees none)")
    case = data.draw(cases(impl.capabilities), label="case")
    on_cpu, _ = harness.adapted_pair(impl, None, case, "cpu")
    on_gpu = harness.wrap(impl, case, cuda, torch.float32)
    harness.load_values(on_gpu, on_cpu.values)
    checks.close(on_gpu.output().cpu(), on_cpu.output(), "xdevice", "LORA-DEV-001", f"output on {cuda} vs cpu")
