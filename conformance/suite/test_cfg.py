"""CFG: invalid hyper-parameters are refused."""

import pytest

from conformance import models

INVALID = {
    "r=0": {"r": 0},
    "r=-1": {"r": -1},
    "bias='foo'": {"bias": "foo"},
    "init_lora_weights='foo'": {"init_lora_weights": "foo"},
    "lora_dropout=1.5": {"lora_dropout": 1.5},
    "layers_pattern alone": {"layers_pattern": "h"},
    "layers_to_transform with a regex": {"target_modules": ".*c_attn", "layers_to_transform": [0]},
}


@pytest.mark.req("LORA-CFG-002")
@pytest.mark.parametrize("change", INVALID.values(), ids=INVALID.keys())
def test_invalid_values_are_rejected(impl, change):
    config = {"target_modules": ["c_attn"], **change}
    with pytest.raises((ValueError, NotImplementedError, TypeError)):
        impl.wrap(models.build("gpt2-tiny"), config)


@pytest.mark.req("LORA-CFG-003")
def test_unknown_task_type_is_rejected(impl):
    with pytest.raises(ValueError):
        impl.wrap(models.build("gpt2-tiny"), {"target_modules": ["c_attn"], "task_type": "FOO"})
