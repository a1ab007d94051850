"""IA3, LoHa and LoKr for the suite: which zoo models and layer kinds each method covers, how a case's config is
drawn, and each method's formula (SPEC.md) turning loaded adapter values into the weights the model computes with.

The formulas take peft-keyed values and give new base weights, so the expected output of an adapted model is the
base model run with them (torch.func.functional_call), and autograd through it gives the expected gradients.
"""

import re

import torch
from hypothesis import strategies as st
from torch import nn

from reference_impl.peft_format import PREFIX, is_conv1d

from ..engine import scope
from . import models
from .models import CONV1D, CONV2D, LINEAR

METHODS = ("IA3", "LOHA", "LOKR")
# GPT-2's Conv1D is IA3's only; LoHa and LoKr refuse it (LOHA-MATCH-001), and none of the three takes embeddings.
KINDS = {"IA3": {LINEAR, CONV1D, CONV2D}, "LOHA": {LINEAR, CONV2D}, "LOKR": {LINEAR, CONV2D}}
ZOO_MODELS = {"IA3": ("mlp", "convnet", "gpt2-tiny", "llama"), "LOHA": ("mlp", "convnet", "llama"),
              "LOKR": ("mlp", "convnet", "llama")}
KEY_PREFIX = {"IA3": "ia3_", "LOHA": "hada_", "LOKR": "lokr_"}


@st.composite
def configs(draw, method: str, model: str, driver) -> dict:
    """A config of `method` for zoo model `model`, its targets inside the driver's scope."""
    names = scope.targets_in_scope(driver, model, KINDS[method], method)
    targets = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="targets")
    config = {"peft_type": method, "target_modules": targets}
    if method == "IA3":
        config["feedforward_modules"] = draw(st.lists(st.sampled_from(targets), unique=True), label="feedforward")
        return config
    config.update(r=draw(st.integers(1, 4), label="r"), alpha=draw(st.sampled_from([1, 2, 4, 8, 0.5]), label="alpha"),
                  use_effective_conv2d=draw(st.booleans(), label="use_effective_conv2d"),
                  rank_dropout=draw(st.sampled_from([0.0, 0.1]), label="rank_dropout"),
                  module_dropout=draw(st.sampled_from([0.0, 0.2]), label="module_dropout"))
    if method == "LOHA":
        config["init_weights"] = draw(st.booleans(), label="init_weights")
    else:
        config.update(init_weights=draw(st.sampled_from([True, False, "lycoris"]), label="init_weights"),
                      decompose_both=draw(st.booleans(), label="decompose_both"),
                      decompose_factor=draw(st.sampled_from([-1, 2, 4]), label="decompose_factor"),
                      rank_dropout_scale=draw(st.booleans(), label="rank_dropout_scale"))
    return config


def adapted_paths(values: dict, method: str) -> set[str]:
    """The module paths peft-keyed `values` hold an adapter for."""
    paths = set()
    for key in values:
        path, _, tensor = key.removeprefix(PREFIX).rpartition(".")
        if tensor.startswith(KEY_PREFIX[method]):
            paths.add(path)
    return paths


def is_feedforward(path: str, config: dict) -> bool:
    """IA3-MATCH-001: a regex matches the whole name; a list entry is a plain string suffix."""
    wanted = config.get("feedforward_modules") or []
    if isinstance(wanted, str):
        return re.fullmatch(wanted, path) is not None
    return any(path.endswith(name) for name in wanted)


def new_parameters(base: nn.Module, config: dict, values: dict, tensor) -> dict[str, torch.Tensor]:
    """The targeted modules' weights (and IA3's output-side biases) as the method's formula makes them from
    `values`; `tensor(key)` fetches a value (failing the keys requirement when missing)."""
    method = config["peft_type"]
    out = {}
    for path in sorted(scope.targeted(base, config)):
        module = base.get_submodule(path)
        if method == "IA3":
            l = tensor(f"{PREFIX}{path}.ia3_l").flatten()
            feedforward = is_feedforward(path, config)
            out[f"{path}.weight"] = _ia3_weight(module, l, feedforward)
            if not feedforward and module.bias is not None:
                out[f"{path}.bias"] = module.bias * l
            continue
        delta = (_loha_delta if method == "LOHA" else _lokr_delta)(path, values, tensor)
        out[f"{path}.weight"] = module.weight + delta.reshape(module.weight.shape) * config.get("alpha", 8) \
            / config.get("r", 8)
    return out


def _ia3_weight(module: nn.Module, l: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """W scaled by l along its output dimension (or input, feedforward): W (x * l) = (W diag(l)) x and
    (W x + b) * l = (diag(l) W) x + b * l."""
    weight = module.weight
    if isinstance(module, nn.Linear) or is_conv1d(module):
        out_first = weight.T if is_conv1d(module) else weight
        scaled = out_first * (l[None, :] if feedforward else l[:, None])
        return scaled.T if is_conv1d(module) else scaled
    shape = [1] * weight.dim()
    shape[1 if feedforward else 0] = -1
    return weight * l.reshape(shape)


def _cp(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rebuild[p, q, k, l] = sum_ij core[i, j, k, l] a[i, p] b[j, q] (LOHA-FWD-002)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def _loha_delta(path: str, values: dict, tensor) -> torch.Tensor:
    """(w1_a w1_b) * (w2_a w2_b), or the product of the two CP rebuilds (LOHA-FWD-001, -002); unscaled."""
    key = f"{PREFIX}{path}.hada_"
    w = {name: tensor(key + name) for name in ("w1_a", "w1_b", "w2_a", "w2_b")}
    if key + "t1" in values:
        return _cp(tensor(key + "t1"), w["w1_a"], w["w1_b"]) * _cp(tensor(key + "t2"), w["w2_a"], w["w2_b"])
    return (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"])


def _lokr_delta(path: str, values: dict, tensor) -> torch.Tensor:
    """kron(w1, w2) (LOKR-FWD-001); unscaled."""
    key = f"{PREFIX}{path}.lokr_"
    w1 = tensor(key + "w1") if key + "w1" in values else tensor(key + "w1_a") @ tensor(key + "w1_b")
    if key + "w2" in values:
        w2 = tensor(key + "w2")
    elif key + "t2" in values:
        w2 = _cp(tensor(key + "t2"), tensor(key + "w2_a"), tensor(key + "w2_b"))
    else:
        w2 = tensor(key + "w2_a") @ tensor(key + "w2_b")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def formula_output(case, values: dict, tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The case's output computed by the base model with the formula's weights: what an adapted model must give."""
    base = models.build(case.model, case.model_seed, device, dtype)
    replaced = new_parameters(base, case.config, values, tensor)
    inputs = models.inputs(case.model, case.inputs_seed, device, dtype)
    return models.ZOO[case.model].output(torch.func.functional_call(base, replaced, args=(), kwargs=inputs))
