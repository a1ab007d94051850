"""FWD: what an adapted layer and an adapted model compute."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness
from conformance.strategies import cases


@pytest.mark.req("LORA-FWD-006")
@pytest.mark.oracle
@given(data=st.data())
def test_output_matches_peft(impl, oracle, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, theirs = harness.adapted_pair(impl, oracle, case, device)
    checks.close(mine.output(), theirs.output(), "fp32", "LORA-FWD-006", "adapted output vs peft's")


@pytest.mark.req("LORA-FWD-001")
@given(data=st.data())
def test_linear_layer_formula(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear", "conv1d"}, extras=False))
    mine, _ = harness.adapted_pair(impl, None, case, device)
    A, B = harness.factors(mine.values)
    x = mine.inputs["x"]
    expected = mine.base().layer(x) + (x @ A.T.to(device)) @ B.T.to(device) * harness.scaling(case.config)
    checks.close(mine.output(), expected, "fp32", "LORA-FWD-001", "layer output vs base(x) + (x A^T) B^T * s")


@pytest.mark.req("LORA-FWD-002")
@pytest.mark.needs("rslora")
@given(data=st.data())
def test_rslora_scaling(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear", "conv1d"}, extras=False))
    case = harness.with_config(case, use_rslora=True)
    mine, _ = harness.adapted_pair(impl, None, case, device)
    A, B = harness.factors(mine.values)
    x = mine.inputs["x"]
    scaling = case.config["lora_alpha"] / case.config["r"] ** 0.5
    expected = mine.base().layer(x) + (x @ A.T.to(device)) @ B.T.to(device) * scaling
    checks.close(mine.output(), expected, "fp32", "LORA-FWD-002", "layer output with alpha / sqrt(r)")


@pytest.mark.req("LORA-FWD-003")
@pytest.mark.needs("embedding")
@given(data=st.data())
def test_embedding_layer_formula(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"embedding"}, extras=False))
    mine, _ = harness.adapted_pair(impl, None, case, device)
    mine.model.train()  # dropout, if drawn, must still not apply to embeddings
    A, B = harness.factors(mine.values)
    tokens = mine.inputs["x"]
    expected = mine.base().layer(tokens) + F.embedding(tokens, A.T.to(device)) @ B.T.to(device) * harness.scaling(
        case.config)
    checks.close(mine.output(), expected, "fp32", "LORA-FWD-003", "embedding output vs base(x) + A^T[x] B^T * s")


@pytest.mark.req("LORA-FWD-004")
@pytest.mark.needs("dropout")
@pytest.mark.oracle
@given(data=st.data(), p=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_train_mode_dropout_matches_peft(impl, oracle, device, data, p, seed):
    case = data.draw(cases(impl.capabilities, kinds={"linear", "conv1d", "conv2d"}, extras=False), label="case")
    mine, theirs = harness.adapted_pair(impl, oracle, harness.with_config(case, lora_dropout=p), device)
    eval_output = mine.output()
    outputs = []
    for adapted in (mine, theirs):
        adapted.model.train()
        torch.manual_seed(seed)
        outputs.append(adapted.output())
    checks.check(not torch.equal(outputs[0], eval_output), "LORA-FWD-004",
                 f"train-mode output with lora_dropout={p} equals the eval-mode output: dropout is not applied")
    checks.close(outputs[0], outputs[1], "fp32", "LORA-FWD-004", "train-mode output vs peft's, same seed")


@pytest.mark.req("LORA-FWD-005")
@pytest.mark.needs("linear")
@given(data=st.data())
def test_half_precision_base_keeps_its_dtype(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear"}, extras=False))
    mine, _ = harness.adapted_pair(impl, None, case, device, torch.bfloat16)
    A, B = (t.float().to(device) for t in harness.factors(mine.values))
    x = mine.inputs["x"]
    expected = (mine.base().layer(x).float() + (x.float() @ A.T) @ B.T * harness.scaling(case.config))
    checks.close(mine.output(), expected.to(torch.bfloat16), "bf16", "LORA-FWD-005", "bf16 layer output")


@pytest.mark.req("LORA-FWD-007")
@pytest.mark.needs("disable")
@given(data=st.data())
def test_disable_adapter_gives_base_output(impl, device, data):
    # bias != "none" trains the base biases themselves, so disabling cannot give the base output (peft warns)
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), bias=None)
    mine, _ = harness.adapted_pair(impl, None, case, device)
    adapted_output = mine.output()
    with impl.disable_adapter(mine.model):
        checks.close(mine.output(), mine.output(mine.base()), "fp32", "LORA-FWD-007", "output inside disable_adapter")
    checks.close(mine.output(), adapted_output, "fp32", "LORA-FWD-007", "output after disable_adapter")


@pytest.mark.req("LORA-FWD-008")
@pytest.mark.needs("dora")
@pytest.mark.oracle
@given(data=st.data())
def test_dora_output_matches_peft(impl, oracle, device, data):
    case = harness.with_config(data.draw(cases(impl.capabilities), label="case"), use_dora=True, lora_bias=False)
    mine, theirs = harness.adapted_pair(impl, oracle, case, device)
    checks.close(mine.output(), theirs.output(), "fp32", "LORA-FWD-008", "DoRA output vs peft's")
    mine.model.train(), theirs.model.train()
    outputs = []
    for adapted in (mine, theirs):
        torch.manual_seed(case.inputs_seed)
        outputs.append(adapted.output())
    checks.close(outputs[0], outputs[1], "fp32", "LORA-FWD-008", "DoRA train-mode output vs peft's, same seed")


@pytest.mark.req("LORA-FWD-008")
@pytest.mark.needs("dora", "linear")
@given(data=st.data())
def test_dora_linear_formula(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"linear"}, extras=False))
    mine, _ = harness.adapted_pair(impl, None, harness.with_config(case, use_dora=True), device)
    A, B, m = (mine.values[f"base_model.model.layer.{k}"].to(device)
               for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    base, x, s = mine.base().layer, mine.inputs["x"], harness.scaling(case.config)
    adapted_weight = base.weight + s * B @ A
    expected = (m / adapted_weight.norm(dim=1)) * (x @ adapted_weight.T) + base.bias
    checks.close(mine.output(), expected, "fp32", "LORA-FWD-008", "DoRA layer vs m/||W + sBA|| (W + sBA) x + b")


@pytest.mark.req("LORA-FWD-009")
@pytest.mark.needs("conv2d")
@given(data=st.data())
def test_conv_layer_formula(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=True, kinds={"conv2d"}, extras=False))
    mine, _ = harness.adapted_pair(impl, None, case, device)
    A, B = (t.to(device) for t in harness.factors(mine.values))
    base, x = mine.base().layer, mine.inputs["x"]
    lora = F.conv2d(F.conv2d(x, A, stride=base.stride, padding=base.padding), B)
    expected = base(x) + lora * harness.scaling(case.config)
    checks.close(mine.output(), expected, "fp32", "LORA-FWD-009", "conv output vs base(x) + B(A(x)) * s")
