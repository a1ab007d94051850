"""CFG: invalid hyper-parameters are refused, on a model and target in the driver's scope."""

import pytest

from conformance.zoo import models

REFUSALS = (ValueError, NotImplementedError, TypeError)
INVALID = {
    "r=0": lambda target: {"r": 0},
    "r=-1": lambda target: {"r": -1},
    "bias='foo'": lambda target: {"bias": "foo"},
    "init_lora_weights='foo'": lambda target: {"init_lora_weights": "foo"},
    "lora_dropout=1.5": lambda target: {"lora_dropout": 1.5},
    "layers_pattern alone": lambda target: {"layers_pattern": "h"},
    "layers_to_transform with a regex": lambda target: {"target_modules": f".*{target}", "layers_to_transform": [0]},
}


@pytest.mark.req("LORA-CFG-002")
@pytest.mark.parametrize("change", INVALID.values(), ids=INVALID.keys())
def test_invalid_values_are_rejected(run, change):
    model_name, target = run.fixed_target()
    config = {"target_modules": [target], **change(target)}
    run.fixed(model_name, {"target_modules": [target]})
    run.raises(REFUSALS, lambda: run.impl.wrap(models.build(model_name), config), f"wrapping with {config}")


@pytest.mark.req("LORA-CFG-003")
def test_unknown_task_type_is_rejected(run):
    model_name, target = run.fixed_target()
    run.fixed(model_name, {"target_modules": [target]})
    config = {"target_modules": [target], "task_type": "FOO"}
    run.raises(ValueError, lambda: run.impl.wrap(models.build(model_name), config), f"wrapping with {config}")
