"""IA3, LoHa and LoKr: config defaults and validation, which modules each method takes, and IA3's feedforward rule.
Expected shapes come from the base modules' own sizes by the rules in SPEC.md."""

import json

import pytest

from conformance.engine.harness import PREFIX
from conformance.zoo import models

# peft's defaults for the fields a minimal config leaves out (peft 0.21.2 tuners/{ia3,loha,lokr}/config.py).
DEFAULTS = {"IA3": {"init_ia3_weights": True, "fan_in_fan_out": False},
            "LOHA": {"r": 8, "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                     "init_weights": True},
            "LOKR": {"r": 8, "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                     "init_weights": True, "decompose_both": False, "decompose_factor": -1,
                     "rank_dropout_scale": False}}
# What each method's config must refuse: IA3 feedforward modules outside the targets, a rank of 0.
INVALID = {"IA3": {"feedforward_modules": ["proj"]}, "LOHA": {"r": 0}, "LOKR": {"r": 0}}


def _minimal(method: str) -> dict:
    config = {"peft_type": method, "target_modules": ["fc"]}
    return {**config, "feedforward_modules": []} if method == "IA3" else config


@pytest.mark.parametrize("method", [pytest.param("IA3", marks=pytest.mark.req("IA3-CFG-001"), id="IA3"),
                                    pytest.param("LOHA", marks=pytest.mark.req("LOHA-CFG-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-CFG-001"), id="LOKR")])
def test_defaults_and_validation(run, method, tmp_path):
    case = run.fixed("mlp", _minimal(method))
    run.impl.save(run.wrap(case).model, str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, default in DEFAULTS[method].items():
        run.check(saved.get(field) == default, f"adapter_config.json {field}={saved.get(field)!r}, peft's default "
                                               f"is {default!r}")
    invalid = {**_minimal(method), **INVALID[method]}
    run.raises((TypeError, ValueError), lambda: run.impl.wrap(models.build("mlp"), invalid),
               f"a config with {INVALID[method]}")


def _ia3_shapes(run, config: dict) -> dict:
    case = run.fixed("gpt2-tiny", config)
    return {k.removeprefix(PREFIX): tuple(v.shape) for k, v in run.peft_state(run.wrap(case).model).items()}


@pytest.mark.req("IA3-MATCH-001")
def test_feedforward_modules_match_by_plain_suffix(run):
    base = models.build("gpt2-tiny")
    c_fc, c_attn = base.get_submodule("transformer.h.0.mlp.c_fc"), base.get_submodule("transformer.h.0.attn.c_attn")
    # 'fc' names no module as a target (dotted suffix) but marks c_fc as feedforward (plain suffix).
    shapes = _ia3_shapes(run, {"peft_type": "IA3", "target_modules": ["c_fc", "fc"], "feedforward_modules": ["fc"]})
    found, expected = shapes.get("transformer.h.0.mlp.c_fc.ia3_l"), (1, c_fc.weight.shape[0])
    run.check(found == expected, f"c_fc's vector has shape {found}: feedforward_modules ['fc'] ends c_fc's name, "
                                 f"so it scales the input, shape (1, in) = {expected}")
    shapes = _ia3_shapes(run, {"peft_type": "IA3", "target_modules": ["c_attn", "c_fc"],
                               "feedforward_modules": r".*\.mlp\.c_fc"})
    for key, wanted in (("transformer.h.1.mlp.c_fc.ia3_l", (1, c_fc.weight.shape[0])),
                        ("transformer.h.1.attn.c_attn.ia3_l", (c_attn.weight.shape[1], 1))):
        run.check(shapes.get(key) == wanted, f"{key} has shape {shapes.get(key)}, expected {wanted} (regex rule)")


@pytest.mark.req("IA3-MATCH-002")
def test_ia3_refuses_embeddings(run):
    config = {"peft_type": "IA3", "target_modules": ["embed"], "feedforward_modules": []}
    run.fixed("embedder", config)
    run.raises((TypeError, ValueError), lambda: run.impl.wrap(models.build("embedder"), config),
               "IA3 on an nn.Embedding")


@pytest.mark.parametrize("method", [pytest.param("LOHA", marks=pytest.mark.req("LOHA-MATCH-001"), id="LOHA"),
                                    pytest.param("LOKR", marks=pytest.mark.req("LOKR-MATCH-001"), id="LOKR")])
@pytest.mark.parametrize("model, target", [("gpt2-tiny", "c_attn"), ("embedder", "embed")])
def test_refuses_conv1d_and_embeddings(run, method, model, target):
    config = {"peft_type": method, "target_modules": [target]}
    run.fixed(model, config)
    run.raises((TypeError, ValueError), lambda: run.impl.wrap(models.build(model), config),
               f"{method} on {model}'s {target}")
