"""ERR: broken adapter files are refused, not loaded into a model that computes garbage. Each test breaks a file
the driver itself saved for a model and target in its scope."""

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conformance.engine import harness
from conformance.engine.strategies import Case
from conformance.zoo import models

WEIGHTS = "adapter_model.safetensors"


def _saved(run, directory) -> tuple[Case, dict]:
    """Save a small adapter of the driver's scope (non-zero values) and return its case and tensors."""
    model_name, target = run.fixed_target()
    case = run.fixed(model_name, {"target_modules": [target], "r": 4, "lora_alpha": 8})
    mine = run.adapted(case)
    run.impl.save(mine.model, str(directory))
    run.require((directory / WEIGHTS).is_file(), "LORA-SER-001", f"save wrote no {WEIGHTS}")
    return case, load_file(directory / WEIGHTS)


def _factor_key(run, tensors: dict, suffixes: tuple) -> str:
    """A saved factor's key; none (keys not peft's) fails LORA-KEYS-001 rather than the test."""
    keys = sorted(k for k in tensors if k.endswith(suffixes))
    run.require(bool(keys), "LORA-KEYS-001", f"the saved file holds no key ending in {suffixes}: {sorted(tensors)[:4]}")
    return keys[0]


def _load(run, case: Case, directory):
    return run.impl.load(models.build(case.model), str(directory))


@pytest.mark.req("LORA-ERR-011")
def test_truncated_file_is_refused(run, tmp_path):
    case, _ = _saved(run, tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    run.raises(Exception, lambda: _load(run, case, tmp_path), "loading a truncated adapter_model.safetensors")


@pytest.mark.req("LORA-ERR-012")
def test_wrong_shape_is_refused(run, tmp_path):
    case, tensors = _saved(run, tmp_path)
    key = _factor_key(run, tensors, ("lora_A.weight", "lora_embedding_A"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    run.raises(Exception, lambda: _load(run, case, tmp_path), f"loading {key} with shape {tuple(tensors[key].shape)}")


def _refused_or_warned(run, case: Case, directory, key: str, what: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _load(run, case, directory)
            refused = False
        except Exception:
            refused = True
    named = [str(w.message) for w in caught if key in str(w.message)]
    run.check(refused or bool(named), f"{what} loaded silently (no error, no warning naming {key})")


@pytest.mark.req("LORA-ERR-013")
def test_tensors_for_absent_modules_are_not_ignored_silently(run, tmp_path):
    case, tensors = _saved(run, tmp_path)
    key = f"{harness.PREFIX}no_such_block.7.fc.lora_A.weight"
    tensors[key] = torch.zeros(4, 16)
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    _refused_or_warned(run, case, tmp_path, key, "a tensor for module no_such_block.7.fc (absent)")


@pytest.mark.req("LORA-ERR-014")
def test_nan_values_are_not_loaded_silently(run, tmp_path):
    case, tensors = _saved(run, tmp_path)
    key = _factor_key(run, tensors, ("lora_B.weight", "lora_embedding_B"))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    _refused_or_warned(run, case, tmp_path, key, "a NaN in " + key)
