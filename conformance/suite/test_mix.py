"""MIX: mixed-adapter batches, one adapter per row (model(**inputs, adapter_names=[...]))."""

from typing import Optional

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.engine import harness, scope
from conformance.engine.run import with_config
from conformance.zoo import models

BASE = "__base__"
ROWS = 4  # two draws of the model's inputs, stacked: four rows


def _batch(mine: harness.Adapted) -> dict:
    """Four rows: the case's inputs and those of the next seed, stacked along the batch dimension."""
    seeds = (mine.case.inputs_seed, mine.case.inputs_seed + 1)
    parts = [models.inputs(mine.case.model, seed, mine.device, mine.dtype) for seed in seeds]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _by_row(model: str, output: torch.Tensor) -> torch.Tensor:
    """The output with the batch first (question answering stacks start and end logits in front)."""
    return output.transpose(0, 1) if models.ZOO[model].task_type == "QUESTION_ANS" else output


def _forward(adapted: harness.Adapted, inputs: dict, model: Optional[torch.nn.Module] = None, **extra) -> torch.Tensor:
    with torch.no_grad():
        model = adapted.model if model is None else model
        return _by_row(adapted.case.model, models.run(adapted.case.model, model, {**inputs, **extra}))


def _saveable_linears(base: torch.nn.Module, config: dict) -> list[str]:
    """Linear layers a modules_to_save copy can replace in a mixed batch (peft 0.21.2 routes Linear, Embedding and
    conv copies per row, not a LayerNorm's): not adapted, holding nothing adapted, their weight not shared."""
    adapted = scope.targeted(base, config)
    users = {}
    for module in base.modules():
        if isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            users[module.weight.data_ptr()] = users.get(module.weight.data_ptr(), 0) + 1
    return [path for path, module in base.named_modules()
            if isinstance(module, torch.nn.Linear) and path not in adapted and users[module.weight.data_ptr()] == 1
            and not any(a.startswith(path + ".") for a in adapted)]


def _case_and_other(run, data):
    case = run.draw(data, extras=False)
    # Every adapted layer must see the batch first; GPT-2's position embedding is called with one row.
    assume("wpe" not in case.config["target_modules"])
    if "modules_to_save" in run.impl.capabilities and data.draw(st.booleans(), label="with a module to save"):
        saveable = _saveable_linears(models.build(case.model), case.config)
        assume(saveable)
        saved = data.draw(st.sampled_from(saveable), label="module to save")
        case = run.admit(with_config(case, modules_to_save=[saved]))  # its copies must follow adapter_names too
    other = {**case.config, "r": data.draw(st.integers(1, 8), label="other r"),
             "lora_alpha": data.draw(st.sampled_from([1, 4, 16]), label="other alpha")}
    run.within_scope(case._replace(config=other), "other")
    return case, other


@pytest.mark.req("LORA-MIX-001")
@given(data=st.data())
def test_each_row_uses_its_adapter(run, device, data):
    case, other = _case_and_other(run, data)
    names = data.draw(st.lists(st.sampled_from(["default", "other", BASE]), min_size=ROWS, max_size=ROWS),
                      label="adapter_names")
    mine = run.adapted(case)
    values = run.add_second_adapter(mine, other)
    inputs = _batch(mine)
    mixed = _forward(mine, inputs, adapter_names=list(names))
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == BASE:  # the unadapted base itself: the capability "disable" is not needed here
            alone = _forward(mine, inputs, model=mine.base())
        else:
            run.impl.set_adapter(mine.model, name)
            alone = _forward(mine, inputs)
        run.close(mixed[rows], alone[rows], f"rows {rows} of the batch {names} vs the batch with {name!r} alone")
    if run.oracle_driver is None:
        return
    theirs = run.wrap(case, driver=run.oracle)
    harness.load(theirs, mine.values)
    run.add_second_adapter(theirs, other, values)
    run.close(mixed, _forward(theirs, inputs, adapter_names=list(names)), f"mixed batch {names} vs peft's")


@pytest.mark.req("LORA-MIX-002")
@given(data=st.data())
def test_bad_adapter_names_are_refused(run, device, data):
    case, other = _case_and_other(run, data)
    mine = run.adapted(case)
    run.add_second_adapter(mine, other)
    inputs = _batch(mine)
    run.raises(ValueError, lambda: _forward(mine, inputs, adapter_names=["default", "no-such-adapter", BASE, "other"]),
               "adapter_names naming an adapter the model does not have")
    run.raises(ValueError, lambda: _forward(mine, inputs, adapter_names=["other"] * (ROWS - 1)),
               f"{ROWS - 1} adapter_names for a batch of {ROWS}")
    mine.model.train()
    run.raises(ValueError, lambda: _forward(mine, inputs, adapter_names=["other"] * ROWS),
               "adapter_names in training mode")
