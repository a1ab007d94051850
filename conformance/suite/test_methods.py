"""IA3, LoHa and LoKr: the questions asked of LoRA (does it compute, train, count, save and unload as peft does?),
one test per question and a parameter per method, each claiming that method's requirement. Expected outputs and
gradients come from the method's formula on the values loaded (conformance/zoo/methods.py); peft's are compared too
when it is installed."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from conformance.engine import harness, scope, strategies
from conformance.zoo import methods
from conformance.engine.harness import BASE_WEIGHT


# The requirement a missing key fails: the one stating the method's keys.
KEYS_REQ = {"IA3": "IA3-INIT-001", "LOHA": "LOHA-INIT-001", "LOKR": "LOKR-KEYS-001"}


def _draw(run, data, method: str, model=None, **fixed) -> strategies.Case:
    model = model or data.draw(st.sampled_from(methods.ZOO_MODELS[method]), label="model")
    config = {**data.draw(methods.configs(method, model, run.impl), label="config"), **fixed}
    seeds = [data.draw(strategies.seeds, label=label) for label in ("init_seed", "values_seed", "inputs_seed")]
    return run.admit(strategies.Case(model, config, 0, *seeds))


def _expected_output(run, adapted: harness.Adapted, values=None) -> torch.Tensor:
    values = adapted.values if values is None else values
    req = KEYS_REQ[adapted.case.config["peft_type"]]
    return methods.formula_output(adapted.case, values, lambda key: run.tensor(values, key, req), run.device,
                                  run.dtype)


def _trained(values: dict) -> dict:
    """The adapter's own tensors (not the frozen base weights saved beside it)."""
    return {k: v for k, v in values.items() if not k.endswith(BASE_WEIGHT)}


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-FWD-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-FWD-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-FWD-001"), id="LOKR")])
@given(data=st.data())
def test_output_is_the_formula(run, device, method, data):
    mine = run.adapted(_draw(run, data, method))
    run.close(mine.output(), _expected_output(run, mine), "output vs the base model with the formula's weights")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(mine.case)
        run.close(mine.output(), theirs.output(), "output vs peft's")


@pytest.mark.req("LOHA-FWD-002")
@given(data=st.data())
def test_loha_cp_output_is_the_formula(run, device, data):
    mine = run.adapted(_draw(run, data, "LOHA", "convnet", use_effective_conv2d=True, target_modules=["conv1"]))
    run.close(mine.output(), _expected_output(run, mine), "output vs the CP formula's weights")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(mine.case)
        run.close(mine.output(), theirs.output(), "output vs peft's")


@pytest.mark.parametrize("method", [pytest.param("LOHA", marks=pytest.mark.req("LOHA-FWD-003"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-FWD-002"), id="LOKR")])
@given(data=st.data())
def test_dropouts_in_train_mode_are_peft_s(run, device, method, data):
    dropouts = {"rank_dropout": data.draw(st.sampled_from([0.0, 0.3, 0.6]), label="rank_dropout"),
                "module_dropout": data.draw(st.sampled_from([0.0, 0.3]), label="module_dropout")}
    mine, theirs = run.pair(_draw(run, data, method, **dropouts))
    seed = data.draw(strategies.seeds, label="dropout seed")
    outputs = []
    for adapted in (mine, theirs):
        adapted.model.train()
        torch.manual_seed(seed)
        outputs.append(adapted.output())
    run.close(outputs[0], outputs[1], f"train-mode output under torch seed {seed} vs peft's")


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-GRAD-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-GRAD-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-GRAD-001"), id="LOKR")])
@given(data=st.data())
def test_gradients_are_the_formulas(run, device, method, data):
    _gradients_are_the_formula_s(run, _draw(run, data, method))


# Fixed cases every run asks again. On a Llama, the formula's gradients and the implementation's are the same sums in
# another order over the whole loss and differ by up to 1.8e-4 in gradients of 16 (9x the fp32 class; class `grad`
# scales with the largest gradient): profile thorough found them. On a 3x3 conv, LoHa's CP decomposition, where
# peft's own backward is wrong (LOHA-GRAD-001), whatever the draws of the run.
PINNED_GRADIENT_CASES = [
    pytest.param("llama", {"peft_type": "LOHA", "target_modules": ["down_proj", "gate_proj", "lm_head"], "r": 1,
                           "alpha": 8, "init_weights": False}, marks=pytest.mark.req("LOHA-GRAD-001"), id="LOHA-llama"),
    pytest.param("llama", {"peft_type": "LOKR", "target_modules": ["lm_head", "down_proj"], "r": 1, "alpha": 4,
                           "init_weights": False}, marks=pytest.mark.req("LOKR-GRAD-001"), id="LOKR-llama"),
    pytest.param("convnet", {"peft_type": "LOHA", "target_modules": ["conv1"], "r": 2, "alpha": 4,
                             "use_effective_conv2d": True, "init_weights": False},
                 marks=pytest.mark.req("LOHA-GRAD-001"), id="LOHA-cp-conv"),
]


@pytest.mark.parametrize("model, config", PINNED_GRADIENT_CASES)
def test_gradients_are_the_formulas_on_fixed_cases(run, device, model, config):
    _gradients_are_the_formula_s(run, run.fixed(model, config))


def _gradients_are_the_formula_s(run, case: strategies.Case) -> None:
    mine = run.adapted(case)
    mine.output().square().sum().backward()
    leaves = {k: v.detach().to(run.device).clone().requires_grad_(k in _trained(mine.values))
              for k, v in mine.values.items()}
    _expected_output(run, mine, leaves).square().sum().backward()
    expected = {k: torch.zeros_like(v) if v.grad is None else v.grad.cpu() for k, v in leaves.items()
                if v.requires_grad}
    run.all_close(run.gradients(mine), expected, "adapter gradients vs autograd through the formula",
                  tolerance="grad")


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-INIT-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-INIT-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-INIT-001"), id="LOKR")])
@given(data=st.data())
def test_initial_adapter_computes_as_the_base(run, device, method, data):
    default_init = {"IA3": {}, "LOHA": {"init_weights": True},
                    "LOKR": {"init_weights": data.draw(st.sampled_from([True, "lycoris"]), label="init")}}[method]
    case = _draw(run, data, method, **default_init)
    wrapped = run.wrap(case)
    run.equal(wrapped.output(), wrapped.output(wrapped.base()), "initial output vs the base model's")
    if run.oracle_driver is None:
        return
    mine, theirs = run.initial_state(case), run.initial_state(case, run.oracle)
    run.same_keys(mine, theirs, "initial adapter keys vs peft's")
    for key in sorted(theirs):
        run.check(tuple(mine[key].shape) == tuple(theirs[key].shape),
                  f"{key}: shape {tuple(mine[key].shape)}, peft's {tuple(theirs[key].shape)}")
        if "init_rng" in run.impl.capabilities:
            run.equal(mine[key], theirs[key], f"initial {key} vs peft's for the same torch seed")


@pytest.mark.req("LOKR-KEYS-001")
@given(data=st.data())
def test_lokr_factor_shapes_match_peft(run, device, data):
    case = _draw(run, data, "LOKR")
    mine = run.initial_state(case)
    if run.oracle_driver is None:  # without peft, the shapes must at least compose to the base weight
        expected = run.adapted(case)
        run.close(expected.output(), _expected_output(run, expected), "output from the factors' Kronecker product",
                  tolerance="fp32")  # a formula: the same sums in another order (1.5e-7 apart)
        return
    theirs = run.initial_state(case, run.oracle)
    run.same_keys(mine, theirs, "LoKr keys vs peft's")
    for key in sorted(theirs):
        run.check(tuple(mine[key].shape) == tuple(theirs[key].shape),
                  f"{key}: shape {tuple(mine[key].shape)}, peft's {tuple(theirs[key].shape)}")


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-MERGE-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-MERGE-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-MERGE-001"), id="LOKR")])
@given(data=st.data())
def test_merge_unmerge_and_unload(run, device, method, data):
    mine = run.adapted(_draw(run, data, method))
    unmerged = mine.output()
    run.impl.merge(mine.model)
    run.close(mine.output(), unmerged, "output merged vs unmerged")
    run.impl.unmerge(mine.model)
    run.close(mine.output(), unmerged, "output after unmerge vs before merging")
    merged = run.impl.merge_and_unload(mine.model)
    base = mine.base()
    for path in scope.targeted(base, mine.case.config):
        kind = type(merged.get_submodule(path))
        run.check(kind is type(base.get_submodule(path)), f"{path} is a {kind.__name__} after merge_and_unload")
    run.close(mine.output(merged), unmerged, "output after merge_and_unload vs unmerged")
    again = run.adapted(mine.case)
    run.close(again.output(run.impl.unload(again.model)), again.output(again.base()),
              "output after unload vs the base model's", tolerance="exact")


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-PARAM-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-PARAM-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-PARAM-001"), id="LOKR")])
@given(data=st.data())
def test_trainable_parameter_counts(run, device, method, data):
    case = _draw(run, data, method)
    wrapped = run.wrap(case)
    adapter = sum(t.numel() for t in _trained(run.peft_state(wrapped.model)).values())
    base = sum(p.numel() for p in wrapped.base().parameters())
    found = tuple(run.impl.trainable_parameters(wrapped.model))
    run.check(found == (adapter, base + adapter), f"(trainable, all) = {found}, expected ({adapter}, "
                                                  f"{base + adapter}): the adapter's tensors over the base model's")
    if run.oracle_driver is not None:
        theirs = tuple(run.oracle.trainable_parameters(run.wrap(case, run.oracle).model))
        run.check(found == theirs, f"(trainable, all) = {found}, peft counts {theirs}")


def _files(run, req: str, folder) -> tuple[dict, dict]:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        run.require((folder / name).is_file(), req, f"save wrote no {name}")
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-SER-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-SER-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-SER-001"), id="LOKR")])
@given(data=st.data())
def test_save_and_load(run, device, method, data, tmp_path_factory):
    mine = run.adapted(_draw(run, data, method))
    folder = tmp_path_factory.mktemp("saved")
    run.impl.save(mine.model, str(folder))
    config, tensors = _files(run, f"{method}-SER-001", folder)
    run.check(config.get("peft_type") == method, f"adapter_config.json peft_type {config.get('peft_type')!r}")
    live = {k: v.detach().cpu() for k, v in run.peft_state(mine.model).items()}
    run.all_close(tensors, live, "saved tensors vs the live adapter")
    loaded = run.impl.load(mine.base(), str(folder))
    run.equal(mine.output(loaded), mine.output(), "output of the loaded adapter vs the saved one")
    if run.oracle_driver is None:
        return
    theirs_folder = tmp_path_factory.mktemp("peft")
    run.oracle.save(run.wrap(mine.case, run.oracle).model, str(theirs_folder))
    theirs_config, _ = _files(run, f"{method}-SER-001", theirs_folder)
    run.same_keys(config, theirs_config, "adapter_config.json keys vs peft's")
    try:
        in_peft = run.oracle.load(mine.base(), str(folder))
    except (RuntimeError, ValueError) as error:  # a size mismatch: the files do not fit peft's layout
        run.fail(f"peft cannot load the saved files: {str(error)[:400]}")
    run.close(mine.output(in_peft), mine.output(), "output of the files loaded in peft", tolerance="fp32")
