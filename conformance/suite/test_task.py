"""TASK: task_type, peft's wrapper per task: the heads it trains and saves, the forward arguments it takes."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from conformance.engine import harness, scope
from conformance.engine.run import NOT_APPLICABLE
from conformance.zoo import models
from conformance.zoo.transformers_zoo import labels_for
from reference_impl.peft_format import TASK_HEADS  # the names peft appends (peft_model.py:1830, 2680, 2915)


def _draw_task_case(run, data, heads_only: bool):
    """A case on a zoo model with a task type, the task type set; with heads_only, a task with a head."""
    names = [m for m in scope.models_in_scope(run.impl)
             if models.ZOO[m].task_type and (models.ZOO[m].task_type in TASK_HEADS or not heads_only)]
    if not names:
        pytest.skip(f"{NOT_APPLICABLE}no zoo model {'with a task head ' if heads_only else 'with a task type '}"
                    f"is in {run.impl.name}'s scope")
    name = data.draw(st.sampled_from(names), label="model")
    zoo = models.ZOO[name]
    user_list = data.draw(st.sampled_from([None, list(zoo.saveable[:1])]), label="modules_to_save")
    return run.draw(data, extras=False, model=name, config={"task_type": zoo.task_type,
                                                           "modules_to_save": user_list or None})


def _head_keys(base: torch.nn.Module, task_type: str) -> set[str]:
    """The saved keys of the task's heads: every parameter of a module whose name ends with a head name."""
    return {f"{harness.PREFIX}{path}.{name}" for path, module in base.named_modules()
            if any(path.endswith(head) for head in TASK_HEADS[task_type]) for name, _ in module.named_parameters()}


def _saved(driver, model, directory) -> tuple[set, dict]:
    driver.save(model, str(directory))
    return set(load_file(directory / "adapter_model.safetensors")), json.loads(
        (directory / "adapter_config.json").read_text())


@pytest.mark.req("LORA-TASK-001")
@given(data=st.data())
def test_task_heads_train_and_are_saved(run, device, data, tmp_path_factory):
    case = _draw_task_case(run, data, heads_only=True)
    task, mine = case.config["task_type"], run.adapted(case)
    heads = _head_keys(mine.base(), task)
    run.check(bool(heads), f"{case.model} has no module named {TASK_HEADS[task]}")  # the zoo's own promise
    live = run.peft_state(mine.model)
    run.check(heads <= set(live), f"task_type={task}: the head is not among the adapter's tensors: missing "
                                  f"{sorted(heads - set(live))}")
    for key in sorted(heads & set(live)):
        run.check(live[key].requires_grad, f"task_type={task}: {key} (the head) does not train")
    keys, config = _saved(run.impl, mine.model, tmp_path_factory.mktemp("task"))
    run.check(heads <= keys, f"task_type={task}: the saved file lacks the head: {sorted(heads - keys)}")
    expected = (case.config.get("modules_to_save") or []) + TASK_HEADS[task]
    run.check(config.get("modules_to_save") == expected,
              f"saved modules_to_save {config.get('modules_to_save')}, expected {expected}")


@pytest.mark.req("LORA-TASK-001")
@given(data=st.data())
def test_task_heads_match_peft(run, device, data, tmp_path_factory):
    case = _draw_task_case(run, data, heads_only=True)
    mine, theirs = run.pair(case)
    my_keys, my_config = _saved(run.impl, mine.model, tmp_path_factory.mktemp("mine"))
    their_keys, their_config = _saved(run.oracle, theirs.model, tmp_path_factory.mktemp("peft"))
    run.same_keys(dict.fromkeys(my_keys), dict.fromkeys(their_keys), "saved keys with task_type vs peft's")
    run.check(my_config.get("modules_to_save") == their_config.get("modules_to_save"),
              f"saved modules_to_save {my_config.get('modules_to_save')}, peft {their_config.get('modules_to_save')}")
    run.check(run.impl.trainable_parameters(mine.model) == run.oracle.trainable_parameters(theirs.model),
              f"(trainable, total) {run.impl.trainable_parameters(mine.model)}, peft "
              f"{run.oracle.trainable_parameters(theirs.model)}")


@pytest.mark.req("LORA-TASK-002")
@given(data=st.data())
def test_task_forward_takes_labels_and_returns_peft_s_loss(run, device, data):
    case = _draw_task_case(run, data, heads_only=False)
    mine, theirs = run.pair(case)
    labels = labels_for(case.config["task_type"])(torch.Generator().manual_seed(case.inputs_seed), mine.inputs)
    labels = {k: v.to(run.device) for k, v in labels.items()}
    with torch.no_grad():
        found = mine.model(**mine.inputs, **labels)
        expected = theirs.model(**theirs.inputs, **labels)
    loss = getattr(found, "loss", None)
    run.check(loss is not None, f"task_type={case.config['task_type']}: the forward pass with {sorted(labels)} "
                                f"returned no loss")
    run.close(loss, expected.loss, f"loss with {sorted(labels)} vs peft's")


@pytest.mark.req("LORA-TASK-003")
@given(data=st.data())
def test_task_adapter_reloads_with_its_head(run, device, data, tmp_path_factory):
    case = _draw_task_case(run, data, heads_only=True)
    mine = run.adapted(case)
    directory = tmp_path_factory.mktemp("saved")
    _, saved_config = _saved(run.impl, mine.model, directory)
    reloaded = run.impl.load(mine.base(), str(directory))
    run.close(mine.output(reloaded), mine.output(), "reloaded classifier output (the head included)")
    _, config = _saved(run.impl, reloaded, tmp_path_factory.mktemp("again"))
    expected = (saved_config.get("modules_to_save") or []) + TASK_HEADS[case.config["task_type"]]
    run.check(config.get("modules_to_save") == expected,
              f"re-saved modules_to_save {config.get('modules_to_save')}; peft appends the heads on each load: "
              f"{expected}")
