"""ERR: broken adapter files are refused, not loaded into a model that computes garbage."""

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conformance import checks, harness, models
from conformance.strategies import Case

pytestmark = pytest.mark.needs("save_load", "linear")
CASE = Case("mlp", {"target_modules": ["fc"], "r": 4, "lora_alpha": 8})
WEIGHTS = "adapter_model.safetensors"


def _saved(impl, directory) -> dict:
    mine, _ = harness.adapted_pair(impl, None, CASE, "cpu")
    impl.save(mine.model, str(directory))
    return load_file(directory / WEIGHTS)


def _load(impl, directory):
    return impl.load(models.build("mlp"), str(directory))


@pytest.mark.req("LORA-ERR-011")
def test_truncated_file_is_refused(impl, tmp_path):
    _saved(impl, tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    try:
        _load(impl, tmp_path)
    except Exception:  # any clear refusal will do; the next line is reached only by a silent load
        return
    checks.fail("LORA-ERR-011", "a truncated adapter_model.safetensors loaded without an error")


@pytest.mark.req("LORA-ERR-012")
def test_wrong_shape_is_refused(impl, tmp_path):
    tensors = _saved(impl, tmp_path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    try:
        _load(impl, tmp_path)
    except Exception:
        return
    checks.fail("LORA-ERR-012", f"{key} with shape {tuple(tensors[key].shape)} loaded without an error")


def _refused_or_warned(impl, directory, key: str, req: str, what: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _load(impl, directory)
        except Exception:
            return
    named = [str(w.message) for w in caught if key in str(w.message)]
    checks.check(bool(named), req, f"{what} loaded silently (no error, no warning naming {key})")


@pytest.mark.req("LORA-ERR-013")
def test_tensors_for_absent_modules_are_not_ignored_silently(impl, tmp_path):
    tensors = _saved(impl, tmp_path)
    key = "base_model.model.blocks.7.fc.lora_A.weight"
    tensors[key] = torch.zeros(4, 16)
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    _refused_or_warned(impl, tmp_path, key, "LORA-ERR-013", "a tensor for module blocks.7.fc (absent)")


@pytest.mark.req("LORA-ERR-014")
def test_nan_values_are_not_loaded_silently(impl, tmp_path):
    tensors = _saved(impl, tmp_path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    _refused_or_warned(impl, tmp_path, key, "LORA-ERR-014", "a NaN in " + key)
