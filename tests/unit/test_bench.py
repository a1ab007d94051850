"""The benchmark's own pieces: its hand-written LoRA computes what peft does, and its FLOP formula is sane."""

import copy

import pytest
import torch

pytest.importorskip("peft")

from bench.run import BareLoRA, bare_model, lora_flop_ratio  # noqa: E402
from conformance.engine import harness
from conformance.zoo import models


def test_bare_math_computes_the_adapted_output():
    import peft

    base = models.build("gpt2-tiny")
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16,
                                                                     target_modules=["c_attn", "c_proj"])).eval()
    values = harness.adapter_values(peft.get_peft_model_state_dict(model), seed=1)
    peft.set_peft_model_state_dict(model, values)
    inputs = models.inputs("gpt2-tiny", 0)
    for fused in (False, True):
        bare = bare_model(base, values, r=4, fused=fused)
        assert sum(isinstance(m, BareLoRA) for m in bare.modules()) == 6
        torch.testing.assert_close(bare(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_lora_flop_ratio_of_gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        base = GPT2LMHeadModel(GPT2Config())
    small, large = lora_flop_ratio(base, 8, 128, 128), lora_flop_ratio(base, 64, 128, 128)
    assert 1.003 < small < 1.02 and small < large < 1.15
