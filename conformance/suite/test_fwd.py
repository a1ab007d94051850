"""FWD: what an adapted layer and an adapted model compute."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conformance.engine import harness

LINEAR_KINDS = {"linear", "conv1d"}


@pytest.mark.req("LORA-FWD-006")
@given(data=st.data())
def test_output_matches_peft(run, device, dtype, data):
    mine, theirs = run.pair(run.draw(data))
    run.close(mine.output(), theirs.output(), "adapted output vs peft's")


@pytest.mark.req("LORA-FWD-001")
@given(data=st.data())
def test_linear_layer_formula(run, device, data):
    mine = run.adapted(run.draw(data, single_layer=True, kinds=LINEAR_KINDS, extras=False))
    A, B = run.factors(mine.values, mine.path)
    x = mine.inputs["x"]
    expected = mine.base_layer()(x) + (x @ A.T) @ B.T * harness.scaling(mine.case.config)
    run.close(mine.output(), expected, "layer output vs base(x) + (x A^T) B^T * s")


@pytest.mark.req("LORA-FWD-002")
@given(data=st.data())
def test_rslora_scaling(run, device, data):
    case = run.draw(data, single_layer=True, kinds=LINEAR_KINDS, extras=False, config={"use_rslora": True})
    mine = run.adapted(case)
    A, B = run.factors(mine.values, mine.path)
    x = mine.inputs["x"]
    expected = mine.base_layer()(x) + (x @ A.T) @ B.T * (case.config["lora_alpha"] / case.config["r"] ** 0.5)
    run.close(mine.output(), expected, "layer output with alpha / sqrt(r)")


@pytest.mark.req("LORA-FWD-003")
@given(data=st.data())
def test_embedding_layer_formula(run, device, data):
    mine = run.adapted(run.draw(data, single_layer=True, kinds={"embedding"}, extras=False))
    mine.model.train()  # dropout, if drawn, must still not apply to embeddings
    A, B = run.factors(mine.values, mine.path)
    tokens = mine.inputs["x"]
    expected = mine.base_layer()(tokens) + F.embedding(tokens, A.T) @ B.T * harness.scaling(mine.case.config)
    run.close(mine.output(), expected, "embedding output vs base(x) + A^T[x] B^T * s")


@pytest.mark.req("LORA-FWD-004")
@given(data=st.data(), p=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_train_mode_dropout_matches_peft(run, device, data, p, seed):
    case = run.draw(data, kinds={"linear", "conv1d", "conv2d"}, extras=False, config={"lora_dropout": p})
    mine, theirs = run.pair(case)
    eval_output = mine.output()
    outputs = []
    for adapted in (mine, theirs):
        adapted.model.train()
        torch.manual_seed(seed)
        outputs.append(adapted.output())
    run.check(not torch.equal(outputs[0], eval_output),
              f"train-mode output with lora_dropout={p} equals the eval-mode output: dropout is not applied")
    run.close(outputs[0], outputs[1], "train-mode output vs peft's, same seed")


@pytest.mark.req("LORA-FWD-005")
@given(data=st.data())
def test_half_precision_base_keeps_its_dtype(run, device, data):
    mine = run.adapted(run.draw(data, single_layer=True, kinds={"linear"}, extras=False), torch.bfloat16)
    A, B = (t.float() for t in run.factors(mine.values, mine.path))
    x = mine.inputs["x"]
    expected = (mine.base_layer()(x).float() + (x.float() @ A.T) @ B.T * harness.scaling(mine.case.config))
    run.close(mine.output(), expected.to(torch.bfloat16), "bf16 layer output")


@pytest.mark.req("LORA-FWD-007")
@given(data=st.data())
def test_disable_adapter_gives_base_output(run, device, dtype, data):
    # bias != "none" trains the base biases themselves, so disabling cannot give the base output (peft warns)
    mine = run.adapted(run.draw(data, config={"bias": None}))
    adapted_output = mine.output()
    with run.impl.disable_adapter(mine.model):
        run.close(mine.output(), mine.output(mine.base()), "output inside disable_adapter")
    run.close(mine.output(), adapted_output, "output after disable_adapter")


@pytest.mark.req("LORA-FWD-010")
@given(data=st.data())
def test_disable_adapter_on_a_merged_model_gives_base_output(run, device, data):
    mine = run.adapted(run.draw(data, config={"bias": None}))
    run.impl.merge(mine.model)
    with run.impl.disable_adapter(mine.model):
        run.close(mine.output(), mine.output(mine.base()), "output of the merged model inside disable_adapter")


@pytest.mark.req("LORA-FWD-008")
@given(data=st.data())
def test_dora_output_matches_peft(run, device, data):
    mine, theirs = run.pair(run.draw(data, config={"use_dora": True, "lora_bias": None}))
    run.close(mine.output(), theirs.output(), "DoRA output vs peft's")
    mine.model.train(), theirs.model.train()
    outputs = []
    for adapted in (mine, theirs):
        torch.manual_seed(mine.case.inputs_seed)
        outputs.append(adapted.output())
    run.close(outputs[0], outputs[1], "DoRA train-mode output vs peft's, same seed")


@pytest.mark.req("LORA-FWD-008")
@given(data=st.data())
def test_dora_linear_formula(run, device, data):
    mine = run.adapted(run.draw(data, single_layer=True, kinds={"linear"}, extras=False, config={"use_dora": True}))
    A, B = run.factors(mine.values, mine.path)
    m = run.tensor(mine.values, f"{harness.PREFIX}{mine.path}.lora_magnitude_vector", "LORA-KEYS-005")
    base, x, s = mine.base_layer(), mine.inputs["x"], harness.scaling(mine.case.config)
    adapted_weight = base.weight + s * B @ A
    expected = (m / adapted_weight.norm(dim=1)) * (x @ adapted_weight.T) + base.bias
    run.close(mine.output(), expected, "DoRA layer vs m/||W + sBA|| (W + sBA) x + b")


@pytest.mark.req("LORA-FWD-008")
def test_dora_on_a_grouped_conv_matches_peft(run, device):
    # peft reads B (out, r / groups, 1, 1) as (-1, r) for DoRA's norm; an implementation that takes the grouped
    # conv's own delta, or refuses the layer, departs from it.
    mine, theirs = run.pair(run.fixed("grouped-conv2d", {"target_modules": ["layer"], "r": 4, "use_dora": True}))
    run.close(mine.output(), theirs.output(), "DoRA on Conv2d(groups=2) vs peft's")


@pytest.mark.req("LORA-FWD-009")
@given(data=st.data())
def test_conv_layer_formula(run, device, data):
    mine = run.adapted(run.draw(data, single_layer=True, kinds={"conv2d"}, extras=False))
    A, B = run.factors(mine.values, mine.path)
    base, x = mine.base_layer(), mine.inputs["x"]
    lora = F.conv2d(F.conv2d(x, A, stride=base.stride, padding=base.padding), B)
    run.close(mine.output(), base(x) + lora * harness.scaling(mine.case.config), "conv output vs base(x) + B(A(x)) * s")
