"""GOLD: the recorded peft fixtures. Any driver loads what peft wrote, computes what peft computed, and writes
it back the same; and the fixtures themselves are intact. Runs without peft installed."""

import json

import pytest
import torch

from conformance import checks, golden

CASES = golden.cases()
IDS = [case.id for case in CASES]


def _applicable(impl, case: golden.Case, *extra: str) -> None:
    missing = sorted((set(case.manifest["needs"]) | set(extra)) - set(impl.capabilities))
    if missing:
        pytest.skip(f"not applicable: {impl.name} does not declare {', '.join(missing)} (case {case.id})")


def _loaded(impl, case: golden.Case):
    model = impl.load(golden.base_model(case.version), str(case.adapter_dir()), case.adapter_name)
    model.eval()
    return model


def _output(model, case: golden.Case) -> torch.Tensor:
    return model(**case.inputs()).logits


@pytest.mark.req("LORA-GOLD-001")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fixture_files_match_the_lock(case):
    locked = golden.read_lock()
    for path in golden.fixture_files(case.path):
        name = str(path.relative_to(golden.root()))
        checks.check(locked.get(name) == golden.sha256(path), "LORA-GOLD-001",
                     f"case {case.id}: {name} does not match {golden.LOCK_NAME} (tampered or regenerated in place)")


@pytest.mark.req("LORA-GOLD-002")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loaded_tensors_are_peft_s(impl, case):
    _applicable(impl, case)
    live = impl.adapter_state_dict(_loaded(impl, case), case.adapter_name)
    stored = case.tensors()
    checks.same_keys(live, stored, "LORA-GOLD-002", f"case {case.id}: adapter keys after loading")
    for key in sorted(stored):
        checks.equal(live[key].detach().cpu(), stored[key], "LORA-GOLD-002", f"case {case.id}: {key}")


@pytest.mark.req("LORA-GOLD-003")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_are_peft_s(impl, case):
    _applicable(impl, case)
    checks.close(_output(_loaded(impl, case), case), case.expected()["unmerged"], "golden", "LORA-GOLD-003",
                 f"case {case.id}: logits")


@pytest.mark.req("LORA-GOLD-004")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_outputs_are_peft_s(impl, case):
    _applicable(impl, case, "merge")
    model = _loaded(impl, case)
    impl.merge(model)
    checks.close(_output(model, case), case.expected()["merged"], "golden", "LORA-GOLD-004",
                 f"case {case.id}: merged logits")


@pytest.mark.req("LORA-GOLD-005")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disabled_outputs_are_peft_s(impl, case):
    _applicable(impl, case, "disable")
    model = _loaded(impl, case)
    with impl.disable_adapter(model):
        checks.close(_output(model, case), case.expected()["disabled"], "golden", "LORA-GOLD-005",
                     f"case {case.id}: logits with the adapter disabled")


@pytest.mark.req("LORA-GOLD-006")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_saving_again_writes_peft_s_files(impl, case, tmp_path):
    _applicable(impl, case)
    impl.save(_loaded(impl, case), str(tmp_path), case.adapter_name)
    written = tmp_path if case.adapter_name == "default" else tmp_path / case.adapter_name
    from safetensors.torch import load_file

    checks.all_close(load_file(written / "adapter_model.safetensors"), case.tensors(), "exact", "LORA-GOLD-006",
                     f"case {case.id}: re-saved")
    mine, stored = json.loads((written / "adapter_config.json").read_text()), case.config()
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "modules_to_save", "fan_in_fan_out", "peft_type"):
        checks.check(mine.get(key) == stored.get(key), "LORA-GOLD-006",
                     f"case {case.id}: re-saved adapter_config.json {key}={mine.get(key)!r}, peft wrote "
                     f"{stored.get(key)!r}")
    checks.check(sorted(mine["target_modules"]) == sorted(stored["target_modules"]), "LORA-GOLD-006",
                 f"case {case.id}: target_modules {mine['target_modules']}, peft wrote {stored['target_modules']}")


@pytest.mark.req("LORA-GOLD-007")
@pytest.mark.parametrize("case", [c for c in CASES if golden.SECOND in c.manifest["adapters"]],
                         ids=[c.id for c in CASES if golden.SECOND in c.manifest["adapters"]])
def test_second_adapter_computes_peft_s_output(impl, case):
    _applicable(impl, case, "multi_adapter")
    model = _loaded(impl, case)
    config = {k: v for k, v in case.config(golden.SECOND).items() if k in case.manifest["second_config"]}
    impl.add_adapter(model, config, golden.SECOND)
    impl.load_adapter_state_dict(model, case.tensors(golden.SECOND), golden.SECOND)
    impl.set_adapter(model, golden.SECOND)
    model.eval()
    checks.close(_output(model, case), case.expected()["second"], "golden", "LORA-GOLD-007",
                 f"case {case.id}: logits with the second adapter active")


@pytest.mark.req("LORA-GOLD-008")
@pytest.mark.needs("conv1d")
@pytest.mark.parametrize("version", golden.versions())
def test_full_size_gpt2_counts_are_peft_s(impl, version):
    from transformers import GPT2Config, GPT2LMHeadModel

    recorded = json.loads((golden.root() / version / "gpt2-counts.json").read_text())
    for row in recorded["counts"]:
        if isinstance(row["target_modules"], str) and "regex_targets" not in impl.capabilities:
            continue
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config())
        found = tuple(impl.trainable_parameters(impl.wrap(model, {"target_modules": row["target_modules"],
                                                                   "r": row["r"]})))
        expected = (row["trainable"], row["total"])
        checks.check(found == expected, "LORA-GOLD-008", f"GPT-2 small, target_modules={row['target_modules']}, "
                     f"r={row['r']}: (trainable, total) {found}, peft {recorded['producer']['peft']} recorded "
                     f"{expected}")
