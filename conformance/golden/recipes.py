"""What the fixture versions record: one CaseSpec per case (its config, base model and requirements), and the
full-size GPT-2 parameter-count table."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CaseSpec:
    """A golden case: one feature, its config and the requirements it serves. Which drivers it applies to follows
    from its config (conformance/engine/scope.py), so it is not recorded here (v1 manifests still carry a "needs" list;
    nothing reads it)."""

    name: str
    config: dict
    requirements: tuple[str, ...]
    adapter_name: str = "default"
    second: Optional[dict] = None
    base: str = "gpt2-tiny"  # the zoo model the case adapts
    mixed: tuple[str, ...] = ()  # adapter_names for the input rows: "mixed" logits (v3 on)
    combine: Optional[tuple] = None  # (weights, combination_type): "combined" logits of add_weighted_adapter (v3 on)


CASE_SPECS = [
    CaseSpec("r4-c_attn", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}, ("LORA-FWD-001",)),
    CaseSpec("r16-alpha4-c_attn", {"r": 16, "lora_alpha": 4, "target_modules": ["c_attn"]}, ("LORA-FWD-002",)),
    CaseSpec("r8-c_attn+c_proj", {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj"]},
             ("LORA-MATCH-002",)),
    CaseSpec("r2-all-linear", {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}, ("LORA-MATCH-004",)),
    CaseSpec("r8-c_attn-rslora", {"r": 8, "lora_alpha": 8, "target_modules": ["c_attn"], "use_rslora": True},
             ("LORA-FWD-002",)),
    CaseSpec("r4-c_attn+c_fc-dora", {"r": 4, "target_modules": ["c_attn", "c_fc"], "use_dora": True},
             ("LORA-FWD-008", "LORA-KEYS-005")),
    CaseSpec("r4-wpe-embedding", {"r": 4, "lora_alpha": 8, "target_modules": ["wpe"]},
             ("LORA-FWD-003", "LORA-KEYS-002")),
    CaseSpec("r4-c_attn-bias-lora_only", {"r": 4, "target_modules": ["c_attn"], "bias": "lora_only"},
             ("LORA-KEYS-006",)),
    CaseSpec("r4-c_attn-lora_bias", {"r": 4, "target_modules": ["c_attn"], "lora_bias": True},
             ("LORA-KEYS-006", "LORA-MERGE-007")),
    CaseSpec("r4-c_attn-modules_to_save-ln_f", {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["ln_f"]},
             ("LORA-MTS-002",)),
    CaseSpec("r8-patterns", {"r": 8, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"],
                             "rank_pattern": {"c_attn": 2}, "alpha_pattern": {r"mlp\.c_proj": 32}},
             ("LORA-MATCH-009",)),
    CaseSpec("r4-layers_to_transform-1", {"r": 4, "target_modules": ["c_attn", "c_proj"],
                                          "layers_to_transform": [1], "layers_pattern": "h"},
             ("LORA-MATCH-005",)),
    CaseSpec("r4-c_proj-adapter-named-custom", {"r": 4, "target_modules": ["c_proj"]},
             ("LORA-SER-004", "LORA-KEYS-001"), adapter_name="custom"),
    CaseSpec("two-adapters", {"r": 4, "target_modules": ["c_attn"]}, ("LORA-MULTI-002",),
             second={"r": 2, "lora_alpha": 16, "target_modules": ["c_fc"]}),
    # v2: the models LoRA is used on.
    CaseSpec("llama-r8-q_proj+v_proj", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                                        "task_type": "CAUSAL_LM"}, ("LORA-FWD-001", "LORA-KEYS-003"), base="llama"),
    CaseSpec("llama-r4-all-linear", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
             ("LORA-MATCH-004",), base="llama"),
    CaseSpec("llama-r4-attention-dora", {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                         "use_dora": True}, ("LORA-FWD-008", "LORA-KEYS-005"), base="llama"),
    CaseSpec("llama-r8-rslora", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                 "use_rslora": True}, ("LORA-FWD-002",), base="llama"),
    CaseSpec("llama-patterns", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                "rank_pattern": {"down_proj": 2},
                                "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32}},
             ("LORA-MATCH-009",), base="llama"),
    CaseSpec("llama-lm_head+embed_tokens", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "lm_head"]},
             ("LORA-FWD-003", "LORA-KEYS-010"), base="llama"),
    CaseSpec("bert-seq_cls", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
             ("LORA-TASK-001",), base="bert-classifier"),
    CaseSpec("t5-seq2seq", {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"},
             ("LORA-TASK-002",), base="t5"),
    CaseSpec("llava-language-model", {"r": 4, "lora_alpha": 8,
                                      "target_modules": r".*language_model.*\.(q_proj|v_proj)"},
             ("LORA-KEYS-001",), base="llava"),
    # v3: the rest of peft's LoRA.
    CaseSpec("mixed-batch", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}, ("LORA-MIX-001",),
             second={"r": 2, "lora_alpha": 16, "target_modules": ["c_attn"]}, mixed=("second", "default")),
    CaseSpec("weighted-cat", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}, ("LORA-WADD-002",),
             second={"r": 2, "lora_alpha": 16, "target_modules": ["c_attn", "c_fc"]}, combine=([0.7, -1.3], "cat")),
    CaseSpec("weighted-svd", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, ("LORA-WADD-003",),
             second={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}, combine=([1.0, 0.5], "svd"),
             base="llama"),
    CaseSpec("moe-target-parameters", {"r": 2, "lora_alpha": 4, "target_parameters": [
        "experts.gate_up_proj", "experts.down_proj", "router.weight"]}, ("LORA-TPARAM-001", "LORA-TPARAM-002"),
             base="moe"),
    CaseSpec("qwen2-tied-trainable-tokens", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                             "trainable_token_indices": [27, 59, 99]},
             ("LORA-TOK-001", "LORA-TOK-002"), base="qwen2-tied"),
    CaseSpec("multihead-attention", {"r": 4, "lora_alpha": 8, "target_modules": ["attn"]},
             ("LORA-MHA-001", "LORA-MHA-002"), base="attention-net"),
    # v4: IA3, LoHa and LoKr.
    CaseSpec("ia3-gpt2-feedforward", {"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"],
                                      "feedforward_modules": ["mlp.c_proj"]}, ("IA3-GOLD-001", "IA3-FWD-001")),
    CaseSpec("ia3-convnet", {"peft_type": "IA3", "target_modules": ["conv1", "conv2", "head"],
                             "feedforward_modules": ["conv2"]}, ("IA3-GOLD-001", "IA3-FWD-001"), base="convnet"),
    CaseSpec("loha-llama", {"peft_type": "LOHA", "r": 4, "alpha": 8,
                            "target_modules": ["q_proj", "v_proj", "down_proj"]}, ("LOHA-GOLD-001", "LOHA-FWD-001"),
             base="llama"),
    CaseSpec("loha-convnet-cp", {"peft_type": "LOHA", "r": 2, "alpha": 4, "use_effective_conv2d": True,
                                 "target_modules": ["conv1", "conv2", "head"]}, ("LOHA-GOLD-001", "LOHA-FWD-002"),
             base="convnet"),
    CaseSpec("lokr-llama-decompose-both", {"peft_type": "LOKR", "r": 2, "alpha": 4, "decompose_both": True,
                                           "target_modules": ["q_proj", "down_proj"]},
             ("LOKR-GOLD-001", "LOKR-KEYS-001"), base="llama"),
    CaseSpec("lokr-convnet-cp", {"peft_type": "LOKR", "r": 1, "alpha": 2, "use_effective_conv2d": True,
                                 "target_modules": ["conv1", "conv2", "head"]}, ("LOKR-GOLD-001", "LOKR-FWD-001"),
             base="convnet"),
    # v5: QLoRA bases (the float weights stored, quantized again on load: conformance/zoo/quantized.py).
    CaseSpec("qlora-nf4-q_proj+v_proj", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
             ("QLORA-FWD-001", "QLORA-MERGE-001"), base="llama-nf4"),
    CaseSpec("qlora-fp4-dq-dora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                   "use_dora": True}, ("QLORA-DORA-001",), base="llama-fp4-dq"),
    CaseSpec("qlora-int8-rslora", {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "up_proj"],
                                   "use_rslora": True}, ("QLORA-FWD-001", "QLORA-MERGE-001"), base="llama-int8"),
    # v6: diffusion (conformance/zoo/diffusion.py): the UNet's attention, convolutions, feed-forward; CLIP text.
    CaseSpec("sd-unet-attention", {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
             ("LORA-FWD-001", "LORA-FWD-006"), base="sd-unet"),
    CaseSpec("sd-unet-locon-patterns", {"r": 4, "lora_alpha": 4, "rank_pattern": {"conv1": 2},
                                        "alpha_pattern": {"proj_in": 16},
                                        "target_modules": ["conv1", "conv2", "proj_in", "ff.net.0.proj"]},
             ("LORA-FWD-009", "LORA-MATCH-009"), base="sd-unet"),
    CaseSpec("sd-unet-dora", {"r": 2, "target_modules": ["to_q", "to_v", "conv2"], "use_dora": True},
             ("LORA-FWD-008", "LORA-KEYS-005"), base="sd-unet"),
    CaseSpec("sd-unet-two-adapters", {"r": 4, "target_modules": ["to_q", "to_v"]}, ("LORA-MULTI-002",),
             second={"r": 2, "lora_alpha": 8, "target_modules": ["conv2", "time_emb_proj"]}, base="sd-unet"),
    CaseSpec("sd3-transformer-joint-attention", {"r": 4, "lora_alpha": 8, "target_modules": [
        "to_q", "to_k", "to_v", "add_q_proj", "add_v_proj", "to_add_out", "pos_embed.proj"]},
             ("LORA-FWD-001", "LORA-FWD-009"), base="sd3-transformer"),
    CaseSpec("clip-text-attention+mlp", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1"]},
             ("LORA-FWD-001",), base="clip-text"),
]

# Full-size GPT-2 on the meta device: (target_modules, r) -> (trainable, total), recorded from peft.
COUNT_CONFIGS = [(["c_attn"], 4), (["c_attn"], 8), (["c_attn"], 64), (["c_attn", "c_proj"], 4),
                 (["c_attn", "c_proj"], 8), (["c_attn", "c_proj"], 64), ("all-linear", 8), (["c_fc"], 16)]
