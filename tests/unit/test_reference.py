"""reference_impl against upstream peft, on the tiny GPT-2 and small hand-built models; and the behaviours
that only reference_impl promises (scope "reference" in the spec)."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import reference_impl as ref
from reference_impl import save_load
from reference_impl.peft_format import PREFIX

peft = pytest.importorskip("peft")

CONFIGS = {
    "c_attn r4": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "c_attn+c_proj rslora": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], use_rslora=True),
    "all-linear gaussian": dict(r=3, target_modules="all-linear", init_lora_weights="gaussian"),
    "wpe + c_fc, init False": dict(r=4, target_modules=["wpe", "c_fc"], init_lora_weights=False),
    "dora": dict(r=4, target_modules=["c_attn", "c_fc"], use_dora=True),
    "bias lora_only": dict(r=4, target_modules=["c_attn"], bias="lora_only"),
    "modules_to_save": dict(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"]),
    "patterns": dict(r=4, target_modules=["c_attn", "c_proj"], rank_pattern={"c_attn": 2},
                     alpha_pattern={"mlp.c_proj": 32}),
    "layers": dict(r=4, target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern="h"),
    "lora_bias": dict(r=4, target_modules=["c_attn"], lora_bias=True),
}


def _pair(build, config: dict, seed: int = 123):
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**copy.deepcopy(config)))
    torch.manual_seed(seed)
    mine = ref.get_peft_model(build(), ref.LoraConfig(**copy.deepcopy(config)))
    return mine, theirs


def _load_same_values(mine, theirs, seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    values = {k: v + 0.1 * torch.randn(v.shape, generator=generator)
              for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, values)
    ref.set_peft_model_state_dict(mine, values)
    return values


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_same_seed_gives_peft_keys_and_bit_identical_tensors(tiny_gpt2, config):
    mine, theirs = _pair(tiny_gpt2, config)
    mine_sd, their_sd = ref.get_peft_model_state_dict(mine), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine_sd) == sorted(their_sd)
    for key, tensor in their_sd.items():
        tolerance = 1e-6 if key.endswith("lora_magnitude_vector") else 0  # a norm: computed differently
        torch.testing.assert_close(mine_sd[key], tensor, rtol=tolerance, atol=tolerance, msg=key)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_outputs_gradients_and_counts_match_peft(tiny_gpt2, token_ids, config):
    mine, theirs = _pair(tiny_gpt2, config)
    mine.eval(), theirs.eval()
    _load_same_values(mine, theirs)
    mine_out, their_out = mine(input_ids=token_ids).logits, theirs(input_ids=token_ids).logits
    torch.testing.assert_close(mine_out, their_out, rtol=1.3e-6, atol=1e-5)
    mine_out.square().mean().backward(), their_out.square().mean().backward()
    their_params = peft.get_peft_model_state_dict(theirs, state_dict=dict(theirs.named_parameters()))
    for key, param in save_load.adapter_state_dict(mine).items():
        torch.testing.assert_close(param.grad, their_params[key].grad, rtol=1e-4, atol=1e-6, msg=key)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_saved_directories_cross_both_ways(tiny_gpt2, token_ids, config, tmp_path):
    mine, theirs = _pair(tiny_gpt2, config)
    _load_same_values(mine, theirs)
    mine.save_pretrained(tmp_path / "mine")
    theirs.save_pretrained(tmp_path / "peft")
    assert load_file(tmp_path / "mine/adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft/adapter_model.safetensors").keys()
    mine_json = json.loads((tmp_path / "mine/adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert mine_json.keys() == peft_json.keys()
    differing = {k for k in peft_json if k != "peft_version" and _as_set(mine_json[k]) != _as_set(peft_json[k])}
    assert not differing, {k: (mine_json[k], peft_json[k]) for k in differing}
    expected = theirs.eval()(input_ids=token_ids).logits
    into_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "mine")
    into_mine = ref.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(into_peft(input_ids=token_ids).logits, expected, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(into_mine(input_ids=token_ids).logits, expected, rtol=1.3e-6, atol=1e-5)


def _as_set(value):
    return sorted(value) if isinstance(value, list) else value


def test_merge_unmerge_and_unload_on_a_hand_built_model():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()

    x = torch.randn(4, 6)
    pristine = build().state_dict()
    mine, theirs = _pair(build, dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))
    mine.eval(), theirs.eval()
    _load_same_values(mine, theirs)
    adapted = theirs(x)
    torch.testing.assert_close(mine(x), adapted, rtol=0, atol=0)
    mine.merge_adapter()
    torch.testing.assert_close(mine(x), adapted, rtol=1e-5, atol=1e-6)
    mine.unmerge_adapter()
    unloaded = mine.unload()
    assert [type(m) for m in unloaded] == [nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(unloaded.state_dict(), pristine, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("targets, r, trainable, total", [
    (["c_attn"], 4, 147_456, 124_587_264), (["c_attn"], 8, 294_912, 124_734_720),
    (["c_attn", "c_proj"], 8, 811_008, 125_250_816), (["c_attn", "c_proj"], 64, 6_488_064, 130_927_872)])
def test_full_size_gpt2_counts_on_the_meta_device(targets, r, trainable, total):
    # Figures recorded from peft 0.21.2 (research R7.4); peft is run here too.
    from transformers import GPT2Config, GPT2LMHeadModel

    counts = []
    for lib in (ref, peft):
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config())
        counts.append(lib.get_peft_model(model, lib.LoraConfig(r=r, target_modules=targets))
                      .get_nb_trainable_parameters())
    assert counts[0] == counts[1] == (trainable, total)


def test_causal_lm_wrapper_passes_labels_and_falls_through(tiny_gpt2, token_ids):
    model = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    output = model(input_ids=token_ids, attention_mask=torch.ones_like(token_ids), labels=token_ids)
    assert output.loss is not None and output.loss.ndim == 0
    assert model.num_parameters(only_trainable=True) == model.get_nb_trainable_parameters()[0] == 1024


def test_print_trainable_parameters_matches_peft(tiny_gpt2, capsys):
    mine, theirs = _pair(tiny_gpt2, dict(r=4, target_modules=["c_attn"]))
    mine.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == lines[1] == "trainable params: 1,024 || all params: 31,744 || trainable%: 3.2258"


def test_injection_keeps_base_objects_and_unload_returns_them(tiny_gpt2):
    base = tiny_gpt2()
    modules, params = dict(base.named_modules()), {id(p) for p in base.parameters()}
    model = ref.get_peft_model(base, ref.LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    assert model.get_base_model() is base and params <= {id(p) for p in model.parameters()}
    unloaded = model.unload()
    assert unloaded is base and all(modules[n] is m for n, m in unloaded.named_modules())


def test_nothing_matched_names_the_targets_and_lists_modules(tiny_gpt2):
    with pytest.raises(ValueError, match=r"Target modules \['q_proj'\] not found.*transformer\.h\.0\.attn"):
        ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(target_modules=["q_proj"]))


def test_conv1d_coercion_warns_like_peft(tiny_gpt2):
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(target_modules=["c_attn"]))
    assert model.peft_config["default"].fan_in_fan_out is True


@pytest.mark.req("LORA-CFG-007")
def test_caller_config_is_not_mutated(tiny_gpt2):
    config = ref.LoraConfig(target_modules="all-linear")
    before = copy.deepcopy(config)
    ref.get_peft_model(tiny_gpt2(), config)
    assert config == before


@pytest.mark.req("LORA-CFG-008")
@pytest.mark.parametrize("field, value", [("use_qalora", True), ("loftq_config", {"loftq_bits": 4}),
                                          ("layer_replication", [[0, 1]])])
def test_peft_only_features_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ref.LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["c_attn"], field: value})


@pytest.mark.req("LORA-KEYS-004")
def test_injected_model_keys_have_no_prefix(tiny_gpt2):
    model = ref.inject_adapter_in_model(ref.LoraConfig(r=4, target_modules=["c_attn"]), tiny_gpt2())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["c_attn"]), tiny_gpt2())
    keys = sorted(ref.get_peft_model_state_dict(model))
    assert keys == sorted(peft.get_peft_model_state_dict(theirs))
    assert keys[0] == "transformer.h.0.attn.c_attn.lora_A.weight"


@pytest.mark.req("LORA-MERGE-005")
def test_safe_merge_refuses_nan(tiny_gpt2):
    model = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"]))
    model.base_model.model.transformer.h[1].attn.c_attn.lora_B["default"].weight.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        model.merge_adapter(safe_merge=True)


@pytest.mark.req("LORA-LOAD-005")
def test_missing_keys_warn_and_unexpected_keys_pass(tiny_gpt2, tmp_path):
    model = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    missing = sorted(tensors)[0]
    del tensors[missing]
    tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_C.weight"] = torch.zeros(1)
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="Found missing adapter keys") as caught:
        ref.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert any(missing in str(w.message) for w in caught)
    # peft drops the unexpected tensor silently; reference_impl ignores it too, but says so
    assert any("ignoring tensors" in str(w.message) and "lora_C" in str(w.message) for w in caught)


@pytest.mark.req("LORA-MULTI-004")
def test_several_active_adapters_add_up(tiny_gpt2, token_ids):
    mine = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    mine.add_adapter("other", ref.LoraConfig(r=2, lora_alpha=16, target_modules=["c_attn"],
                                             init_lora_weights=False))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=16, target_modules=["c_attn"]))
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, ref.get_peft_model_state_dict(mine, adapter_name=name), name)
    mine.base_model.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    both = mine.eval()(input_ids=token_ids).logits
    torch.testing.assert_close(both, theirs.eval()(input_ids=token_ids).logits, rtol=0, atol=0)
    assert not torch.equal(both, mine.base_model.model(input_ids=token_ids).logits * 0)
    assert mine.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.req("LORA-MULTI-006")
def test_load_adapter_adds_an_inactive_adapter(tiny_gpt2, token_ids, tmp_path):
    source = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    source.save_pretrained(tmp_path)
    model = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=2, target_modules=["c_proj"]))
    before = model.eval()(input_ids=token_ids).logits
    keys = model.load_adapter(tmp_path, "loaded")
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    torch.testing.assert_close(model(input_ids=token_ids).logits, before, rtol=0, atol=0)
    model.set_adapter("loaded")
    torch.testing.assert_close(model(input_ids=token_ids).logits, source.eval()(input_ids=token_ids).logits,
                               rtol=1.3e-6, atol=1e-5)


@pytest.mark.req("LORA-ERR-010")
def test_interrupted_save_leaves_no_loadable_mixture(tiny_gpt2, tmp_path, monkeypatch):
    model = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=4, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()
    other = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(r=2, target_modules=["c_proj"]))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(save_load.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]  # no config: no load
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ref.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    monkeypatch.undo()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean, complete directory again
        ref.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("model_name, config", [
    ("bert-classifier", dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])),
    ("bert-qa", dict(task_type="QUESTION_ANS", r=4, target_modules=["query"], modules_to_save=["pooler"])),
    ("llama", dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "k_proj"], use_dora=True)),
    ("llava", dict(r=4, target_modules=["q_proj", "embed_tokens"])),
])
def test_task_models_match_peft_in_memory_on_disk_and_after_reload(model_name, config, tmp_path):
    from conformance.engine import harness
    from conformance.zoo import models

    mine, theirs = _pair(lambda: models.build(model_name), config)
    values = harness.adapter_values(peft.get_peft_model_state_dict(theirs), seed=7)  # trained-looking values
    peft.set_peft_model_state_dict(theirs, values)
    ref.set_peft_model_state_dict(mine, values)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(mine.state_dict()) == list(theirs.state_dict())
    mine.save_pretrained(tmp_path / "mine")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = [json.loads((tmp_path / who / "adapter_config.json").read_text()) for who in ("mine", "theirs")]
    assert saved[0]["modules_to_save"] == saved[1]["modules_to_save"]
    tensors = [load_file(tmp_path / who / "adapter_model.safetensors") for who in ("mine", "theirs")]
    assert tensors[0].keys() == tensors[1].keys()
    inputs = models.inputs(model_name, 0)
    with torch.no_grad():  # each library loads the other's directory and computes what the writer computed
        for writer, reader, lib in ((mine.eval(), "mine", peft), (theirs.eval(), "theirs", ref)):
            reloaded = lib.PeftModel.from_pretrained(models.build(model_name), tmp_path / reader).eval()
            torch.testing.assert_close(models.output_tensor(reloaded(**inputs)),
                                       models.output_tensor(writer(**inputs)))


def test_get_peft_model_state_dict_maps_the_state_dict_it_is_given(tiny_gpt2):
    """As in peft: given the model's own state dict (keep_vars=True: live tensors), its tensors come back under the
    saved keys; the keys equal peft's for the same call."""
    import peft

    config = dict(r=4, target_modules=["c_attn"], use_dora=True)
    mine = ref.get_peft_model(tiny_gpt2(), ref.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**config))
    live = mine.state_dict(keep_vars=True)
    mapped = ref.get_peft_model_state_dict(mine, state_dict=live)
    assert set(mapped) == set(peft.get_peft_model_state_dict(theirs, state_dict=theirs.state_dict(keep_vars=True)))
    names = {id(t): n for n, t in live.items()}
    assert all(isinstance(t, nn.Parameter) and t is live[names[id(t)]] for t in mapped.values())
    assert set(mapped) == set(ref.get_peft_model_state_dict(mine))
    partial = {k: v for k, v in live.items() if "lora_B" not in k}
    assert not any("lora_B" in k for k in ref.get_peft_model_state_dict(mine, state_dict=partial))
