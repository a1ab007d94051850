"""GOLD: the recorded peft fixtures. Any driver loads what peft wrote, computes what peft computed, and writes
it back the same; and the fixtures themselves are intact. Runs without peft installed.

A case applies when its config, on the fixtures' base model, is in the driver's scope (conformance/engine/scope.py): the
capabilities its features and layers need, and the driver's own `supports`."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conformance import golden
from conformance.engine import harness, scope
from conformance.engine.run import NOT_APPLICABLE, NOT_RUN
from conformance.zoo import models
from reference_impl.peft_format import TASK_HEADS, adapter_directory

ALL_CASES = golden.cases()
CASES = [case for case in ALL_CASES if case.manifest["config"].get("peft_type", "LORA") == "LORA"]
IDS = [case.id for case in CASES]
# IA3, LoHa and LoKr cases (v4 on): one test each, claiming the method's GOLD requirement.
GOLD = {"IA3": pytest.mark.req("IA3-GOLD-001"), "LOHA": pytest.mark.req("LOHA-GOLD-001"),
        "LOKR": pytest.mark.req("LOKR-GOLD-001")}
METHOD_CASES = [pytest.param(case, marks=GOLD[case.manifest["config"]["peft_type"]], id=case.id)
                for case in ALL_CASES if case not in CASES]


def _in_scope(run, case: golden.Case) -> None:
    """"not applicable" when the case is outside the driver's scope: its config's features first, then the layers
    it adapts on the stored base. A base that cannot be built here is the fixtures' problem, never the driver's."""
    missing = sorted(scope.features(case.manifest["config"], case.adapter_name) - set(run.impl.capabilities))
    if missing:
        pytest.skip(f"{NOT_APPLICABLE}{run.impl.name} does not declare {', '.join(missing)}")
    try:
        base = case.base_model()
    except Exception as error:  # a model class this transformers builds otherwise, bitsandbytes not installed
        pytest.skip(f"{NOT_RUN}case {case.id}: its stored base model cannot be built here (transformers "
                    f"{transformers.__version__}): {error}")
    run.fixed(case.id, case.manifest["config"], case.adapter_name, base=base)


def _loaded(run, case: golden.Case):
    """The case's adapter loaded by the driver into the stored base, on the test's device: a CUDA run checks the
    CPU-recorded fixtures under the same `golden` class (calibrated on a GPU: docs/gpu/)."""
    model = run.impl.load(case.base_model().to(run.device), str(case.adapter_dir()), case.adapter_name)
    model.eval()
    return model


def _output(model, case: golden.Case) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {name: tensor.to(device) for name, tensor in case.inputs().items()}
    return models.output_tensor(model(**inputs)).cpu()


@pytest.mark.req("LORA-GOLD-001")
@pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])
def test_fixture_files_match_the_lock(run, case):
    locked = golden.read_lock()
    for path in golden.fixture_files(case.path):
        name = str(path.relative_to(golden.root()))
        run.check(locked.get(name) == golden.sha256(path),
                  f"case {case.id}: {name} does not match {golden.LOCK_NAME} (tampered or regenerated in place)")


@pytest.mark.req("LORA-GOLD-002")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loaded_tensors_are_peft_s(run, device, case):
    _in_scope(run, case)
    live = run.peft_state(_loaded(run, case), case.adapter_name)
    stored = case.tensors()
    run.same_keys(live, stored, f"case {case.id}: adapter keys after loading")
    for key in sorted(stored):
        run.equal(live[key].detach().cpu(), stored[key], f"case {case.id}: {key}")


@pytest.mark.req("LORA-GOLD-003")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_are_peft_s(run, device, case):
    _in_scope(run, case)
    run.close(_output(_loaded(run, case), case), case.expected()["unmerged"], f"case {case.id}: logits")


@pytest.mark.req("LORA-GOLD-004")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_outputs_are_peft_s(run, device, case):
    _in_scope(run, case)
    model = _loaded(run, case)
    run.impl.merge(model)
    run.close(_output(model, case), case.expected()["merged"], f"case {case.id}: merged logits")


@pytest.mark.req("LORA-GOLD-005")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disabled_outputs_are_peft_s(run, device, case):
    _in_scope(run, case)
    model = _loaded(run, case)
    with run.impl.disable_adapter(model):
        run.close(_output(model, case), case.expected()["disabled"], f"case {case.id}: logits with the adapter "
                                                                     "disabled")


@pytest.mark.req("LORA-GOLD-006")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_saving_again_writes_peft_s_files(run, device, case, tmp_path):
    _in_scope(run, case)
    run.impl.save(_loaded(run, case), str(tmp_path), case.adapter_name)
    written = adapter_directory(tmp_path, case.adapter_name)
    run.require((written / "adapter_model.safetensors").is_file(), "LORA-SER-004" if case.adapter_name != "default"
                else "LORA-SER-001", f"no adapter_model.safetensors in {written}")
    run.all_close(load_file(written / "adapter_model.safetensors"), case.tensors(), f"case {case.id}: re-saved")
    mine, stored = json.loads((written / "adapter_config.json").read_text()), case.config()
    if stored.get("task_type") in TASK_HEADS:  # loading appends the task's heads once more (LORA-TASK-003)
        stored["modules_to_save"] = stored["modules_to_save"] + TASK_HEADS[stored["task_type"]]
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "modules_to_save", "fan_in_fan_out", "peft_type", "target_parameters",
                "trainable_token_indices"):
        run.check(mine.get(key) == stored.get(key), f"case {case.id}: re-saved adapter_config.json "
                                                    f"{key}={mine.get(key)!r}, peft wrote {stored.get(key)!r}")
    run.check(sorted(mine.get("target_modules") or []) == sorted(stored["target_modules"] or []),
              f"case {case.id}: target_modules {mine.get('target_modules')}, peft wrote {stored['target_modules']}")


SECOND = [c for c in CASES if golden.SECOND in c.manifest["adapters"]]


def _with_second(run, case: golden.Case):
    """The case's adapter loaded, and its second adapter added and loaded (inactive)."""
    _in_scope(run, case)
    base = case.base_model()
    config = {k: v for k, v in case.config(golden.SECOND).items() if k in case.manifest["second_config"]}
    reason = scope.out_of_scope(run.impl, base, config, golden.SECOND)
    if reason:
        pytest.skip(f"not applicable: {reason}")
    model = _loaded(run, case)
    run.impl.add_adapter(model, config, golden.SECOND)
    second = harness.to_driver(run.impl, model, case.tensors(golden.SECOND), golden.SECOND)
    run.impl.load_adapter_state_dict(model, {k: v.to(run.device) for k, v in second.items()}, golden.SECOND)
    model.eval()
    return model


@pytest.mark.req("LORA-GOLD-007")
@pytest.mark.parametrize("case", SECOND, ids=[c.id for c in SECOND])
def test_second_adapter_computes_peft_s_output(run, device, case):
    model = _with_second(run, case)
    run.impl.set_adapter(model, golden.SECOND)
    run.close(_output(model, case), case.expected()["second"], f"case {case.id}: logits with the second adapter "
                                                              "active")


MIXED = [c for c in CASES if c.manifest.get("mixed")]
COMBINE = [c for c in CASES if c.manifest.get("combine")]


@pytest.mark.req("LORA-GOLD-009")
@pytest.mark.parametrize("case", MIXED, ids=[c.id for c in MIXED])
def test_mixed_batch_computes_peft_s_output(run, device, case):
    model = _with_second(run, case)
    names = case.manifest["mixed"]
    inputs = {name: tensor.to(device) for name, tensor in case.inputs().items()}
    output = models.output_tensor(model(**inputs, adapter_names=list(names))).cpu()
    run.close(output, case.expected()["mixed"], f"case {case.id}: logits of the mixed batch {names}")


@pytest.mark.req("LORA-GOLD-010")
@pytest.mark.parametrize("case", COMBINE, ids=[c.id for c in COMBINE])
def test_weighted_adapter_computes_peft_s_output(run, device, case):
    model = _with_second(run, case)
    combine = case.manifest["combine"]
    run.impl.add_weighted_adapter(model, [case.adapter_name, golden.SECOND], combine["weights"], golden.COMBINED,
                                  combine["combination_type"])
    run.impl.set_adapter(model, golden.COMBINED)
    model.eval()
    run.close(_output(model, case), case.expected()["combined"],
              f"case {case.id}: logits of add_weighted_adapter({combine['weights']}, {combine['combination_type']!r})")


@pytest.mark.req("LORA-GOLD-008")
@pytest.mark.parametrize("version", golden.versions())
def test_full_size_gpt2_counts_are_peft_s(run, version):
    from transformers import GPT2Config, GPT2LMHeadModel

    recorded = json.loads((golden.root() / version / "gpt2-counts.json").read_text())
    checked = 0
    for row in recorded["counts"]:
        config = {"target_modules": row["target_modules"], "r": row["r"]}
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config())
        if scope.out_of_scope(run.impl, model, config):
            continue
        found = tuple(run.impl.trainable_parameters(run.impl.wrap(model, config)))
        expected = (row["trainable"], row["total"])
        run.check(found == expected, f"GPT-2 small, target_modules={row['target_modules']}, r={row['r']}: "
                                     f"(trainable, total) {found}, peft {recorded['producer']['peft']} recorded "
                                     f"{expected}")
        checked += 1
    if not checked:
        pytest.skip(f"not applicable: no row of {version}/gpt2-counts.json is in {run.impl.name}'s scope")


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_fixture_is_peft_s(run, device, case, tmp_path):
    """An IA3, LoHa or LoKr case: peft's files load to peft's tensors and outputs (active, disabled, merged), and
    saving them again writes peft's tensors under the same peft_type."""
    _in_scope(run, case)
    model, stored, expected = _loaded(run, case), case.tensors(), case.expected()
    live = run.peft_state(model, case.adapter_name)
    run.same_keys(live, stored, f"case {case.id}: adapter keys after loading")
    for key in sorted(stored):
        run.equal(live[key].detach().cpu(), stored[key], f"case {case.id}: {key}")
    run.close(_output(model, case), expected["unmerged"], f"case {case.id}: logits")
    with run.impl.disable_adapter(model):
        run.close(_output(model, case), expected["disabled"], f"case {case.id}: logits with the adapter disabled")
    run.impl.save(model, str(tmp_path), case.adapter_name)
    run.all_close(load_file(tmp_path / "adapter_model.safetensors"), stored, f"case {case.id}: re-saved")
    saved_type = json.loads((tmp_path / "adapter_config.json").read_text()).get("peft_type")
    run.check(saved_type == case.config()["peft_type"], f"case {case.id}: re-saved peft_type {saved_type!r}")
    run.impl.merge(model)
    run.close(_output(model, case), expected["merged"], f"case {case.id}: merged logits")
