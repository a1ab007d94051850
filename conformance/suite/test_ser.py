"""SER: the two files of an adapter directory, as peft writes them."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from conformance import checks, harness
from conformance.strategies import cases

pytestmark = pytest.mark.needs("save_load")

# The LoRA fields of adapter_config.json whose values must agree with peft's (LORA-SER-003).
CORE_FIELDS = ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "use_dora",
               "init_lora_weights", "target_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
               "alpha_pattern", "modules_to_save", "lora_bias", "peft_type", "task_type")


# What peft takes for a field the file leaves out (peft 0.21.2 tuners/lora/config.py:632-999).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
                 "use_rslora": False, "use_dora": False, "init_lora_weights": True, "target_modules": None,
                 "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                 "modules_to_save": None, "lora_bias": False, "peft_type": "LORA", "task_type": None}


def _normalized(config: dict) -> dict:
    """The values peft loads: a field left out takes peft's default."""
    values = {key: config.get(key, PEFT_DEFAULTS[key]) for key in CORE_FIELDS}
    if isinstance(values["target_modules"], list):
        values["target_modules"] = sorted(values["target_modules"])  # peft writes a set: order varies
    return values


def saved(driver, adapted: harness.Adapted, directory: Path) -> tuple[dict, dict]:
    driver.save(adapted.model, str(directory))
    return json.loads((directory / "adapter_config.json").read_text()), load_file(directory /
                                                                                   "adapter_model.safetensors")


@pytest.mark.req("LORA-SER-001", "LORA-SER-002")
@given(data=st.data())
def test_saved_files_hold_the_live_tensors(impl, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, _ = harness.adapted_pair(impl, None, case, device)
    directory = tmp_path_factory.mktemp("saved")
    impl.save(mine.model, str(directory))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        checks.check((directory / name).is_file(), "LORA-SER-001", f"save wrote no {name}")
    with safe_open(directory / "adapter_model.safetensors", "pt") as handle:
        checks.check(handle.metadata() == {"format": "pt"}, "LORA-SER-001",
                     f"safetensors metadata {handle.metadata()}, expected {{'format': 'pt'}}")
    live = {k: v.detach().cpu() for k, v in impl.adapter_state_dict(mine.model).items()}
    checks.all_close(load_file(directory / "adapter_model.safetensors"), live, "exact", "LORA-SER-002", "saved")


@pytest.mark.req("LORA-SER-003", "LORA-SER-005")
@pytest.mark.oracle
@given(data=st.data())
def test_saved_config_matches_peft(impl, oracle, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities), label="case")
    mine, theirs = harness.adapted_pair(impl, oracle, case, device)
    directory = tmp_path_factory.mktemp("configs")
    my_config, _ = saved(impl, mine, directory / "mine")
    their_config, _ = saved(oracle, theirs, directory / "peft")
    for key, value in _normalized(their_config).items():
        checks.check(_normalized(my_config)[key] == value, "LORA-SER-003",
                     f"adapter_config.json {key}={_normalized(my_config)[key]!r}, peft wrote {value!r}")
    checks.same_keys(my_config, their_config, "LORA-SER-005", "adapter_config.json keys")


@pytest.mark.req("LORA-SER-004")
@pytest.mark.needs("multi_adapter")
@given(data=st.data())
def test_other_adapter_goes_to_a_subfolder(impl, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities, extras=False), label="case")
    mine = harness.wrap(impl, case, device, torch.float32)
    impl.add_adapter(mine.model, dict(case.config), "other")
    directory = tmp_path_factory.mktemp("subfolder")
    impl.save(mine.model, str(directory), "other")
    found = sorted(str(p.relative_to(directory)) for p in directory.rglob("adapter_*"))
    checks.check(found == ["other/adapter_config.json", "other/adapter_model.safetensors"], "LORA-SER-004",
                 f"saving adapter 'other' wrote {found}")


@pytest.mark.req("LORA-CFG-001")
@given(data=st.data())
def test_defaults(impl, device, data, tmp_path_factory):
    case = data.draw(cases(impl.capabilities, single_layer=True, extras=False), label="case")
    case = case._replace(config={"target_modules": case.config["target_modules"]})
    mine, _ = harness.adapted_pair(impl, None, case, device)
    config, _ = saved(impl, mine, tmp_path_factory.mktemp("defaults"))
    defaults = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                "init_lora_weights": True, "use_dora": False}
    found = {key: _normalized(config)[key] for key in defaults}
    checks.check(found == defaults, "LORA-CFG-001", f"saved defaults {found}, peft's are {defaults}")


@pytest.mark.req("LORA-CFG-004")
@pytest.mark.needs("conv1d")
@given(data=st.data(), fan_in_fan_out=st.booleans())
def test_conv1d_targets_save_fan_in_fan_out(impl, device, data, fan_in_fan_out, tmp_path_factory):
    case = data.draw(cases(impl.capabilities, kinds={"conv1d"}, extras=False), label="case")
    mine, _ = harness.adapted_pair(impl, None, harness.with_config(case, fan_in_fan_out=fan_in_fan_out), device)
    config, _ = saved(impl, mine, tmp_path_factory.mktemp("fan_in_fan_out"))
    checks.check(_normalized(config)["fan_in_fan_out"] is True, "LORA-CFG-004",
                 f"Conv1D targets with fan_in_fan_out={fan_in_fan_out} saved {config.get('fan_in_fan_out')!r}")


@pytest.mark.req("LORA-MATCH-011")
@pytest.mark.needs("regex_targets", "conv1d")
def test_long_target_lists_are_saved_as_suffixes(impl, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = impl.wrap(GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=16, n_head=2, vocab_size=50)),
                      {"target_modules": "all-linear", "r": 2})
    impl.save(model, str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    checks.check(sorted(saved) == ["c_attn", "c_fc", "c_proj"], "LORA-MATCH-011",
                 f"'all-linear' on a 12-layer GPT-2 saved target_modules={sorted(saved)[:6]}...")
