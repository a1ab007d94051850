"""PARAM: what trains, and the parameter counts peft reports."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


def _adapter_size(base: torch.nn.Module, path: str, r: int) -> int:
    """r * (in + out) for Linear-like layers; r * in * kernel + out * r / groups for conv (LORA-PARAM-002)."""
    layer = base.get_submodule(path)
    if isinstance(layer, torch.nn.Conv2d):
        return r * layer.in_channels * math.prod(layer.kernel_size) + layer.out_channels * r // layer.groups
    if isinstance(layer, torch.nn.Embedding):
        return r * (layer.num_embeddings + layer.embedding_dim)
    return r * sum(layer.weight.shape)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.req("LORA-PARAM-001")
@pytest.mark.oracle
@given(data=st.data())
def test_counts_match_peft(impl, oracle, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = impl.trainable_parameters(harness.wrap(impl, case, device, torch.float32).model)
    theirs = oracle.trainable_parameters(harness.wrap(oracle, case, device, torch.float32).model)
    checks.check(tuple(mine) == tuple(theirs), "LORA-PARAM-001", f"(trainable, total) {mine}, peft {theirs}")


@pytest.mark.req("LORA-PARAM-002")
@given(data=st.data())
def test_counts_follow_the_formula(impl, device, data):
    case = data.draw(cases(impl.capabilities, extras=False), label="case")
    mine = harness.wrap(impl, case, device, torch.float32)
    base = mine.base()
    adapted = harness.adapted_modules(impl.adapter_state_dict(mine.model))
    expected = sum(_adapter_size(base, path, case.config["r"]) for path in adapted)
    found = tuple(impl.trainable_parameters(mine.model))
    checks.check(found == (expected, _count(base) + expected), "LORA-PARAM-002",
                 f"(trainable, total) {found}, expected ({expected}, {_count(base)} + {expected}) for "
                 f"{len(adapted)} adapted layers")


GPT2_TABLE = [(["c_attn"], 4), (["c_attn"], 8), (["c_attn"], 64), (["c_attn", "c_proj"], 8), (["c_fc"], 16)]


@pytest.mark.req("LORA-PARAM-003")
@pytest.mark.needs("conv1d")
@pytest.mark.parametrize("targets, r", GPT2_TABLE)
def test_full_size_gpt2_counts(impl, targets, r):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    base_total = _count(model)
    checks.check(base_total == 124_439_808, "LORA-PARAM-003", f"GPT-2 small has {base_total:,} parameters here")
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in targets)]
    expected = sum(_adapter_size(model, n, r) for n in names)
    found = tuple(impl.trainable_parameters(impl.wrap(model, {"target_modules": targets, "r": r})))
    checks.check(found == (expected, base_total + expected), "LORA-PARAM-003",
                 f"targets {targets}, r={r}: (trainable, total) {found}, expected ({expected:,}, "
                 f"{base_total + expected:,})")


@pytest.mark.req("LORA-PARAM-004")
@pytest.mark.needs("bias")
@given(data=st.data(), bias=st.sampled_from(["lora_only", "all"]))
def test_bias_modes_train_biases(impl, device, data, bias):
    case = harness.with_config(data.draw(cases(impl.capabilities, extras=False), label="case"), bias=bias)
    mine = harness.wrap(impl, case, device, torch.float32)
    base = mine.base()
    adapted = harness.adapted_modules(impl.adapter_state_dict(mine.model))
    lora = sum(_adapter_size(base, path, case.config["r"]) for path in adapted)
    biases = {n[:-5]: p.numel() for n, p in base.named_parameters() if n.endswith(".bias")}
    extra = sum(n for path, n in biases.items() if bias == "all" or path in adapted)
    found = impl.trainable_parameters(mine.model)[0]
    checks.check(found == lora + extra, "LORA-PARAM-004",
                 f"bias={bias!r}: {found} trainable, expected {lora} (LoRA) + {extra} (biases)")
