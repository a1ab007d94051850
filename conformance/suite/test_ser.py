"""SER: the two files of an adapter directory, as peft writes them."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from conformance.engine import harness

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


def saved(run, driver, adapted: harness.Adapted, directory: Path) -> tuple[dict, dict]:
    """Save through `driver` and read both files back (a missing file fails LORA-SER-001, not the test)."""
    driver.save(adapted.model, str(directory))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        run.require((directory / name).is_file(), "LORA-SER-001", f"{driver.name} saved no {name}")
    return json.loads((directory / "adapter_config.json").read_text()), load_file(directory /
                                                                                   "adapter_model.safetensors")


@pytest.mark.req("LORA-SER-001", "LORA-SER-002")
@given(data=st.data())
def test_saved_files_hold_the_live_tensors(run, device, dtype, data, tmp_path_factory):
    mine = run.adapted(run.draw(data))
    directory = tmp_path_factory.mktemp("saved")
    run.impl.save(mine.model, str(directory))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        run.check((directory / name).is_file(), f"save wrote no {name}", req="LORA-SER-001")
    with safe_open(directory / "adapter_model.safetensors", "pt") as handle:
        run.check(handle.metadata() == {"format": "pt"},
                  f"safetensors metadata {handle.metadata()}, expected {{'format': 'pt'}}", req="LORA-SER-001")
    live = {k: v.detach().cpu() for k, v in run.peft_state(mine.model).items()}
    run.all_close(load_file(directory / "adapter_model.safetensors"), live, "saved", req="LORA-SER-002")


@pytest.mark.req("LORA-SER-003", "LORA-SER-005")
@given(data=st.data())
def test_saved_config_matches_peft(run, device, data, tmp_path_factory):
    mine, theirs = run.pair(run.draw(data))
    directory = tmp_path_factory.mktemp("configs")
    my_config, _ = saved(run, run.impl, mine, directory / "mine")
    their_config, _ = saved(run, run.oracle, theirs, directory / "peft")
    for key, value in _normalized(their_config).items():
        run.check(_normalized(my_config)[key] == value,
                  f"adapter_config.json {key}={_normalized(my_config)[key]!r}, peft wrote {value!r}",
                  req="LORA-SER-003")
    run.same_keys(my_config, their_config, "adapter_config.json keys", req="LORA-SER-005")


@pytest.mark.req("LORA-SER-004")
@given(data=st.data())
def test_other_adapter_goes_to_a_subfolder(run, device, data, tmp_path_factory):
    case = run.draw(data, extras=False)
    other = {**case.config, "r": case.config["r"] + 1, "lora_alpha": case.config.get("lora_alpha", 8) * 2}
    run.within_scope(case._replace(config=other), "other")
    mine = run.adapted(case)  # values that map: a fused layout may not write a fresh adapter
    run.add_second_adapter(mine, other)
    directory = tmp_path_factory.mktemp("subfolder")
    run.impl.save(mine.model, str(directory), "other")  # "default" stays the active adapter
    found = sorted(str(p.relative_to(directory)) for p in directory.rglob("adapter_*"))
    run.check(found == ["other/adapter_config.json", "other/adapter_model.safetensors"],
              f"saving adapter 'other' wrote {found}")
    saved_config = json.loads((directory / "other" / "adapter_config.json").read_text())
    written = {key: saved_config.get(key) for key in ("r", "lora_alpha")}
    run.check(written == {key: other[key] for key in written},
              f"adapter 'other' (r={other['r']}, lora_alpha={other['lora_alpha']}) saved with {written}")


@pytest.mark.req("LORA-SER-006")
@given(data=st.data())
def test_overlapping_pattern_keys_survive_a_round_trip(run, device, data, tmp_path_factory):
    mine = run.adapted(run.draw_overlapping_patterns(data))
    directory = tmp_path_factory.mktemp("patterns")
    config, _ = saved(run, run.impl, mine, directory)
    for key in ("rank_pattern", "alpha_pattern"):
        run.check(list(config.get(key, {})) == list(mine.case.config[key]),
                  f"saved {key} keys in the order {list(config.get(key, {}))}, built with "
                  f"{list(mine.case.config[key])}")
    reloaded = run.impl.load(mine.base(), str(directory))
    run.equal(mine.output(reloaded), mine.output(), "output after the round trip")


@pytest.mark.req("LORA-CFG-001")
@given(data=st.data())
def test_defaults(run, device, data, tmp_path_factory):
    case = run.draw(data, extras=False)
    case = run.admit(case._replace(config={"target_modules": case.config["target_modules"]}))
    config, _ = saved(run, run.impl, run.adapted(case), tmp_path_factory.mktemp("defaults"))
    defaults = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                "init_lora_weights": True, "use_dora": False}
    found = {key: _normalized(config)[key] for key in defaults}
    run.check(found == defaults, f"saved defaults {found}, peft's are {defaults}")


@pytest.mark.req("LORA-CFG-004")
@given(data=st.data(), fan_in_fan_out=st.booleans())
def test_conv1d_targets_save_fan_in_fan_out(run, device, data, fan_in_fan_out, tmp_path_factory):
    case = run.draw(data, kinds={"conv1d"}, extras=False, config={"fan_in_fan_out": fan_in_fan_out})
    config, _ = saved(run, run.impl, run.adapted(case), tmp_path_factory.mktemp("fan_in_fan_out"))
    run.check(_normalized(config)["fan_in_fan_out"] is True,
              f"Conv1D targets with fan_in_fan_out={fan_in_fan_out} saved {config.get('fan_in_fan_out')!r}")


@pytest.mark.req("LORA-MATCH-011")
def test_long_target_lists_are_saved_as_suffixes(run, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=16, n_head=2, vocab_size=50))
    run.fixed("gpt2-12-layers", {"target_modules": "all-linear", "r": 2}, base=base)
    model = run.impl.wrap(base, {"target_modules": "all-linear", "r": 2})
    run.impl.save(model, str(tmp_path))
    saved_targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    run.check(sorted(saved_targets) == ["c_attn", "c_fc", "c_proj"],
              f"'all-linear' on a 12-layer GPT-2 saved target_modules={sorted(saved_targets)[:6]}...")
