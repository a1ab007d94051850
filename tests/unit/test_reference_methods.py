"""reference_impl against peft for IA3, LoHa and LoKr (issue #17): the same draw wrapped by both, the same values
loaded; initial values, the RNG afterwards, outputs, gradients, files, counts, parameter order, merge, unmerge,
disable and unload compared bit for bit."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import reference_impl as ref
from conformance.drivers.peft_shaped import CONFIG_CLASSES
from conformance.zoo import models

peft = pytest.importorskip("peft")

CASES = {
    "ia3-mlp": ("mlp", {"peft_type": "IA3", "target_modules": ["fc", "proj", "head"], "feedforward_modules": ["proj"]}),
    "ia3-convnet": ("convnet", {"peft_type": "IA3", "target_modules": ["conv1", "conv2", "head"],
                                "feedforward_modules": ["conv2"]}),
    "ia3-gpt2": ("gpt2-tiny", {"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj", "c_fc"],
                               "feedforward_modules": ["mlp.c_proj"]}),
    "ia3-llama-init-false": ("llama", {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                       "feedforward_modules": ["down_proj"], "init_ia3_weights": False}),
    "loha-mlp": ("mlp", {"peft_type": "LOHA", "target_modules": ["fc", "proj", "head"], "r": 3, "alpha": 5}),
    "loha-convnet": ("convnet", {"peft_type": "LOHA", "target_modules": ["conv1", "conv2", "head"], "r": 2,
                                 "init_weights": False}),
    "lokr-mlp": ("mlp", {"peft_type": "LOKR", "target_modules": ["fc", "proj", "head"], "r": 3, "alpha": 5}),
    "lokr-convnet-cp-lycoris": ("convnet", {"peft_type": "LOKR", "target_modules": ["conv1", "conv2", "head"], "r": 1,
                                            "use_effective_conv2d": True, "init_weights": "lycoris"}),
    "lokr-convnet-factor": ("convnet", {"peft_type": "LOKR", "target_modules": ["conv1", "conv2", "head"], "r": 1,
                                        "decompose_both": True, "decompose_factor": 2}),
    "lokr-llama-random": ("llama", {"peft_type": "LOKR", "target_modules": ["q_proj", "down_proj"], "r": 2,
                                    "decompose_both": True, "init_weights": False}),
}
# LoHa with use_effective_conv2d: peft's hand-written backward is wrong for hada_w1_a / hada_w2_a (LOHA-GRAD-001).
CP_CASE = ("convnet", {"peft_type": "LOHA", "target_modules": ["conv1", "conv2", "head"], "r": 2,
                       "use_effective_conv2d": True})


def _wrapped(lib, model: str, config: dict):
    """The model wrapped under seed 1, then loaded with the initial values plus noise; and the RNG's next draw."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = lib.get_peft_model(models.build(model), getattr(lib, CONFIG_CLASSES[config["peft_type"]])(**config))
    initial = {k: v.detach().clone() for k, v in lib.get_peft_model_state_dict(wrapped).items()}
    next_draw = torch.rand(1)
    generator = torch.Generator().manual_seed(0)
    lib.set_peft_model_state_dict(wrapped, {k: v + 0.1 * torch.randn(v.shape, generator=generator)
                                            for k, v in sorted(initial.items())})
    return wrapped.eval(), initial, next_draw


def _outputs_and_gradients(wrapped, model: str):
    inputs = models.inputs(model, 3)
    output = models.output_tensor(wrapped(**inputs))
    output.square().sum().backward()
    return output.detach(), {k: p.grad for k, p in wrapped.named_parameters() if p.grad is not None}


@pytest.mark.req("IA3-FWD-001", "IA3-INIT-001", "LOHA-FWD-001", "LOHA-INIT-001", "LOKR-FWD-001", "LOKR-INIT-001",
                 "LOKR-KEYS-001")
@pytest.mark.parametrize("name", CASES)
def test_same_draw_same_everything(name, tmp_path):
    model, config = CASES[name]
    (mine, my_initial, my_draw), (theirs, their_initial, their_draw) = (_wrapped(lib, model, config)
                                                                        for lib in (ref, peft))
    assert list(my_initial) == list(their_initial)
    assert all(torch.equal(my_initial[k], their_initial[k]) for k in their_initial)
    assert torch.equal(my_draw, their_draw)  # the same RNG draws while wrapping
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    (my_output, my_grads), (their_output, their_grads) = (_outputs_and_gradients(m, model) for m in (mine, theirs))
    assert torch.equal(my_output, their_output)
    assert my_grads.keys() == their_grads.keys() and all(torch.equal(my_grads[k], their_grads[k]) for k in my_grads)
    for wrapped, folder in ((mine, tmp_path / "mine"), (theirs, tmp_path / "theirs")):
        wrapped.save_pretrained(folder)
    folders = (tmp_path / "mine", tmp_path / "theirs")
    my_files, their_files = (load_file(f / "adapter_model.safetensors") for f in folders)
    assert my_files.keys() == their_files.keys() and all(torch.equal(my_files[k], their_files[k]) for k in my_files)
    my_config, their_config = (json.loads((f / "adapter_config.json").read_text()) for f in folders)
    for value in (their_config.get("target_modules"), their_config.get("feedforward_modules")):
        if isinstance(value, list):
            value.sort()  # peft writes a set in its iteration order
    assert {k: v for k, v in my_config.items() if k != "peft_version"} == \
        {k: v for k, v in their_config.items() if k != "peft_version"}
    inputs = models.inputs(model, 4)
    with torch.no_grad():
        for step in ("merge", "unmerge", "disable", "unload"):
            found, expected = (_after(step, wrapped, inputs) for wrapped in (mine, theirs))
            assert torch.equal(found, expected), step


def _after(step: str, wrapped, inputs) -> torch.Tensor:
    if step == "merge":
        wrapped.merge_adapter()
    elif step == "unmerge":
        wrapped.unmerge_adapter()
    elif step == "disable":
        with wrapped.disable_adapter():
            return models.output_tensor(wrapped(**inputs))
    else:
        return models.output_tensor(wrapped.merge_and_unload()(**inputs))
    return models.output_tensor(wrapped(**inputs))


@pytest.mark.req("LOHA-GRAD-001", "LOHA-FWD-002")
def test_loha_cp_gradients_are_autograd_s_and_peft_s_are_not():
    """Same output as peft; gradients of the CP factors from autograd, checked against finite differences in
    float64; peft's w1_a / w2_a gradients fail that check (its HadaWeightCP.backward), the rest agree."""
    model, config = CP_CASE
    (mine, _, _), (theirs, _, _) = (_wrapped(lib, model, config) for lib in (ref, peft))
    (my_output, my_grads), (their_output, their_grads) = (_outputs_and_gradients(m, model) for m in (mine, theirs))
    assert torch.equal(my_output, their_output)
    wrong = {k for k in my_grads if not torch.allclose(my_grads[k], their_grads[k], rtol=1e-5, atol=1e-7)}
    assert wrong and all(k.endswith(("hada_w1_a.default", "hada_w2_a.default")) for k in wrong), wrong
    layer = copy.deepcopy(mine.base_model.model.conv1).double()
    names = [n for n, _ in layer.named_parameters() if ".default" in n and "base_layer" not in n]
    factors = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    x = torch.randn(1, 3, 5, 5, dtype=torch.double)
    output = lambda *tensors: torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))  # noqa: E731
    assert torch.autograd.gradcheck(output, factors)
