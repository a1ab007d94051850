"""DEV: the same adapter on CUDA computes what it computes on the CPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness


@pytest.mark.req("LORA-DEV-001")
@given(data=st.data())
def test_cuda_output_matches_cpu(run, data, peft_devices):
    cuda = next((d for d in peft_devices if d.startswith("cuda")), None)
    if cuda is None:
        pytest.skip("not run: no CUDA device in --peft-device (torch sees none)")
    case = run.draw(data)
    on_cpu = run.adapted(case)
    on_gpu = harness.wrap(run.impl, case, cuda, torch.float32)
    run.load(on_gpu, on_cpu.values)
    run.close(on_gpu.output().cpu(), on_cpu.output(), f"output on {cuda} vs cpu")
