"""torchtune's own PEFT writer for its Llama models (tune_to_peft_adapter_weights, with the RoPE row permutation
of q/k lora_B), checked against peft on the HF Llama that holds the same weights; and the inverse mapping."""

import json

import pytest
import torch

torchtune = pytest.importorskip("torchtune")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402
from torchtune.models.convert_weights import (  # noqa: E402
    tune_to_hf, tune_to_peft_adapter_config, tune_to_peft_adapter_weights)
from torchtune.models.llama3._component_builders import lora_llama3  # noqa: E402

from conformance.adapter_kit.check_adapter import check
from conformance.drivers.torchtune import peft_to_tune_adapter_weights
from reference_impl.peft_format import PREFIX  # noqa: E402

SHAPE = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64,
             intermediate_dim=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj"]
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def tune_model():
    torch.manual_seed(0)
    model = lora_llama3(TARGETS, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8, **SHAPE).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def hf_base():
    """The HF Llama holding tune_model()'s base weights (a module:factory for check-adapter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    base = {k: v for k, v in tune_model().state_dict().items() if "lora_" not in k}
    model.load_state_dict(tune_to_hf(base, num_heads=4, num_kv_heads=2, dim=32))
    return model


def _export(tmp_path, permute: bool = True):
    lora = {k: v for k, v in tune_model().state_dict().items() if "lora_" in k}
    weights = tune_to_peft_adapter_weights(lora, num_heads=4, num_kv_heads=2, dim=32)
    if not permute:  # the bug a rename-only converter has
        weights = {PREFIX + peft_key: v for peft_key, v in
                   zip([k.removeprefix(PREFIX) for k in weights], lora.values())}
    config = tune_to_peft_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": TARGETS + ["w1", "w2", "w3"]})
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return lora, weights


def test_torchtune_export_loads_in_peft_with_torchtune_s_outputs(tmp_path):
    _export(tmp_path)
    expected = tune_model()(TOKENS)
    peft_logits = peft.PeftModel.from_pretrained(hf_base(), tmp_path).eval()(input_ids=TOKENS).logits
    torch.testing.assert_close(peft_logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - hf_base()(input_ids=TOKENS).logits).abs().max() > 0.05  # the adapter matters


def test_export_without_the_rope_permutation_is_caught(tmp_path):
    _export(tmp_path, permute=False)
    wrong = peft.PeftModel.from_pretrained(hf_base(), tmp_path).eval()(input_ids=TOKENS).logits
    assert (wrong - tune_model()(TOKENS)).abs().max() > 1e-3


def test_check_adapter_accepts_the_export(tmp_path):
    _export(tmp_path)
    report = check(tmp_path, base="tests.meta.test_torchtune_llama:hf_base")
    assert report.ok, [f for f in report if f.level == "error"]
    assert any(f.code == "numbers.peft" and "at most 0" in f.message for f in report)


def test_inverse_mapping_round_trips_bit_exactly(tmp_path):
    lora, weights = _export(tmp_path)
    back = peft_to_tune_adapter_weights(weights, num_heads=4, num_kv_heads=2, dim=32)
    assert back.keys() == lora.keys()
    assert all(torch.equal(back[k], lora[k]) for k in lora)
