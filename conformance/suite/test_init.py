"""INIT: the adapter tensors right after wrapping: shapes, values, device and dtype, and no copies."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness
from conformance.zoo import models
from reference_impl.peft_format import is_conv1d

PREFIX = harness.PREFIX


def _expected_shapes(layer: torch.nn.Module, r: int) -> dict[str, tuple]:
    """LORA-INIT-001 by layer type; GPT-2's Conv1D stores its weight (in, out)."""
    if isinstance(layer, torch.nn.Embedding):
        return {"lora_embedding_A": (r, layer.num_embeddings), "lora_embedding_B": (layer.embedding_dim, r)}
    if isinstance(layer, torch.nn.Conv2d):
        ones = (1,) * (layer.weight.dim() - 2)
        return {"lora_A.weight": (r, layer.in_channels, *layer.kernel_size),
                "lora_B.weight": (layer.out_channels, r // layer.groups, *ones)}
    in_features, out_features = (layer.weight.shape if is_conv1d(layer)
                                 else (layer.in_features, layer.out_features))
    return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}


@pytest.mark.req("LORA-INIT-001")
@given(data=st.data())
def test_factor_shapes(run, device, data):
    case = run.draw(data, extras=False)
    state, base = run.initial_state(case), models.build(case.model)
    for path in sorted(run.adapted_paths(state, base)):
        shapes = {k.removeprefix(f"{PREFIX}{path}."): tuple(v.shape) for k, v in state.items()
                  if k.startswith(f"{PREFIX}{path}.lora_")}
        expected = _expected_shapes(base.get_submodule(path), case.config["r"])
        run.check(shapes == expected, f"{path}: adapter shapes {shapes}, expected {expected}")


@pytest.mark.req("LORA-INIT-002")
@given(data=st.data())
def test_fresh_adapter_is_a_no_op(run, device, dtype, data):
    inits = [True, "gaussian"] if "init_variants" in run.impl.capabilities else [True]
    init = data.draw(st.sampled_from(inits), label="init")
    mine = run.wrap(run.draw(data, extras=False, config={"init_lora_weights": init}))
    with torch.no_grad():  # one grad mode for both: with trainable adapters torch's attention may take another
        adapted, base = mine.output(), mine.output(mine.base())  # kernel (T5: 9.5e-7 apart, peft's adapters too)
    run.equal(adapted, base, "output of a fresh adapter vs the base")


@pytest.mark.req("LORA-INIT-003")
@given(data=st.data())
def test_initial_values_match_peft_for_the_same_seed(run, device, data):
    case = run.draw(data)
    theirs = run.initial_state(case, run.oracle)
    mine = run.initial_state(case)
    run.require(set(mine) == set(theirs), "LORA-KEYS-001", f"adapter keys differ from peft's: "
                                                           f"{sorted(set(mine) ^ set(theirs))[:6]}")
    for key in sorted(theirs):
        if not key.endswith("lora_magnitude_vector"):  # a norm, computed: LORA-INIT-008 compares it
            run.equal(mine[key].detach(), theirs[key].detach(), f"initial {key}")


@pytest.mark.req("LORA-INIT-005")
@given(data=st.data())
def test_init_false_keeps_constructor_values(run, device, data):
    mine = run.wrap(run.draw(data, extras=False, config={"init_lora_weights": False}))
    for key, tensor in run.peft_state(mine.model).items():
        run.check(bool(tensor.detach().abs().sum() > 0), f"{key} is all zeros")
    run.check(not torch.equal(mine.output(), mine.output(mine.base())),
              "with init_lora_weights=False the output equals the base output")


@pytest.mark.req("LORA-INIT-006")
@given(data=st.data(), half=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_adapters_on_base_device_in_float32(run, device, data, half):
    mine = run.wrap(run.draw(data), dtype=half)
    for key, tensor in run.impl.adapter_state_dict(mine.model).items():
        run.check(tensor.device.type == torch.device(device).type,
                  f"{key} is on {tensor.device}, the base model on {device}")
        if ".lora_" in key and tensor.is_floating_point():
            run.check(tensor.dtype == torch.float32, f"{key} is {tensor.dtype} on a {half} base; peft upcasts "
                                                     "adapters to float32")


@pytest.mark.req("LORA-INIT-007")
@given(data=st.data())
def test_injection_is_in_place(run, device, data):
    mine = run.wrap(run.draw(data))
    wrapped = {id(p) for p in mine.model.parameters()}  # the originals are alive in original_params: ids unique
    copied = [name for name, p in mine.original_params.items() if id(p) not in wrapped]
    run.check(not copied, f"base parameters replaced by copies: {copied[:5]}")


def _weight_out_in(layer: torch.nn.Module) -> torch.Tensor:
    """The base weight with one row per output feature: (out, in, ...)."""
    return layer.weight if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) else layer.weight.T


@pytest.mark.req("LORA-INIT-008")
@given(data=st.data())
def test_dora_magnitude_starts_at_the_weight_norm(run, device, data):
    case = run.draw(data, single_layer=True, extras=False, config={"use_dora": True, "init_lora_weights": True})
    mine = run.wrap(case)
    magnitude = run.tensor(run.peft_state(mine.model), f"{PREFIX}{mine.path}.lora_magnitude_vector",
                           "LORA-KEYS-005").detach()
    expected = _weight_out_in(mine.base_layer()).flatten(1).norm(dim=1)  # one norm per output feature
    run.check(math.prod(magnitude.shape) == expected.numel(), f"magnitude has {math.prod(magnitude.shape)} "
                                                              f"elements, the layer {expected.numel()} outputs")
    run.close(magnitude.flatten(), expected, "initial DoRA magnitude vs ||W||_row")


@pytest.mark.req("LORA-INIT-009")
@given(data=st.data())
def test_dora_magnitude_starts_at_the_initial_adapted_weight(run, device, data):
    case = run.draw(data, single_layer=True, kinds={"linear", "conv1d"}, extras=False,
                    config={"use_dora": True, "init_lora_weights": False})
    mine = run.wrap(case)
    state = run.peft_state(mine.model)
    A, B = run.factors(state, mine.path)
    layer = mine.base_layer()
    adapted = _weight_out_in(layer) + harness.scaling(case.config) * B @ A  # (out, in)
    magnitude = run.tensor(state, f"{PREFIX}{mine.path}.lora_magnitude_vector", "LORA-KEYS-005").detach()
    run.close(magnitude.flatten(), adapted.norm(dim=1), "initial DoRA magnitude vs ||W + s B A||_row")
    x = mine.inputs["x"]
    run.close(mine.output(), x @ adapted.T + layer.bias, "fresh DoRA output vs (W + s B A) x + b")
