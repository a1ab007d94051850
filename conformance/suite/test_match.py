"""MATCH: which modules get an adapter. Expected sets come from the documented rules applied to the model's
module names (and, in test_targets_match_peft, from peft itself)."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, harness, models
from conformance.strategies import cases

ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)


def _adaptable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n and (isinstance(m, ADAPTABLE) or type(m).__name__ == "Conv1D")}


def _targeted(impl, model_name: str, config: dict, device: str) -> set[str]:
    model = impl.wrap(models.build(model_name, 0, device), config)
    return harness.adapted_modules(impl.adapter_state_dict(model))


def _list_match(name: str, entries) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


@pytest.mark.req("LORA-MATCH-002")
@given(data=st.data())
def test_list_entries_match_names_and_dotted_suffixes(impl, device, data):
    case = data.draw(cases(impl.capabilities, single_layer=False, extras=False), label="case")
    entries = list(case.config["target_modules"]) if isinstance(case.config["target_modules"], list) else ["c_attn"]
    entries.append("no_such_module")  # ignored as long as another entry matches
    modules = _adaptable(models.build(case.model))
    expected = {n for n in modules if _list_match(n, entries)}
    found = _targeted(impl, case.model, {"target_modules": entries}, device) if expected else expected
    checks.check(found == expected, "LORA-MATCH-002", f"targets {entries}: adapted {sorted(found)}, "
                                                       f"expected {sorted(expected)}")


@pytest.mark.req("LORA-MATCH-001", "LORA-MATCH-003")
@pytest.mark.needs("regex_targets")
@given(data=st.data())
def test_regex_targets_and_exclusions(impl, device, data):
    model_name = data.draw(st.sampled_from(["gpt2-tiny", "mlp"]), label="model")
    modules = sorted(_adaptable(models.build(model_name)))
    chosen = data.draw(st.lists(st.sampled_from(modules), min_size=2, max_size=4, unique=True), label="chosen")
    pattern = "|".join(re.escape(n) for n in chosen)  # full names: fullmatch needs the whole name
    excluded = data.draw(st.sampled_from(chosen), label="excluded")
    config = {"target_modules": pattern, "exclude_modules": [excluded.rsplit(".", 1)[-1]]}
    expected = {n for n in modules if re.fullmatch(pattern, n) and not _list_match(n, config["exclude_modules"])}
    if not expected:
        return  # every chosen module shares the excluded suffix; MATCH-006 covers "nothing targeted"
    found = _targeted(impl, model_name, config, device)
    checks.check(found == expected, "LORA-MATCH-001", f"{config}: adapted {sorted(found)}, "
                                                       f"expected {sorted(expected)}")
    leaf = chosen[0].rsplit(".", 1)[-1]
    if leaf not in modules:  # as a str, a leaf name is a regex for the whole name: it matches nothing here
        with pytest.raises(ValueError):
            _targeted(impl, model_name, {"target_modules": leaf}, device)


@pytest.mark.req("LORA-MATCH-004")
@pytest.mark.needs("regex_targets")
@pytest.mark.parametrize("model_name", ["gpt2-tiny", "mlp", "embedder"])
def test_all_linear(impl, model_name):
    base = models.build(model_name)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    expected = {n for n, m in base.named_modules()
                if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head}
    found = _targeted(impl, model_name, {"target_modules": "all-linear"}, "cpu")
    checks.check(found == expected, "LORA-MATCH-004", f"'all-linear' on {model_name}: adapted {sorted(found)}, "
                                                       f"expected {sorted(expected)}")


@pytest.mark.req("LORA-MATCH-005")
@pytest.mark.needs("layers")
@given(data=st.data())
def test_layers_to_transform(impl, device, data):
    model_name = data.draw(st.sampled_from(["gpt2-tiny", "gpt2-headless", "mlp"]), label="model")
    zoo = models.ZOO[model_name]
    entries = data.draw(st.lists(st.sampled_from(zoo.in_blocks), min_size=1, max_size=2, unique=True))
    layers = data.draw(st.lists(st.sampled_from(zoo.layers), min_size=1, unique=True), label="layers")
    config = {"target_modules": entries, "layers_to_transform": layers, "layers_pattern": zoo.layers_pattern}
    index = re.compile(rf"(?:^|.*?\.){zoo.layers_pattern}\.(\d+)\.")
    expected = {n for n in _adaptable(models.build(model_name)) if _list_match(n, entries) and (
        n in entries or (index.match(n) and int(index.match(n).group(1)) in layers))}
    found = _targeted(impl, model_name, config, device)
    checks.check(found == expected, "LORA-MATCH-005", f"{config}: adapted {sorted(found)}, "
                                                       f"expected {sorted(expected)}")


@pytest.mark.req("LORA-MATCH-006")
@pytest.mark.parametrize("targets", [["no_such_module"], ["_attn"], [".*c_attn"]])
def test_nothing_targeted_is_an_error(impl, targets):
    # list entries are names, never regexes: "_attn" needs a dot before it, ".*c_attn" is taken literally
    with pytest.raises(ValueError):
        impl.wrap(models.build("gpt2-tiny"), {"target_modules": targets})


@pytest.mark.req("LORA-MATCH-007")
@pytest.mark.parametrize("model_name, target", [("gpt2-tiny", "ln_1"), ("mlp", "norm"), ("gpt2-tiny", "attn")])
def test_unsupported_module_type_is_an_error(impl, model_name, target):
    with pytest.raises(ValueError):
        impl.wrap(models.build(model_name), {"target_modules": [target]})


@pytest.mark.req("LORA-MATCH-008")
@pytest.mark.needs("conv1d")
def test_gpt2_default_targets(impl):
    found = _targeted(impl, "gpt2-tiny", {"r": 4}, "cpu")
    expected = {n for n in _adaptable(models.build("gpt2-tiny")) if n.endswith(".c_attn")}
    checks.check(found == expected, "LORA-MATCH-008", f"target_modules=None adapted {sorted(found)}")


@pytest.mark.req("LORA-MATCH-009")
@pytest.mark.needs("patterns")
@given(data=st.data())
def test_rank_pattern_first_match_wins(impl, device, data):
    entries = ["c_attn", "c_proj"]
    first, second = data.draw(st.integers(1, 6), label="first r"), data.draw(st.integers(1, 6), label="second r")
    pattern = {"c_attn": first, r"h\.0\.attn\.c_attn": second, r"mlp\.c_proj": second}
    if data.draw(st.booleans(), label="reversed"):
        pattern = dict(reversed(list(pattern.items())))
    model = impl.wrap(models.build("gpt2-tiny", 0, device), {"target_modules": entries, "r": 8,
                                                           "rank_pattern": pattern})
    ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0]
             for k, v in impl.adapter_state_dict(model).items() if k.endswith("lora_A.weight")}
    for name, r in ranks.items():
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
        expected = pattern[key] if key else 8
        checks.check(r == expected, "LORA-MATCH-009", f"rank_pattern {pattern}: {name} has r={r}, "
                                                       f"expected {expected} (first matching key {key!r})")


@pytest.mark.req("LORA-MATCH-010", "LORA-MTS-002")
@pytest.mark.needs("modules_to_save", "linear")
def test_modules_to_save_are_not_adapted(impl):
    model = impl.wrap(models.build("mlp"), {"target_modules": ["fc", "head"], "modules_to_save": ["head"]})
    keys = set(impl.adapter_state_dict(model))
    checks.check(harness.adapted_modules(keys) == {"blocks.0.fc", "blocks.1.fc"}, "LORA-MATCH-010",
                 f"adapted {sorted(harness.adapted_modules(keys))} with modules_to_save=['head']")
    expected = {"base_model.model.head.weight", "base_model.model.head.bias"}
    checks.check(expected <= keys and not any("modules_to_save" in k or "original_module" in k for k in keys),
                 "LORA-MTS-002", f"keys {sorted(keys)}: expected {sorted(expected)} without wrapper infixes")


@pytest.mark.req("LORA-MATCH-001", "LORA-MATCH-002", "LORA-MATCH-003", "LORA-MATCH-005", "LORA-MATCH-009")
@pytest.mark.oracle
@given(data=st.data())
def test_targets_match_peft(impl, oracle, device, data):
    case = data.draw(cases(impl.capabilities), label="case")
    mine = harness.adapted_modules(harness.initial_state(impl, case, device))
    theirs = harness.adapted_modules(harness.initial_state(oracle, case, device))
    checks.check(mine == theirs, "LORA-MATCH-002", f"adapted {sorted(mine)}, peft adapted {sorted(theirs)}")
