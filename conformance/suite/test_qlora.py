"""QLORA: LoRA on bitsandbytes' quantized layers. The bases are the zoo's llama loaded through BitsAndBytesConfig
(conformance/zoo/quantized.py: NF4, FP4 with double quantization, NF4 computing in bfloat16, int8). The expected values
come from formulas computed here with bitsandbytes' own functions (forward hooks on the quantized base; dequantize,
add, quantize again for a merge) and from peft on the same base; every comparison is exact."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conformance import api
from conformance.engine import harness, scope, strategies
from conformance.engine.harness import BASE_WEIGHT, PREFIX
from conformance.engine.run import NOT_APPLICABLE, NOT_RUN
from conformance.zoo import models, quantized
from reference_impl.peft_format import scaling
from reference_impl.quantized import parameter_count

QUANTIZED = tuple(name for name, zoo in sorted(models.ZOO.items()) if zoo.quantized)
QUANTIZED_KINDS = {models.BNB_4BIT, models.BNB_8BIT}


def _draw(run, data, among: tuple = QUANTIZED, **fixed) -> strategies.Case:
    """A LoRA config on a quantized zoo model (one of `among`): one to three quantized projections, sometimes the
    float lm_head too; rsLoRA and DoRA drawn unless `fixed` sets them."""
    if not quantized.available():
        pytest.skip(NOT_RUN + quantized.missing_reason())
    in_scope = [name for name in among if scope.targets_in_scope(run.impl, name, QUANTIZED_KINDS)]
    if not in_scope:
        pytest.skip(f"{NOT_APPLICABLE}no quantized zoo model is in {run.impl.name}'s scope")
    model = data.draw(st.sampled_from(in_scope), label="model")
    projections = scope.targets_in_scope(run.impl, model, QUANTIZED_KINDS)
    targets = data.draw(st.lists(st.sampled_from(projections), min_size=1, max_size=3, unique=True), label="targets")
    if "lm_head" in scope.targets_in_scope(run.impl, model, {models.LINEAR}) and data.draw(st.booleans(),
                                                                                           label="lm_head"):
        targets.append("lm_head")
    config = {"target_modules": targets, "r": data.draw(st.integers(1, 4), label="r"),
              "lora_alpha": data.draw(st.sampled_from([1, 2, 8, 16]), label="alpha"),
              "use_rslora": data.draw(st.booleans(), label="use_rslora"),
              "use_dora": data.draw(st.booleans(), label="use_dora"), **fixed}
    config = {key: value for key, value in config.items() if value is not None}
    seeds = [data.draw(strategies.seeds, label=label) for label in ("init_seed", "values_seed", "inputs_seed")]
    return run.admit(strategies.Case(model, config, data.draw(st.integers(0, 2), label="model_seed"), *seeds))


def _formula_output(run, adapted: harness.Adapted, values: dict, req: str, model=None) -> torch.Tensor:
    """The base model (a fresh quantized copy, or `model`) with a forward hook on each adapted layer adding
    (B(A(x.to(A.dtype))) * s).to(output dtype) on a quantized layer (QLORA-FWD-001), adding it in float32 and then
    casting on a float one (the lm_head: LORA-FWD-005), from the loaded values."""
    base = adapted.base() if model is None else model
    config, hooks, quantized_paths = adapted.case.config, [], set(_quantized_layers(base))
    s = scaling(config.get("lora_alpha", 8), config.get("r", 8), config.get("use_rslora", False))
    for path in sorted(run.adapted_paths(values, base)):
        A = run.tensor(values, f"{PREFIX}{path}.lora_A.weight", req)
        B = run.tensor(values, f"{PREFIX}{path}.lora_B.weight", req)

        def add_adapter(module, inputs, output, A=A, B=B, cast_first=path in quantized_paths):
            term = F.linear(F.linear(inputs[0].to(A.dtype), A), B) * s
            return output + term.to(output.dtype) if cast_first else (output + term).to(output.dtype)

        hooks.append(base.get_submodule(path).register_forward_hook(add_adapter))
    try:
        return adapted.output(base)
    finally:
        for hook in hooks:
            hook.remove()


def _own_base_output(run, adapted: harness.Adapted) -> torch.Tensor:
    """The implementation's output with every lora_B zero: its own base's, where it quantized the base itself."""
    values = adapted.values
    run.load(adapted, {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in values.items()})
    try:
        return adapted.output()
    finally:
        run.load(adapted, values)


def _outputs_equal(run, adapted: harness.Adapted, output: torch.Tensor, expected: torch.Tensor,
                   expected_base: torch.Tensor, what: str) -> None:
    """`output` (of `adapted`) equals `expected` (computed over bitsandbytes' base, whose output without an adapter
    is `expected_base`) exactly. A driver that quantizes the base with its own code (api.base_quantizer) computes
    over another base: then what the adapter adds is compared, within the `requantized` class, and the report says
    so."""
    own = api.base_quantizer(run.impl)
    if not own:
        run.equal(output, expected, what)
        return
    run.compared_as(f"the adapter's contribution (the output minus {run.impl.name}'s own base output, lora_B = 0) "
                    f"against the expected one over bitsandbytes' base: {run.impl.name} quantizes the base with {own}")
    run.close(output - _own_base_output(run, adapted), expected - expected_base,
              f"{what}: the adapter's contribution over each side's own base", tolerance="requantized")


def _gradients_equal(run, actual: dict, expected: dict, what: str) -> None:
    """Exact; within `requantized` for a driver computing over a base it quantized itself (see _outputs_equal)."""
    own = api.base_quantizer(run.impl)
    if own:
        run.compared_as(f"gradients over {run.impl.name}'s own base (quantized with {own}) against those over "
                        "bitsandbytes' base, within the class requantized")
    run.all_close(actual, expected, what, tolerance="requantized" if own else "exact")


def _trained(values: dict) -> dict:
    """The adapter's own tensors: not the frozen lm_head weight saved beside an adapter on it (LORA-KEYS-010)."""
    return {key: value for key, value in values.items() if not key.endswith(BASE_WEIGHT)}


def _merged_outputs_equal(run, case, mine: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Exact when only quantized layers were merged (their weights are compared exactly too); a merged float layer
    (the lm_head) is within the `merge` class of peft's, as LORA-MERGE-001 allows (one fused addmm against peft's
    add: 3e-8 apart in float32 logits, measured)."""
    if "lm_head" in case.config["target_modules"]:
        run.close(mine, theirs, f"{what} vs peft's", tolerance="merge")
    else:
        run.equal(mine, theirs, f"{what} vs peft's")


def _quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if scope.layer_kind(module) in QUANTIZED_KINDS}


@pytest.mark.req("QLORA-FWD-001")
@given(data=st.data())
def test_output_is_the_formula_on_the_quantized_base(run, device, dtype, data):
    mine = run.adapted(_draw(run, data, use_dora=False))
    base_output = mine.output(mine.base())
    _outputs_equal(run, mine, mine.output(), _formula_output(run, mine, mine.values, "QLORA-FWD-001"), base_output,
                   "output vs the quantized base with the adapter's term added by hooks")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(mine.case)
        _outputs_equal(run, mine, mine.output(), theirs.output(), base_output, "output vs peft's")


@pytest.mark.req("QLORA-DORA-001")
@given(data=st.data())
def test_dora_on_the_quantized_base_matches_peft(run, device, dtype, data):
    case = _draw(run, data, use_dora=True)
    wrapped = run.wrap(case)
    base = wrapped.base()
    magnitudes = {key: value for key, value in run.peft_state(wrapped.model).items()
                  if key.endswith("lora_magnitude_vector")}
    for path in sorted(run.adapted_paths(magnitudes, base)):  # B starts at zero: m = ||dequant(W)|| per row
        layer = base.get_submodule(path)
        weight = quantized.dense(layer) if path in _quantized_layers(base) else layer.weight
        run.close(magnitudes[f"{PREFIX}{path}.lora_magnitude_vector"].detach().cpu(),
                  weight.float().norm(dim=1).cpu(), f"{path}: initial magnitude vs the dequantized weight's row norms")
    mine, theirs = run.pair(case)
    run.equal(mine.output(), theirs.output(), "DoRA output vs peft's")


@pytest.mark.req("QLORA-GRAD-001")
@given(data=st.data())
def test_gradients_are_the_formulas_and_peft_s(run, device, dtype, data):
    mine = run.adapted(_draw(run, data, use_dora=False))
    mine.output().float().square().sum().backward()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in _trained(mine.values).items()}
    _formula_output(run, mine, leaves, "QLORA-GRAD-001").float().square().sum().backward()
    _gradients_equal(run, run.gradients(mine), {k: v.grad.cpu() for k, v in leaves.items()},
                     "adapter gradients vs autograd through the formula")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(mine.case)
        for adapted in (mine, theirs):
            adapted.output().float().square().sum().backward()
        _gradients_equal(run, run.gradients(mine), run.gradients(theirs), "adapter gradients vs peft's")


@pytest.mark.req("QLORA-PARAM-001")
@given(data=st.data())
def test_counts_count_packed_weights_twice_per_byte(run, device, dtype, data):
    case = _draw(run, data)
    mine = run.wrap(case)
    trainable = sum(t.numel() for t in _trained(run.peft_state(mine.model)).values())
    total = sum(parameter_count(p) for p in mine.base().parameters()) + trainable  # peft's rule (SPEC)
    found = tuple(run.impl.trainable_parameters(mine.model))
    run.check(found == (trainable, total), f"(trainable, total) {found}, expected ({trainable}, {total}): packed "
                                           "4-bit weights count 2 per byte")
    unquantized = sum(p.numel() for p in models.ZOO[case.model].build().parameters())
    run.check(found[1] - found[0] == unquantized, f"{found[1] - found[0]} base parameters counted, the model "
                                                  f"before quantization has {unquantized}")  # the rule's purpose
    if run.oracle_driver is not None:
        theirs = tuple(run.oracle.trainable_parameters(run.wrap(case, run.oracle).model))
        run.check(found == theirs, f"(trainable, total) {found}, peft {theirs}")


@pytest.mark.req("QLORA-INIT-001")
@given(data=st.data())
def test_initial_adapter_is_float32_as_peft_creates_it(run, device, dtype, data):
    case = _draw(run, data, init_lora_weights=data.draw(st.sampled_from([None, "gaussian"]), label="init"))
    mine = run.peft_state(run.wrap(case).model)
    for key, tensor in sorted(_trained(mine).items()):
        run.check(tensor.dtype == torch.float32, f"{key} is {tensor.dtype}, expected float32")
    theirs = run.oracle.adapter_state_dict(run.wrap(case, run.oracle).model)
    run.same_keys(mine, theirs, "initial adapter keys vs peft's")
    for key in sorted(theirs):
        run.equal(mine[key].detach().cpu(), theirs[key].detach().cpu(), f"initial {key} vs peft's for the same seed")


@pytest.mark.req("QLORA-SER-001")
@given(data=st.data())
def test_saved_adapter_is_peft_s_and_reloads(run, device, dtype, data, tmp_path_factory):
    mine, theirs = run.pair(_draw(run, data))
    folders = {name: tmp_path_factory.mktemp(f"qlora-{name}") for name in ("mine", "theirs")}
    run.impl.save(mine.model, str(folders["mine"]))
    run.oracle.save(theirs.model, str(folders["theirs"]))
    files = {name: folder / "adapter_model.safetensors" for name, folder in folders.items()}
    run.check(files["mine"].is_file(), f"save wrote no {files['mine'].name}")
    saved = {name: load_file(path) for name, path in files.items()}
    run.all_close(saved["mine"], saved["theirs"], "saved tensors vs peft's", tolerance="exact")
    for key, tensor in sorted(_trained(saved["mine"]).items()):
        run.check(tensor.dtype == torch.float32, f"{key} saved as {tensor.dtype}, expected float32")
    expected = mine.output()
    run.equal(mine.output(run.impl.load(mine.base(), str(folders["mine"]))), expected, "reloaded output")
    _outputs_equal(run, mine, expected, mine.output(run.oracle.load(mine.base(), str(folders["mine"]))),
                   mine.output(mine.base()), "output vs the same file loaded by peft")


@pytest.mark.req("QLORA-FWD-002")
@given(data=st.data())
def test_disabled_adapter_computes_the_quantized_base(run, device, dtype, data):
    _check_disabled(run, _draw(run, data))


@pytest.mark.req("QLORA-FWD-002")
@pytest.mark.parametrize("model", QUANTIZED)
@settings(max_examples=2)
@given(data=st.data())
def test_disabled_dora_computes_the_quantized_base_on_every_scheme(run, device, dtype, model, data):
    """DoRA on each quantized base, fixed rather than drawn: a failure one scheme alone has (peft's DoRA on an 8-bit
    layer) must not hinge on whether the profile's draws reach it."""
    _check_disabled(run, _draw(run, data, among=(model,), use_dora=True))


def _check_disabled(run, case) -> None:
    mine = run.adapted(case)
    mine.output()
    with run.impl.disable_adapter(mine.model):
        disabled = mine.output()
    if api.base_quantizer(run.impl):  # its own base: what the model computes with every lora_B zero
        run.compared_as(f"against {run.impl.name}'s own base output (lora_B = 0): it quantizes the base itself")
        run.equal(disabled, _own_base_output(run, mine), "output inside disable_adapter vs the model's own base's")
    else:
        run.equal(disabled, mine.output(mine.base()), "output inside disable_adapter vs the quantized base's")


@pytest.mark.req("QLORA-MERGE-001")
@given(data=st.data())
def test_merge_requantizes_the_sum_as_peft_does(run, device, dtype, data):
    case = _draw(run, data)
    mine = run.adapted(case)
    base, values = mine.base(), mine.values
    merged = run.impl.merge_and_unload(mine.model)
    layers, expected_layers = _quantized_layers(merged), _quantized_layers(base)
    run.check(set(layers) == set(expected_layers) and all(type(layers[n]) is type(expected_layers[n]) for n in layers),
              f"quantized layers after merge_and_unload: {sorted(layers)[:4]}, expected {sorted(expected_layers)[:4]}")
    if not case.config["use_dora"]:  # LoRA: dequant(W) + s B A, quantized again with the layer's settings
        s = scaling(case.config["lora_alpha"], case.config["r"], case.config["use_rslora"])
        for path in sorted(run.adapted_paths(values, base) & set(layers)):
            A, B = (run.tensor(values, f"{PREFIX}{path}.lora_{x}.weight", "QLORA-MERGE-001") for x in "AB")
            layer = expected_layers[path]
            expected = quantized.quantized_and_back(layer, quantized.dense(layer) + B @ A * s)
            run.equal(quantized.dense(layers[path]), expected, f"{path}: merged weight vs quantize(dequant(W) + sBA)")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(case)
        mine_merged, theirs_merged = run.impl.merge_and_unload(mine.model), run.oracle.merge_and_unload(theirs.model)
        for path, layer in sorted(_quantized_layers(theirs_merged).items()):
            run.equal(quantized.dense(_quantized_layers(mine_merged)[path]), quantized.dense(layer),
                      f"{path}: merged weight vs peft's")
        _merged_outputs_equal(run, case, mine.output(mine_merged), theirs.output(theirs_merged), "merged output")


@pytest.mark.req("QLORA-MERGE-002")
@given(data=st.data())
def test_unmerge_requantizes_as_peft_does(run, device, dtype, data):
    case = _draw(run, data)
    mine, theirs = run.pair(case)
    for adapted, driver in ((mine, run.impl), (theirs, run.oracle)):
        driver.merge(adapted.model)
        driver.unmerge(adapted.model)
    theirs_layers, mine_layers = _quantized_layers(theirs.model), _quantized_layers(mine.model)
    for path in sorted(theirs_layers):
        mine_layer = mine_layers.get(path) or mine_layers.get(f"{path}.base_layer")
        run.check(mine_layer is not None, f"no quantized layer at {path} after unmerge")
        run.equal(quantized.dense(mine_layer), quantized.dense(theirs_layers[path]),
                  f"{path}: weight after merge and unmerge vs peft's")
    _merged_outputs_equal(run, case, mine.output(), theirs.output(), "output after merge and unmerge")


@pytest.mark.req("QLORA-UNLOAD-001")
@given(data=st.data())
def test_unload_gives_back_the_quantized_base(run, device, dtype, data):
    mine = run.adapted(_draw(run, data))
    mine.output()
    unloaded, base = run.impl.unload(mine.model), mine.base()
    run.all_close(unloaded.state_dict(), base.state_dict(), "unloaded (quantized weights and their state)",
                  tolerance="exact")
    for (name, module), (_, original) in zip(unloaded.named_modules(), base.named_modules()):
        run.check(type(module) is type(original),
                  f"{name or 'the model'} is a {type(module).__name__} after unload, was {type(original).__name__}")
    run.equal(mine.output(unloaded), mine.output(base), "unloaded output vs the quantized base's")


@pytest.mark.req("QLORA-MULTI-001")
@given(data=st.data())
def test_second_adapter_on_the_quantized_base(run, device, dtype, data):
    case = _draw(run, data, use_dora=False)
    other = {**case.config, "r": data.draw(st.integers(1, 4), label="other r")}
    run.within_scope(case, "other")
    mine = run.adapted(case)
    values = run.add_second_adapter(mine, other)
    run.impl.set_adapter(mine.model, "other")
    other_case = mine.case._replace(config=other)
    expected = _formula_output(run, harness.Adapted(mine.driver, mine.model, other_case, mine.device, mine.dtype),
                               values, "QLORA-MULTI-001")
    run.equal(mine.output(), expected, "output with the second adapter active vs the formula")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(case)
        run.add_second_adapter(theirs, other, values)
        run.add_second_adapter(mine, other, values)
        run.impl.set_adapter(mine.model, "other")
        run.oracle.set_adapter(theirs.model, "other")
        run.equal(mine.output(), theirs.output(), "output with the second adapter active vs peft's")


@pytest.mark.req("QLORA-PREP-001")
@given(data=st.data())
def test_training_on_a_prepared_base_gives_the_formula_s_gradients(run, device, dtype, data):
    prepared = tuple(name for name in QUANTIZED if quantized.SCHEMES[models.ZOO[name].quantized].get("prepared"))
    mine = run.adapted(_draw(run, data, among=prepared, use_dora=False))
    mine.model.train()  # gradient checkpointing acts in train mode only
    output = mine.output()
    run.check(output.requires_grad, "the output of the adapted model in train mode does not require grad")
    output.float().square().sum().backward()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in _trained(mine.values).items()}
    _formula_output(run, mine, leaves, "QLORA-PREP-001").float().square().sum().backward()  # eval: no checkpointing
    _gradients_equal(run, run.gradients(mine), {k: v.grad.cpu() for k, v in leaves.items()},
                     "adapter gradients in train mode (checkpointed) vs autograd through the formula")
    if run.oracle_driver is not None:
        mine, theirs = run.pair(mine.case)
        for adapted in (mine, theirs):
            adapted.model.train()
            adapted.output().float().square().sum().backward()
        _gradients_equal(run, run.gradients(mine), run.gradients(theirs), "adapter gradients in train mode vs peft's")
