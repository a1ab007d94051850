"""Bad input to reference_impl and check-adapter: clear errors that name the field or file, nothing half-done.

Spec: LORA-ERR-001..009."""

import json
import re
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import reference_impl as ref
from conformance import golden
from conformance.adapter_kit.check_adapter import check
from reference_impl import LoraConfig
from reference_impl.peft_format import PREFIX

CASE = "v1/cases/r4-c_attn/adapter"
BAD_CONFIGS = {
    "r=0": ({"r": 0}, r"LoraConfig.r must be a positive integer, got 0"),
    "r=2.5": ({"r": 2.5}, r"LoraConfig.r must be a positive integer, got 2.5"),
    "alpha=-1": ({"lora_alpha": -1}, r"LoraConfig.lora_alpha must be positive"),
    "alpha=nan": ({"lora_alpha": float("nan")}, r"LoraConfig.lora_alpha must be a finite number, got nan"),
    "dropout=1": ({"lora_dropout": 1.0}, r"LoraConfig.lora_dropout must be in \[0, 1\), got 1.0"),
    "dropout=-0.5": ({"lora_dropout": -0.5}, r"lora_dropout must be in \[0, 1\), got -0.5"),
    "bias": ({"bias": "some"}, r"LoraConfig.bias must be one of \('none', 'all', 'lora_only'\), got 'some'"),
    "init": ({"init_lora_weights": "pissa"}, r"init_lora_weights must be True, False or 'gaussian', got 'pissa'"),
    "regex": ({"target_modules": "c_attn("}, r"target_modules 'c_attn\(' is not a valid regular expression"),
    "rank_pattern": ({"rank_pattern": {"c_attn": 0}}, r"rank_pattern\['c_attn'\] must be a positive integer"),
    "pattern regex": ({"alpha_pattern": {"[": 2}}, r"alpha_pattern key '\[' is not a valid regular expression"),
    "layers_pattern alone": ({"layers_pattern": "h"}, r"`layers_to_transform` must also be specified"),
    "targets type": ({"target_modules": 3}, r"target_modules must be None, a regex string or a list"),
    "layers type": ({"layers_to_transform": "0"}, r"layers_to_transform must be None, a layer index or a list"),
    "bool type": ({"use_rslora": "yes"}, r"LoraConfig.use_rslora must be true or false, got 'yes'"),
    "patterns type": ({"rank_pattern": [2]}, r"LoraConfig.rank_pattern must be a dict"),
    "task_type": ({"task_type": "CHAT"}, r"task_type must be None or one of"),
}


@pytest.fixture
def adapter(tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(golden.root() / CASE, target)
    return target


@pytest.mark.req("LORA-ERR-001")
@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_values_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{"target_modules": ["c_attn"], **change})


@pytest.mark.req("LORA-ERR-002")
def test_unknown_config_keys(adapter, tiny_gpt2):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_future": 1}))
    with pytest.raises(ValueError, match=r"adapter_config.json.*unknown keys \['lora_future'\]"):
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter)
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter, ignore_unknown_keys=True)


@pytest.mark.req("LORA-ERR-003")
@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_files_name_the_file_and_leave_the_model_alone(adapter, tiny_gpt2, name):
    (adapter / name).unlink()
    model = tiny_gpt2()
    before = dict(model.named_modules())
    with pytest.raises(FileNotFoundError, match=f"{adapter / name}: no {name}"):
        ref.PeftModel.from_pretrained(model, adapter)
    assert dict(model.named_modules()) == before


def _lying_header(path):
    """Rewrite the header so that the first tensor claims a larger shape than its bytes."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0] * 2, header[key]["shape"][1]]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])


@pytest.mark.req("LORA-ERR-004")
@pytest.mark.parametrize("damage", ["truncate", "garbage", "lying header"])
def test_damaged_safetensors_name_the_file(adapter, tiny_gpt2, damage):
    path = adapter / "adapter_model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    else:
        _lying_header(path)
    with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter)


@pytest.mark.req("LORA-ERR-005", "LORA-ERR-006")
@pytest.mark.parametrize("damage", ["absent module", "wrong shape"])
def test_key_and_shape_errors_restore_the_model(adapter, tiny_gpt2, damage):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    if damage == "absent module":
        tensors[f"{PREFIX}transformer.h.9.attn.c_attn.lora_A.weight"] = torch.zeros(4, 32)
        message = rf"tensor {re.escape(PREFIX)}transformer.h.9.attn.c_attn.lora_A.weight is for module " \
                  r"'transformer.h.9.attn.c_attn', which the base model does not have"
    else:
        key = f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"
        tensors[key] = torch.zeros(96, 5)
        message = r"Shape mismatch for .*h.0.attn.c_attn.lora_B.weight: the checkpoint has \(96, 5\), the model " \
                  r"expects \(96, 4\)"
    save_file(tensors, path, metadata={"format": "pt"})
    model = tiny_gpt2()
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        ref.PeftModel.from_pretrained(model, adapter)
    assert dict(model.named_modules()) == modules  # the original modules are back in place


@pytest.mark.req("LORA-ERR-007")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(adapter, tiny_gpt2, value):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{PREFIX}transformer.h.1.attn.c_attn.lora_A.weight"][0, 0] = value
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor .*h.1.attn.c_attn.lora_A.weight holds NaN or Inf"):
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter)


@pytest.mark.req("LORA-ERR-008")
def test_pickle_needs_consent(adapter, tiny_gpt2):
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin is there: pass allow_pickle=True"):
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter)
    model = ref.PeftModel.from_pretrained(tiny_gpt2(), adapter, allow_pickle=True)
    assert torch.equal(ref.get_peft_model_state_dict(model)[sorted(tensors)[0]], tensors[sorted(tensors)[0]])


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=6)


@pytest.mark.req("LORA-ERR-009")
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "bias", "lora_dropout",
                                                "rank_pattern", "layers_to_transform", "peft_type", "use_dora",
                                                "modules_to_save", "init_lora_weights", "x"]), json_values,
                               max_size=3))
def test_fuzzed_config_gives_documented_errors(adapter, tiny_gpt2, changes):
    config = json.loads((golden.root() / CASE / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    try:
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter)
    except (ValueError, FileNotFoundError):
        pass
    assert isinstance(check(adapter).ok, bool)


@pytest.mark.req("LORA-ERR-009")
@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_bytes_give_documented_errors(adapter, tiny_gpt2, data):
    original = (golden.root() / CASE / "adapter_model.safetensors").read_bytes()
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        position = data.draw(st.integers(0, len(damaged) - 1), label="position")
        damaged[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(8, len(damaged)), label="length")
    (adapter / "adapter_model.safetensors").write_bytes(bytes(damaged[:cut]))
    try:
        ref.PeftModel.from_pretrained(tiny_gpt2(), adapter)
    except (ValueError, FileNotFoundError):
        pass
    assert isinstance(check(adapter).ok, bool)


def test_modules_to_save_on_a_container_is_refused_before_anything_is_wrapped(tiny_gpt2):
    """modules_to_save matches without a dot boundary, so "h" names GPT-2's block list `transformer.h`: peft refuses
    a ModuleList (its forward cannot run); so does reference_impl, and the model stays as it was."""
    peft = pytest.importorskip("peft")
    config = {"target_modules": ["wpe"], "modules_to_save": ["ln_f", "h"]}
    with pytest.raises(TypeError, match="cannot be applied to modules of type"):
        peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**config))
    model = tiny_gpt2()
    with pytest.raises(TypeError, match=r"modules_to_save cannot be applied to .*ModuleList.*'transformer\.h'"):
        ref.get_peft_model(model, LoraConfig(**config))
    assert type(model.transformer.ln_f) is torch.nn.LayerNorm
