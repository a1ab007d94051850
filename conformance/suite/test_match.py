"""MATCH: which modules get an adapter. Expected sets come from the documented rules applied to the model's
module names (and, in test_targets_match_peft, from peft itself). Every model and target comes from the driver's
scope."""

import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.engine import harness, scope
from conformance.engine.strategies import Case
from conformance.zoo import models
from reference_impl.modules_to_save import CONTAINERS
from reference_impl.targeting import pattern_value


def _adaptable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n and scope.layer_kind(m) is not None}


def _targeted(run, case: Case) -> set[str]:
    return harness.adapted_modules(run.initial_keys(case))


def _list_match(name: str, entries) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


@pytest.mark.req("LORA-MATCH-002")
@given(data=st.data())
def test_list_entries_match_names_and_dotted_suffixes(run, device, data):
    case = run.draw(data, single_layer=False, extras=False)
    in_scope = scope.targets_in_scope(run.impl, case.model)
    chosen = case.config["target_modules"] if isinstance(case.config["target_modules"], list) else in_scope
    # Entries that must match nothing: an absent name, and other targets without their first letter ("_attn"):
    # a suffix without its dot boundary.
    decoys = [t[1:] for t in in_scope if t not in chosen and len(t) > 1]
    entries = [*chosen, *decoys, "no_such_module"]
    case = case._replace(config={"target_modules": entries})
    run.within_scope(case)
    expected = {n for n in _adaptable(models.build(case.model)) if _list_match(n, entries)}
    found = _targeted(run, case)
    run.check(found == expected, f"targets {entries}: adapted {sorted(found)}, expected {sorted(expected)}")


@pytest.mark.req("LORA-MATCH-001", "LORA-MATCH-003")
@given(data=st.data())
def test_regex_targets_and_exclusions(run, device, data):
    case = run.draw(data, single_layer=False, extras=False)
    modules = sorted(scope.targeted(models.build(case.model), {"target_modules": scope.targets_in_scope(
        run.impl, case.model)}))
    chosen = data.draw(st.lists(st.sampled_from(modules), min_size=1, max_size=4, unique=True), label="chosen")
    pattern = "|".join(re.escape(n) for n in chosen)  # full names: fullmatch needs the whole name
    regex_case = run.admit(case._replace(config={"target_modules": pattern}))
    found = _targeted(run, regex_case)
    run.check(found == set(chosen), f"target_modules={pattern!r}: adapted {sorted(found)}, expected {sorted(chosen)}",
              req="LORA-MATCH-001")
    excluded = data.draw(st.sampled_from(chosen), label="excluded").rsplit(".", 1)[-1]
    expected = {n for n in chosen if not _list_match(n, [excluded])}
    if expected:  # every chosen module may share the excluded suffix; LORA-MATCH-006 covers "nothing targeted"
        exclusion = regex_case._replace(config={"target_modules": pattern, "exclude_modules": [excluded]})
        run.within_scope(exclusion)
        found = _targeted(run, exclusion)
        run.check(found == expected, f"exclude_modules=[{excluded!r}]: adapted {sorted(found)}, expected "
                                     f"{sorted(expected)}", req="LORA-MATCH-003")
    leaf = chosen[0].rsplit(".", 1)[-1]
    if leaf not in modules:  # as a str, a leaf name is a regex for the whole name: it matches nothing here
        run.raises(ValueError, lambda: run.wrap(regex_case._replace(config={"target_modules": leaf})),
                   f"target_modules={leaf!r} (a regex matching no full name)", req="LORA-MATCH-001")


@pytest.mark.req("LORA-MATCH-004")
@pytest.mark.parametrize("model_name", ["gpt2-tiny", "mlp", "embedder"])
def test_all_linear(run, model_name):
    case = run.fixed(model_name, {"target_modules": "all-linear"})
    base = models.build(model_name)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    expected = {n for n, m in base.named_modules() if scope.layer_kind(m) in ("linear", "conv1d") and m is not head}
    found = _targeted(run, case)
    run.check(found == expected, f"'all-linear' on {model_name}: adapted {sorted(found)}, expected {sorted(expected)}")


@pytest.mark.req("LORA-MATCH-005")
@given(data=st.data())
def test_layers_to_transform(run, device, data):
    layered = [m for m in scope.models_in_scope(run.impl) if models.ZOO[m].layers
               and set(models.ZOO[m].in_blocks) & set(scope.targets_in_scope(run.impl, m))]
    if not layered:
        pytest.skip(f"not applicable: no zoo model with numbered blocks is in {run.impl.name}'s scope")
    zoo = models.ZOO[data.draw(st.sampled_from(layered), label="model")]
    in_scope = sorted(set(zoo.in_blocks) & set(scope.targets_in_scope(run.impl, zoo.name)))
    entries = data.draw(st.lists(st.sampled_from(in_scope), min_size=1, max_size=2, unique=True), label="entries")
    layers = data.draw(st.lists(st.sampled_from(zoo.layers), min_size=1, unique=True), label="layers")
    case = run.admit(Case(zoo.name, {"target_modules": entries, "layers_to_transform": layers,
                                     "layers_pattern": zoo.layers_pattern}))
    index = re.compile(rf"(?:^|.*?\.){zoo.layers_pattern}\.(\d+)\.")
    expected = {n for n in _adaptable(models.build(zoo.name)) if _list_match(n, entries) and (
        n in entries or (index.match(n) and int(index.match(n).group(1)) in layers))}
    found = _targeted(run, case)
    run.check(found == expected, f"{case.config}: adapted {sorted(found)}, expected {sorted(expected)}")


NOTHING_TARGETED = {
    "absent name": lambda target: ["no_such_module"],
    "suffix without a dot": lambda target: [target[1:]],  # "_attn" does not match "h.0.attn.c_attn"
    "regex in a list": lambda target: [".*" + target],  # list entries are names, taken literally
}


@pytest.mark.req("LORA-MATCH-006")
@pytest.mark.parametrize("entries", NOTHING_TARGETED.values(), ids=NOTHING_TARGETED.keys())
def test_nothing_targeted_is_an_error(run, entries):
    model_name, target = run.fixed_target()
    run.fixed(model_name, {"target_modules": [target]})
    config = {"target_modules": entries(target)}
    matched = {n for n in _adaptable(models.build(model_name)) if _list_match(n, config["target_modules"])}
    run.require(not matched, "LORA-MATCH-006", f"suite bug: {config} matches {sorted(matched)} in {model_name}")
    run.raises(ValueError, lambda: run.impl.wrap(models.build(model_name), config), f"wrapping with {config}")


UNADAPTABLE = {
    "a normalisation layer": lambda m: isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)),
    "a block of layers": lambda m: scope.layer_kind(m) is None and any(True for _ in m.children()),
}


@pytest.mark.req("LORA-MATCH-007")
@pytest.mark.parametrize("kind", UNADAPTABLE.values(), ids=UNADAPTABLE.keys())
def test_unsupported_module_type_is_an_error(run, kind):
    model_name, target = run.fixed_target()
    run.fixed(model_name, {"target_modules": [target]})
    base = models.build(model_name)
    names = [n for n, m in base.named_modules() if n and kind(m)]
    if not names:
        pytest.skip(f"not applicable: {model_name} has no such module")
    run.raises(ValueError, lambda: run.impl.wrap(base, {"target_modules": [names[0]]}),
               f"targeting {names[0]} ({type(base.get_submodule(names[0])).__name__})")


@pytest.mark.req("LORA-MATCH-008")
def test_gpt2_default_targets(run):
    found = _targeted(run, run.fixed("gpt2-tiny", {"r": 4}))
    expected = {n for n in _adaptable(models.build("gpt2-tiny")) if n.endswith(".c_attn")}
    run.check(found == expected, f"target_modules=None adapted {sorted(found)}")


def _ranks(state: dict) -> dict[str, int]:
    return {k.split(".lora_A")[0].removeprefix(harness.PREFIX): v.shape[0]
            for k, v in state.items() if k.endswith("lora_A.weight")}


@pytest.mark.req("LORA-MATCH-009")
@given(data=st.data())
def test_rank_pattern_keys_are_suffix_regexes(run, device, data):
    case = run.draw(data, single_layer=False, kinds={"linear", "conv1d"}, extras=False)
    paths = sorted(_targeted(run, case))
    path = data.draw(st.sampled_from(paths), label="module")
    key = data.draw(st.sampled_from(sorted({".".join(path.split(".")[i:]) for i in range(path.count(".") + 1)})),
                    label="key")  # a dotted suffix of the module's name, the full name included
    r = data.draw(st.integers(1, 6), label="pattern r")
    case = run.admit(case._replace(config={**case.config, "r": 8, "rank_pattern": {re.escape(key): r}}))
    for name, found in _ranks(run.initial_state(case)).items():
        expected = r if re.match(rf"(.*\.)?({re.escape(key)})$", name) else 8
        run.check(found == expected, f"rank_pattern {{{key!r}: {r}}}: {name} has r={found}, expected {expected}")


@pytest.mark.req("LORA-MATCH-012")
@given(data=st.data())
def test_first_matching_rank_key_wins(run, device, data):
    case = run.draw_overlapping_patterns(data)
    pattern = case.config["rank_pattern"]
    for name, found in _ranks(run.initial_state(case)).items():
        expected = pattern_value(name, pattern, case.config["r"])
        run.check(found == expected, f"rank_pattern {pattern}: {name} has r={found}, expected {expected} (the first "
                                     "matching key)")


@pytest.mark.req("LORA-MATCH-012")
@given(data=st.data())
def test_first_matching_alpha_key_wins(run, device, data):
    mine, theirs = run.pair(run.draw_overlapping_patterns(data))
    run.close(mine.output(), theirs.output(), f"output with alpha_pattern {mine.case.config['alpha_pattern']} vs "
                                              "peft's")


@pytest.mark.req("LORA-MATCH-010", "LORA-MTS-002")
@given(data=st.data())
def test_modules_to_save_are_not_adapted(run, device, data):
    case = run.draw(data, single_layer=False, extras=False)
    names = scope.targets_in_scope(run.impl, case.model)
    if len(names) < 2:
        pytest.skip(f"not applicable: {case.model} has fewer than two targets in {run.impl.name}'s scope")
    saved, other = data.draw(st.permutations(names), label="targets")[:2]
    case = run.admit(case._replace(config={"target_modules": [saved, other], "modules_to_save": [saved]}))
    base = models.build(case.model)
    # peft matches modules_to_save without a dot boundary and refuses containers: "k" names T5's "encoder.block"
    assume(not any(isinstance(m, CONTAINERS) for n, m in base.named_modules() if n.endswith(saved)))
    saved_modules = {n for n in _adaptable(base) if n.endswith(saved)}
    adapted_after = {n for n in _adaptable(base) if _list_match(n, [other]) and n not in saved_modules}
    if not adapted_after:
        return  # `other` lies inside `saved` (or is it): nothing would be adapted; LORA-MATCH-006 covers that
    keys = run.initial_keys(case)
    found = harness.adapted_modules(keys)
    run.check(not found & saved_modules and found == adapted_after,
              f"adapted {sorted(found)} with modules_to_save={[saved]}, expected {sorted(adapted_after)}",
              req="LORA-MATCH-010")
    expected = {f"{harness.PREFIX}{n}" for n, _ in base.named_parameters() if n.rsplit(".", 1)[0] in saved_modules}
    run.check(expected <= keys and not any("modules_to_save" in k or "original_module" in k for k in keys),
              f"keys {sorted(keys)[:8]}: expected {sorted(expected)[:6]} without wrapper infixes", req="LORA-MTS-002")


@pytest.mark.req("LORA-MATCH-001", "LORA-MATCH-002", "LORA-MATCH-005")
@given(data=st.data())
def test_targets_match_peft(run, device, data):
    case = run.draw(data)
    theirs = harness.adapted_modules(run.initial_keys(case, run.oracle))
    mine = harness.adapted_modules(run.initial_keys(case))
    message = f"adapted {sorted(mine)}, peft adapted {sorted(theirs)}"
    if isinstance(case.config["target_modules"], str):  # the assertion is bound to the rule the draw exercises
        run.check(mine == theirs, message, req="LORA-MATCH-001")
    elif case.config.get("layers_to_transform") is not None:
        run.check(mine == theirs, message, req="LORA-MATCH-005")
    else:
        run.check(mine == theirs, message, req="LORA-MATCH-002")
