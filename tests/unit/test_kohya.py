"""The kohya layout (conformance/adapter_kit/kohya.py) against peft and diffusers: a file written from peft adapters
reads back as the same adapters, computes what they compute, and diffusers' loader applies it with the ranks and
scalings the file defines wherever diffusers reads per-module alphas right (docs/consumer-findings.md: where not)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conformance.adapter_kit import diffusers_layout, diffusion_check, kohya
from conformance.engine import harness
from conformance.engine.strategies import Case
from conformance.zoo import models
from reference_impl.peft_format import PREFIX

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET = {"r": 4, "lora_alpha": 8, "rank_pattern": {"conv1": 2}, "alpha_pattern": {"conv2": 16, "ff.net.2": 2},
        "target_modules": ["to_q", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2", "time_emb_proj"]}
TEXT = {"r": 4, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"fc1": 12},
        "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]}


def _peft_adapter(zoo: str, config: dict):
    from conformance.drivers.peft import PeftDriver

    return harness.pair(PeftDriver(), PeftDriver(), Case(zoo, config), "cpu")[1]


@pytest.fixture(scope="module")
def adapters():
    return {"unet": _peft_adapter("sd-unet", UNET), "text_encoder": _peft_adapter("clip-text", TEXT)}


def _bases():
    return {"unet": models.build("sd-unet"), "text_encoder": models.build("clip-text")}


def _state(adapters):
    return kohya.write({"unet": (adapters["unet"].values, UNET),
                        "text_encoder": (adapters["text_encoder"].values, TEXT)})


def test_the_written_names_are_kohya_s(adapters):
    state = _state(adapters)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in state
    # kohya names CLIP's modules as transformers 4 does (text_model.encoder...), whatever transformers is installed
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in state
    conv = state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = state["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert conv.shape == (2, 8, 3, 3) and up.shape == (8, 2, 1, 1)
    # rsLoRA has no kohya form: alpha is written so that alpha / r is peft's alpha / sqrt(r)
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == pytest.approx(4 / 2 * 4)


@pytest.mark.req("LORA-KOHYA-001", "LORA-KOHYA-002")
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_a_written_file_reads_back_as_the_adapter_it_came_from(adapters, component):
    """Same tensors, and loaded into peft with the config read, the same output bit for bit."""
    values, config = kohya.read(_state(adapters), _bases())[component]
    original = adapters[component]
    assert values.keys() == original.values.keys()
    assert all(torch.equal(values[k], original.values[k]) for k in values)
    model = peft.get_peft_model(models.build(original.case.model), peft.LoraConfig(**config))
    peft.set_peft_model_state_dict(model, values)
    assert torch.equal(original.output(model.eval()), original.output())


@pytest.mark.req("LORA-KOHYA-001")
def test_a_module_without_alpha_computes_with_scaling_one(adapters):
    state = {k: v for k, v in _state(adapters).items() if not k.endswith(kohya.ALPHA)}
    scalings = diffusion_check.scalings(kohya.read(state, _bases()))
    assert {s for component in scalings.values() for _, s in component.values()} == {1.0}


def test_a_name_that_fits_no_module_of_the_base_is_an_error_naming_it(adapters):
    state = dict(_state(adapters))
    state["lora_unet_down_blocks_9_conv1.lora_down.weight"] = torch.zeros(2, 8, 3, 3)
    state["lora_unet_down_blocks_9_conv1.lora_up.weight"] = torch.zeros(8, 2, 1, 1)
    with pytest.raises(ValueError, match="lora_unet_down_blocks_9_conv1: matches no Linear or Conv layer of the unet"):
        kohya.read(state, _bases())


@pytest.mark.parametrize("key, message", [
    ("lora_unet_x.lora_down.weight", "has no lora_unet_x.lora_up.weight"),
    ("lora_vae_x.lora_down.weight", "expected a name starting with one of"),
    ("lora_unet_x.hada_w1_a", r"LoHa \(LyCORIS\), not a kohya LoRA tensor"),
    ("lora_unet_x.dora_scale", "diffusers drops it"),
])
def test_what_is_not_a_kohya_lora_is_refused_by_name(key, message):
    with pytest.raises(ValueError, match=message):
        kohya.read({key: torch.zeros(1)}, _bases())


@pytest.mark.parametrize("config, field", [({"use_dora": True}, "use_dora"), ({"lora_bias": True}, "lora_bias"),
                                           ({"modules_to_save": ["conv_out"]}, "modules_to_save")])
def test_what_kohya_cannot_hold_is_refused_when_writing(config, field):
    with pytest.raises(ValueError, match=f"unet: {field}="):
        kohya.write({"unet": ({}, {"r": 4, **config})})


def test_an_embedding_adapter_is_refused_when_writing():
    with pytest.raises(ValueError, match="LoRA on an embedding"):
        kohya.write({"text_encoder": ({f"{PREFIX}embeddings.token_embedding.lora_embedding_A": None}, {})})


def _differing(file, adapters, bases):
    """Modules whose (rank, scaling) diffusers' load_lora_weights sets otherwise than the adapters define them."""
    from conformance.zoo import diffusion

    loaded = diffusion_check.loaded_by_diffusers(file, diffusion.pipeline(copy.deepcopy(bases["unet"]),
                                                                          copy.deepcopy(bases["text_encoder"])))
    wanted = diffusion_check.scalings(adapters)
    assert {c: set(paths) for c, paths in loaded.items()} == {c: set(paths) for c, paths in wanted.items()}
    return [(c, p, loaded[c][p], wanted[c][p]) for c in wanted for p in wanted[c]
            if loaded[c][p][0] != wanted[c][p][0] or abs(loaded[c][p][1] - wanted[c][p][1]) > 1e-6]


def test_diffusers_applies_uniform_alphas_and_per_module_ranks_as_the_file_defines(tmp_path):
    """Where diffusers 0.42.1 reads kohya files right: one alpha per component (or per-module alphas on convolutions)
    and ranks that differ per module. Its departures are the corpus' diffusion cases (expectations/consumers/)."""
    unet = {**UNET, "alpha_pattern": {"conv2": 16}}  # a per-module alpha on a convolution: read right
    text = {k: v for k, v in TEXT.items() if k != "alpha_pattern"}
    state = kohya.write({"unet": (_peft_adapter("sd-unet", unet).values, unet),
                         "text_encoder": (_peft_adapter("clip-text", text).values, text)})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lora.safetensors")
    bases = _bases()
    differing = _differing(tmp_path / "lora.safetensors", kohya.read(state, bases), bases)
    assert not differing, differing[:3]


def _diffusers_file(adapters, folder, with_config: bool):
    """The adapters saved by diffusers' own save_lora_weights, their configs in the file's metadata or not."""
    from diffusers import StableDiffusionPipeline

    layers = {c: {k.removeprefix(PREFIX): v.contiguous() for k, v in adapters[c].values.items()} for c in adapters}
    configs = {"unet_lora_adapter_metadata": dict(UNET), "text_encoder_lora_adapter_metadata": dict(TEXT)}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"],
                                              **(configs if with_config else {}))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("with_config", [True, False])
def test_a_diffusers_file_reads_as_its_metadata_says_and_diffusers_loads_it_so(adapters, tmp_path, with_config):
    """diffusers' layout: with the configs in its metadata, the file reads back as the adapters it came from
    (rsLoRA and per-module alphas included) and diffusers applies each module with their rank and scaling; without
    them the file does not say alpha, and both read alpha = r."""
    file = _diffusers_file(adapters, tmp_path, with_config)
    with safe_open(file, "pt") as opened:
        read = diffusers_layout.read(load_file(file), opened.metadata(), _bases())
    for component, (values, config) in read.items():
        original = adapters[component]
        assert values.keys() == original.values.keys()
        model = peft.get_peft_model(models.build(original.case.model), peft.LoraConfig(**config))
        peft.set_peft_model_state_dict(model, values)
        assert torch.equal(original.output(model.eval()), original.output()) == with_config
    scalings = {s for c in diffusion_check.scalings(read).values() for _, s in c.values()}
    assert (scalings == {1.0}) != with_config
    assert not _differing(file, read, _bases())


def test_a_diffusers_file_naming_no_module_of_the_base_is_an_error_naming_it(adapters, tmp_path):
    state = load_file(_diffusers_file(adapters, tmp_path, True))
    state["unet.down_blocks.9.resnets.0.conv1.lora_A.weight"] = torch.zeros(2, 8, 3, 3)
    with pytest.raises(ValueError, match=r"unet\.down_blocks\.9\.resnets\.0\.conv1\.lora_A\.weight: .* no Linear"):
        diffusers_layout.read(state, {}, _bases())


def test_check_adapter_says_what_diffusers_does_with_a_kohya_file(adapters, tmp_path):
    file = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in _state(adapters).items()}, file)
    done = subprocess.run([sys.executable, "-m", "conformance.cli", "check-adapter", str(file), "--base", "sd-tiny",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    findings = {f["code"]: f["message"] for f in json.loads(done.stdout)["findings"]}
    assert "reference_impl and peft compute the file's adapter identically" in findings["numbers.peft"]
    # the per-module alpha on ff.net.2 (a Linear of the UNet's transformer blocks) and fc1 (the text encoder's MLP)
    assert "the file says" in findings["diffusers.scaling"]


def test_check_adapter_says_what_diffusers_does_with_a_diffusers_file(adapters, tmp_path):
    file = _diffusers_file(adapters, tmp_path, with_config=False)
    done = subprocess.run([sys.executable, "-m", "conformance.cli", "check-adapter", str(file), "--base", "sd-tiny",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    findings = {f["code"]: f["message"] for f in json.loads(done.stdout)["findings"]}
    assert "reference_impl and peft compute the file's adapter identically" in findings["numbers.peft"]
    assert "does not say alpha" in findings["alpha.missing"] and "format.foreign" not in findings
    assert "with the file's rank and scaling" in findings["diffusers.same"]
