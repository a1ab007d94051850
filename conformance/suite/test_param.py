"""PARAM: what trains, and the parameter counts peft reports."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.zoo import models
from conformance.zoo.transformers_zoo import FULL_SIZE, full_size


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
@given(data=st.data())
def test_counts_match_peft(run, device, data):
    case = run.draw(data)
    theirs = run.oracle.trainable_parameters(run.wrap(case, run.oracle).model)
    mine = run.impl.trainable_parameters(run.wrap(case).model)
    run.check(tuple(mine) == tuple(theirs), f"(trainable, total) {mine}, peft {theirs}")


@pytest.mark.req("LORA-PARAM-002")
@given(data=st.data())
def test_counts_follow_the_formula(run, device, data):
    case = run.draw(data, extras=False)
    mine = run.wrap(case)
    base = models.build(case.model)
    adapted = run.adapted_paths(run.peft_keys(mine), base)
    expected = sum(_adapter_size(base, path, case.config["r"]) for path in adapted)
    found = tuple(run.impl.trainable_parameters(mine.model))
    run.check(found == (expected, _count(base) + expected),
              f"(trainable, total) {found}, expected ({expected}, {_count(base)} + {expected}) for {len(adapted)} "
              "adapted layers")


GPT2_TABLE = [(["c_attn"], 4), (["c_attn"], 8), (["c_attn"], 64), (["c_attn", "c_proj"], 8), (["c_fc"], 16)]


def _full_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


@pytest.mark.req("LORA-PARAM-003")
@pytest.mark.parametrize("targets, r", GPT2_TABLE)
def test_full_size_gpt2_counts(run, targets, r):
    model = _full_gpt2()
    run.fixed("gpt2-small-meta", {"target_modules": targets, "r": r}, base=model)
    base_total = _count(model)
    run.require(base_total == 124_439_808, "LORA-PARAM-003", f"GPT-2 small has {base_total:,} parameters here")
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in targets)]
    expected = sum(_adapter_size(model, n, r) for n in names)
    found = tuple(run.impl.trainable_parameters(run.impl.wrap(model, {"target_modules": targets, "r": r})))
    run.check(found == (expected, base_total + expected), f"targets {targets}, r={r}: (trainable, total) {found}, "
                                                          f"expected ({expected:,}, {base_total + expected:,})")


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FULL_SIZE_TABLE = [(name, targets, r) for name in FULL_SIZE for targets, r in
                   [(["q_proj", "v_proj"], 8), (ATTENTION, 16), ("all-linear", 16),
                    (ATTENTION + ["gate_proj", "up_proj", "down_proj"], 64)]]


def _full_size_case(run, name: str, targets, r: int):
    model = full_size(name)
    run.fixed("llama", {"target_modules": targets, "r": r}, base=model)  # scope: Llama-family linear layers
    return model, {"target_modules": targets, "r": r}


@pytest.mark.req("LORA-PARAM-005")
@pytest.mark.parametrize("name, targets, r", FULL_SIZE_TABLE)
def test_full_size_llama_family_counts(run, name, targets, r):
    model, config = _full_size_case(run, name, targets, r)
    base_total, published = _count(model), FULL_SIZE[name][2]
    run.require(base_total == published, "LORA-PARAM-005", f"{name} has {base_total:,} parameters here, "
                                                           f"{published:,} published")
    # all-linear: every Linear but the output layer (lm_head); a list: modules whose last name is listed.
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
             and (targets == "all-linear" or n.rpartition(".")[2] in targets)]
    expected = sum(_adapter_size(model, n, r) for n in names)
    found = tuple(run.impl.trainable_parameters(run.impl.wrap(model, config)))
    run.check(found == (expected, base_total + expected),
              f"{name}, targets {targets}, r={r}: (trainable, total) {found}, expected ({expected:,}, "
              f"{base_total + expected:,})")


@pytest.mark.req("LORA-PARAM-001")
@pytest.mark.parametrize("name, targets, r", FULL_SIZE_TABLE[:4])
def test_full_size_llama_family_counts_match_peft(run, name, targets, r):
    _, config = _full_size_case(run, name, targets, r)
    theirs = run.oracle.trainable_parameters(run.oracle.wrap(full_size(name), dict(config)))
    mine = run.impl.trainable_parameters(run.impl.wrap(full_size(name), dict(config)))
    run.check(tuple(mine) == tuple(theirs), f"{name}, targets {targets}, r={r}: (trainable, total) {mine}, "
                                            f"peft {theirs}")


@pytest.mark.req("LORA-PARAM-004")
@given(data=st.data(), bias=st.sampled_from(["lora_only", "all"]))
def test_bias_modes_train_biases(run, device, data, bias):
    case = run.draw(data, extras=False, config={"bias": bias})
    mine = run.wrap(case)
    base = models.build(case.model)
    adapted = run.adapted_paths(run.peft_keys(mine), base)
    lora = sum(_adapter_size(base, path, case.config["r"]) for path in adapted)
    biases = {n[:-5]: p.numel() for n, p in base.named_parameters() if n.endswith(".bias")}
    extra = sum(n for path, n in biases.items() if bias == "all" or path in adapted)
    found = run.impl.trainable_parameters(mine.model)[0]
    run.check(found == lora + extra, f"bias={bias!r}: {found} trainable, expected {lora} (LoRA) + {extra} (biases)")
