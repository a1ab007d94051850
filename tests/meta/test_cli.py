"""The peft-conformance command: check-adapter, fixtures, spec, compare, run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conformance import golden, spec
from conformance.cli import app
from conformance.zoo import models
from reference_impl.peft_format import PREFIX
from tests.conftest import ROOT

runner = CliRunner()
CASE = "v1/cases/r4-c_attn/adapter"


@pytest.fixture
def adapter(tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(golden.root() / CASE, target)
    return target


def _rewrite(adapter, change):
    path = adapter / "adapter_model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


def test_check_adapter_accepts_peft_s_own_directory(adapter):
    result = runner.invoke(app, ["check-adapter", str(adapter)])
    assert result.exit_code == 0, result.output
    assert "outputs differ by at most 0" in result.output and "OK" in result.output


@pytest.mark.parametrize("damage, message", [
    (lambda t: {k: v.T.contiguous() if "lora_B" in k else v for k, v in t.items()},
     "shape (4, 96), peft expects (96, 4) for r=4 (the factor is transposed"),
    (lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()}, "keys keep the adapter name"),
    (lambda t: {}, "holds no tensors"),
    (lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()}, f"keys without the '{PREFIX}' prefix"),
])
def test_check_adapter_names_the_problem(adapter, damage, message):
    _rewrite(adapter, damage)
    result = runner.invoke(app, ["check-adapter", str(adapter)])
    assert result.exit_code == 1 and message in result.output, result.output


def test_check_adapter_catches_scale_written_for_alpha(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["scale"] = config.pop("lora_alpha") / config["r"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["check-adapter", str(adapter), "--json"])
    assert result.exit_code == 1
    findings = json.loads(result.output)["findings"]
    assert any(f["code"] == "config.scale" and "lora_alpha = s * r" in f["message"] for f in findings)


def test_check_adapter_sees_targets_without_tensors(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn", "c_fc"]}))
    result = runner.invoke(app, ["check-adapter", str(adapter)])
    assert result.exit_code == 1 and "selects 'transformer.h.0.mlp.c_fc' but the file has no tensors" in result.output


@pytest.mark.parametrize("case, base", [("moe-target-parameters", "moe"), ("multihead-attention", "attention-net"),
                                        ("qwen2-tied-trainable-tokens", "qwen2-tied")])
def test_check_adapter_knows_the_rest_of_peft_s_lora(case, base, tmp_path):
    """target_parameters, nn.MultiheadAttention and trainable tokens: peft's own files pass; a transposed expert
    factor, a missing out_proj factor, a token delta of the wrong size are named."""
    source = golden.root() / "v3" / "cases" / case / "adapter"
    result = runner.invoke(app, ["check-adapter", str(source), "--base", base])
    assert result.exit_code == 0, result.output
    shutil.copytree(source, tmp_path / "broken")
    tensors = load_file(source / "adapter_model.safetensors")
    key = {"moe": f"{PREFIX}experts.lora_A.weight", "attention-net": f"{PREFIX}blocks.0.attn.lora_B.weight",
           "qwen2-tied": f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta"}[base]
    if base == "moe":
        tensors[key] = tensors[key].T.contiguous()
    elif base == "attention-net":
        del tensors[f"{PREFIX}blocks.0.attn.base_layer.out_proj.lora_A.weight"]
    else:
        tensors[key] = tensors[key][:2].contiguous()
    save_file(tensors, tmp_path / "broken" / "adapter_model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["check-adapter", str(tmp_path / "broken"), "--base", base])
    expected = {"moe": "shape.transposed", "attention-net": "keys.missing", "qwen2-tied": "shape.mismatch"}[base]
    assert result.exit_code == 1 and expected in result.output, result.output


@pytest.mark.parametrize("case", ["ia3-gpt2-feedforward", "loha-llama"])
def test_check_adapter_says_it_checks_lora_only(case):
    """An IA3 / LoHa / LoKr directory gets one clear error, not a list of LoRA fields it lacks."""
    result = runner.invoke(app, ["check-adapter", str(golden.root() / "v4" / "cases" / case / "adapter")])
    assert result.exit_code == 1 and "config.method" in result.output and "LoRA adapters only" in result.output
    assert result.output.count("ERROR") == 1 and "WARNING" not in result.output, result.output


def test_check_adapter_says_a_missing_directory_is_missing(tmp_path):
    result = runner.invoke(app, ["check-adapter", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "nowhere: no such file or directory" in result.output
    assert result.output.count("ERROR") == 1


def _mlx(folder):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {
        "rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["c_attn"]}}))
    save_file({"transformer.h.0.attn.c_attn.lora_a": torch.zeros(32, 4)}, folder / "adapters.safetensors")


def _kohya(folder):
    folder.mkdir()
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}, folder / "my_lora.safetensors",
              metadata={"ss_network_module": "networks.lora"})


def _adapterhub(folder):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"config": {"architecture": "lora", "r": 8},
                                                            "model_class": "GPT2LMHeadModel", "name": "mine"}))
    (folder / "pytorch_adapter.bin").write_bytes(b"not read")


def _diffusers(folder):
    folder.mkdir()
    save_file({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 32)},
              folder / "pytorch_lora_weights.safetensors")


def _torchtune(folder):
    folder.mkdir()
    (folder / "adapter_0.pt").write_bytes(b"not read")


@pytest.mark.parametrize("make, tool", [(_mlx, "mlx-lm"), (_kohya, "kohya-ss"), (_adapterhub, "AdapterHub"),
                                        (_diffusers, "diffusers"), (_torchtune, "torchtune")])
def test_check_adapter_recognises_other_tools_files(tmp_path, make, tool):
    make(tmp_path / "adapter")
    result = runner.invoke(app, ["check-adapter", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 1
    findings = json.loads(result.output)["findings"]
    assert len(findings) == 1 and findings[0]["code"] == "format.foreign", findings  # one verdict, no symptoms
    message = findings[0]["message"]
    assert tool in message and "peft's PeftModel.from_pretrained cannot load it" in message


def test_check_adapter_seeds_an_unseeded_factory(tmp_path):
    import peft

    from tests.own_model import random_gpt2

    config = peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    peft.get_peft_model(random_gpt2(), config).save_pretrained(tmp_path / "adapter")
    result = runner.invoke(app, ["check-adapter", str(tmp_path / "adapter"), "--base", "tests.own_model:random_gpt2",
                                 "--json"])
    findings = {f["code"]: f for f in json.loads(result.output)["findings"]}
    assert result.exit_code == 0 and findings["numbers.peft"]["level"] == "info", findings


def test_adapterhub_advice_for_a_fused_projection_round_trips(tmp_path):
    """Followed literally on GPT-2's c_attn (q and v adapted, as AdapterHub does by default), the advice gives a peft
    adapter that check-adapter accepts and that computes what the per-part adapters compute."""
    from conformance.adapter_kit.foreign import ADAPTERHUB_ADVICE
    from reference_impl import PeftModel

    assert "rank_pattern" in ADAPTERHUB_ADVICE and "alpha_pattern" in ADAPTERHUB_ADVICE
    base = models.build("gpt2-tiny")
    layer = "transformer.h.0.attn.c_attn"
    hidden, r, alpha, parts = base.config.n_embd, 2, 4, {"q": 0, "v": 2}  # part -> its third of c_attn's output
    generator = torch.Generator().manual_seed(0)
    hub_a = torch.randn(len(parts) * r, hidden, generator=generator)  # stored as AdapterHub stacks it
    hub_b = {name: torch.randn(hidden, r, generator=generator) for name in parts}
    lora_b = torch.zeros(3 * hidden, len(parts) * r)
    for i, (name, third) in enumerate(parts.items()):
        lora_b[third * hidden:(third + 1) * hidden, i * r:(i + 1) * r] = hub_b[name]
    folder = tmp_path / "converted"
    folder.mkdir()
    save_file({f"{PREFIX}{layer}.lora_A.weight": hub_a, f"{PREFIX}{layer}.lora_B.weight": lora_b},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [layer], "fan_in_fan_out": True,
        "rank_pattern": {layer: len(parts) * r}, "alpha_pattern": {layer: len(parts) * alpha}}))
    result = runner.invoke(app, ["check-adapter", str(folder), "--base", "gpt2-tiny", "--json"])
    assert result.exit_code == 0, result.output
    x = torch.randn(3, hidden, generator=generator)
    per_part = torch.zeros(3, 3 * hidden)
    for i, (name, third) in enumerate(parts.items()):
        per_part[:, third * hidden:(third + 1) * hidden] = x @ hub_a[i * r:(i + 1) * r].T @ hub_b[name].T * alpha / r
    model = PeftModel.from_pretrained(models.build("gpt2-tiny"), folder)
    with torch.no_grad():
        delta = model.get_submodule(layer)(x) - base.get_submodule(layer)(x)
    torch.testing.assert_close(delta, per_part, rtol=1e-5, atol=1e-5)


def test_check_adapter_unknown_base_is_a_usage_error(adapter):
    result = runner.invoke(app, ["check-adapter", str(adapter), "--base", "nope"])
    assert result.exit_code == 2 and "not a zoo model" in result.output


def test_fixtures_verify_and_spec():
    result = runner.invoke(app, ["fixtures", "verify"])
    assert result.exit_code == 0 and "files match FIXTURES.lock" in result.output
    assert runner.invoke(app, ["spec"]).output == spec.render_markdown()


def test_fixtures_verify_names_a_tampered_file(tmp_path):
    copy = tmp_path / "fixtures"
    shutil.copytree(golden.root(), copy)
    (copy / "v1/base/config.json").write_text("{}")
    result = runner.invoke(app, ["fixtures", "verify", "--folder", str(copy)])
    assert result.exit_code == 1 and "v1/base/config.json: sha256 differs" in result.output


def test_compare_renders_reports_side_by_side(tmp_path):
    reports = []
    for name, status in (("impl-a", "pass"), ("impl-b", "fail")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "implementation": {"name": name, "version": "1"}, "environment": {},
            "summary": {status: 1}, "requirements": {"LORA-FWD-001": {
                "status": status, "failures": [{"message": "LORA-FWD-001 failed: off by 2"}] if status == "fail"
                else []}}}))
        reports.append(str(path))
    result = runner.invoke(app, ["compare", *reports])
    assert "| impl-a 1 | impl-b 1 |" in result.output
    assert "| [LORA-FWD-001](../SPEC.md#lora-fwd-001) | MUST | pass | **FAIL** |" in result.output
    assert "impl-b 1, LORA-FWD-001: LORA-FWD-001 failed: off by 2" in result.output


def test_run_writes_the_reports(tmp_path):
    import subprocess
    import sys

    report = tmp_path / "r.json"
    result = subprocess.run([sys.executable, "-m", "conformance.cli", "run", "--impl", "reference", "--profile",
                             "quick", "--report", str(report), "-k", "formula"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    assert json.loads(report.read_text())["requirements"]["LORA-FWD-001"]["status"] == "pass"
    assert (tmp_path / "r.md").exists()


@pytest.mark.parametrize("zoo_base", ["llama-nf4", "llama-int8"])
def test_check_adapter_on_a_quantized_base_directory(zoo_base, tmp_path):
    """An adapter trained on a QLoRA base, checked against that base saved with its quantization_config (loaded
    quantized, as its users load it): peft's own directory passes with the effect computed by both; a transposed
    lora_B is named."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    models.build(zoo_base).save_pretrained(base)
    assert "quantization_config" in json.loads((base / "config.json").read_text())
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(models.build(zoo_base), config).save_pretrained(adapter)
    result = runner.invoke(app, ["check-adapter", str(adapter), "--base", str(base)])
    assert result.exit_code == 0 and "outputs differ by at most 0" in result.output, result.output
    _rewrite(adapter, lambda t: {k: v.T.contiguous() if "q_proj.lora_B" in k else v for k, v in t.items()})
    result = runner.invoke(app, ["check-adapter", str(adapter), "--base", str(base)])
    assert result.exit_code == 1 and "the factor is transposed" in result.output, result.output
