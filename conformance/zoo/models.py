"""The model zoo: small models built from a seed (never downloaded), with inputs and the names LoRA can target.

Every model is built in eval mode, on CPU in float32 under `torch.manual_seed(seed)`, then moved. Built models are
cached and handed out as deep copies, so an example costs a copy, not a construction.
"""

import copy
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import diffusion
from . import transformers_zoo as hf

# Layer kinds, named as the driver capabilities that cover them.
LINEAR, CONV1D, EMBEDDING, CONV2D = "linear", "conv1d", "embedding", "conv2d"
ATTENTION = "multihead_attention"  # torch's nn.MultiheadAttention
BNB_4BIT, BNB_8BIT = "bnb_4bit", "bnb_8bit"  # bitsandbytes' Linear4bit and Linear8bitLt (QLoRA bases)


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    targets: dict[str, tuple[str, ...]]  # layer kind -> names usable in target_modules (leaf or dotted suffix)
    layers: tuple[int, ...] = ()  # block indices, for layers_to_transform
    layers_pattern: str = ""  # the block list's name; needed when the blocks sit at the top level
    in_blocks: tuple[str, ...] = ()  # target names that live inside numbered blocks
    saveable: tuple[str, ...] = ()  # modules_to_save candidates that hold no target
    layer: str = ""  # the one adaptable layer of a single-layer model (the formula tests use these), else ""
    task_type: str = ""  # the peft task_type its users set (SEQ_CLS, ...), drawn into configs; "" for none
    drawn: bool = True  # False: only fixed cases use it (a grouped conv cannot merge, and draws merge)
    parameters: tuple[str, ...] = ()  # names usable in target_parameters (bare parameters, 2-d or 3-d)
    quantized: str = ""  # a quantized base (quantized.SCHEMES): built on the run's device and dtype by quantized.py
    requires: str = ""  # an optional package the model is built with (diffusers); without it, never drawn
    description: str = ""

    @property
    def single_layer(self) -> bool:
        return bool(self.layer)

    @property
    def available(self) -> bool:
        return not self.requires or importlib.util.find_spec(self.requires) is not None

    def output(self, result) -> torch.Tensor:
        return output_tensor(result)


def output_tensor(result) -> torch.Tensor:
    """The tensor a forward pass produces: logits (start and end logits stacked, for question answering), last
    hidden state, a denoiser's sample, or the tensor itself."""
    if getattr(result, "start_logits", None) is not None:
        return torch.stack([result.start_logits, result.end_logits])
    for name in ("logits", "last_hidden_state", "sample"):
        if hasattr(result, name):
            return getattr(result, name)
    return result


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    # Dropouts off, so that train-mode tests see LoRA's dropout alone; token ids inside the vocabulary.
    settings = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                    eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**settings, **overrides})


def _gpt2_lm() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(tiny_gpt2_config())


def _gpt2_headless() -> nn.Module:
    from transformers import GPT2Model

    return GPT2Model(tiny_gpt2_config(n_embd=16, n_layer=3, n_head=2))


def _token_inputs(vocab: int, length: int) -> Callable[[torch.Generator], dict]:
    def make(generator: torch.Generator) -> dict:
        input_ids = torch.randint(1, vocab, (2, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, length - 3:] = 0  # the second row is right-padded
        input_ids[1, length - 3:] = 0
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return make


def _tensor_inputs(*shape: int) -> Callable[[torch.Generator], dict]:
    return lambda generator: {"x": torch.randn(*shape, generator=generator)}


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.proj(torch.relu(self.fc(x)))


class MLP(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 24, depth: int = 2, classes: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Embedder(nn.Module):
    def __init__(self, vocab: int = 40, width: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None):
        hidden = torch.tanh(self.proj(self.embed(input_ids)))
        return self.head(hidden)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.norm(x).mean(dim=(2, 3)))


class Experts(nn.Module):
    """A mixture-of-experts block stored as transformers stores GPT-OSS's or Llama 4's: every expert's weights in
    one 3-d parameter, (experts, in, out). Dense routing: each expert's output weighted by the router."""

    def __init__(self, experts: int = 3, width: int = 12, hidden: int = 8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(0.3 * torch.randn(experts, width, 2 * hidden))
        self.down_proj = nn.Parameter(0.3 * torch.randn(experts, hidden, width))

    def forward(self, x, routing):
        gate, up = torch.einsum("btw,ewh->ebth", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("ebth,ehw->ebtw", torch.nn.functional.silu(gate) * up, self.down_proj)
        return torch.einsum("ebtw,bte->btw", out, routing)


class MoE(nn.Module):
    def __init__(self, width: int = 12, experts: int = 3, classes: int = 4):
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = Experts(experts, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(x + self.experts(x, torch.softmax(self.router(x), dim=-1)))


class AttentionBlock(nn.Module):
    """A pre-norm transformer block on torch's own attention, as CLIP's and ViT's reference code builds it."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + torch.relu(self.fc(x))


class AttentionNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2, classes: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(AttentionBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Single(nn.Module):
    """One layer (called `layer` unless named otherwise): what the formula tests adapt."""

    def __init__(self, layer: nn.Module, name: str = "layer"):
        super().__init__()
        self.name = name
        setattr(self, name, layer)

    def forward(self, x):
        return getattr(self, self.name)(x)


def _conv1d_single(nx: int = 12, nf: int = 10, name: str = "layer") -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=nf, nx=nx)
    nn.init.normal_(layer.weight, std=0.2)  # transformers initialises Conv1D lazily; give it values here
    nn.init.normal_(layer.bias, std=0.2)
    return Single(layer, name)


ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("gpt2-tiny", _gpt2_lm, _token_inputs(100, 8),
             {CONV1D: ("c_attn", "c_fc", "c_proj", "attn.c_proj", "mlp.c_proj"), EMBEDDING: ("wpe",)},
             layers=(0, 1), layers_pattern="h", in_blocks=("c_attn", "c_fc", "c_proj", "attn.c_proj", "mlp.c_proj"),
             saveable=("ln_f",), description="GPT2LMHeadModel, 2 layers of width 32, vocab 100 (tied LM head)"),
    ZooModel("gpt2-headless", _gpt2_headless, _token_inputs(100, 6),
             {CONV1D: ("c_attn", "c_fc", "attn.c_proj", "mlp.c_proj")},
             layers=(0, 1, 2), layers_pattern="h", in_blocks=("c_attn", "c_fc", "attn.c_proj", "mlp.c_proj"),
             saveable=("ln_f",),
             description="GPT2Model without a head, 3 layers of width 16"),
    ZooModel("mlp", MLP, _tensor_inputs(2, 3, 16), {LINEAR: ("fc", "proj", "head", "blocks.1.fc")},
             layers=(0, 1), layers_pattern="blocks", in_blocks=("fc", "proj", "blocks.1.fc"), saveable=("norm",),
             description="two residual Linear blocks"),
    ZooModel("embedder", Embedder, _token_inputs(40, 6), {EMBEDDING: ("embed",), LINEAR: ("proj", "head")},
             description="Embedding (padding_idx 0) then Linear layers"),
    ZooModel("convnet", ConvNet, _tensor_inputs(2, 3, 6, 6), {CONV2D: ("conv1", "conv2"), LINEAR: ("head",)},
             saveable=("norm",), description="Conv2d 3x3 and 1x1, BatchNorm, Linear head"),
    # Transformers architectures (conformance/zoo/transformers_zoo.py). Targets name both transformers 4 and 5 spellings
    # where they differ; names a model lacks are dropped by the scope probe.
    ZooModel("llama", hf.llama, hf.text_inputs,
             {LINEAR: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                       "self_attn.k_proj"), EMBEDDING: ("embed_tokens",)},
             layers=(0, 1), layers_pattern="layers",
             in_blocks=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "self_attn.k_proj"),
             saveable=("model.norm",), task_type="CAUSAL_LM",
             description="LlamaForCausalLM, grouped-query attention (4 query heads, 2 key/value heads), untied head"),
    ZooModel("qwen2-tied", hf.qwen2_tied, hf.text_inputs,
             {LINEAR: ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), EMBEDDING: ("embed_tokens",)},
             layers=(0, 1), layers_pattern="layers", in_blocks=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
             saveable=("model.norm",), task_type="CAUSAL_LM",
             description="Qwen2ForCausalLM: q/k/v projections with bias, lm_head tied to embed_tokens"),
    ZooModel("bert-classifier", hf.bert_classifier, hf.text_inputs,
             {LINEAR: ("query", "key", "value", "attention.output.dense", "intermediate.dense"),
              EMBEDDING: ("word_embeddings",)},
             layers=(0, 1), layers_pattern="layer",
             in_blocks=("query", "key", "value", "attention.output.dense", "intermediate.dense"),
             saveable=("pooler",), task_type="SEQ_CLS",
             description="BertForSequenceClassification, 3 labels: the head is 'classifier'"),
    ZooModel("roberta-tagger", hf.roberta_tagger, hf.text_inputs,
             {LINEAR: ("query", "value", "attention.output.dense")}, layers=(0, 1), layers_pattern="layer",
             in_blocks=("query", "value", "attention.output.dense"), task_type="TOKEN_CLS",
             description="RobertaForTokenClassification, 5 labels"),
    ZooModel("bert-qa", hf.bert_qa, hf.text_inputs, {LINEAR: ("query", "value", "intermediate.dense")},
             task_type="QUESTION_ANS", description="BertForQuestionAnswering: the head is 'qa_outputs'"),
    ZooModel("t5", hf.t5, hf.encoder_decoder_inputs,
             {LINEAR: ("q", "k", "v", "o", "wi", "wo", "SelfAttention.q", "EncDecAttention.v")},
             saveable=("encoder.final_layer_norm",), task_type="SEQ_2_SEQ_LM",
             description="T5ForConditionalGeneration: encoder and decoder sharing one embedding, decoder_input_ids"),
    ZooModel("vit", hf.vit, hf.image_inputs,
             {LINEAR: ("q_proj", "query", "v_proj", "value", "fc1", "intermediate.dense"), CONV2D: ("projection",)},
             saveable=("classifier",), description="ViTForImageClassification on 16x16 images, 8x8 patches, 3 labels"),
    # Not the projector (linear_1): with an adapter there, even peft's own save/load round trip changes the logits
    # in the last bit (1.2e-7, weights bit-identical), so LORA-LOAD-001's exactness would judge the CPU kernels.
    ZooModel("llava", hf.llava, hf.image_text_inputs,
             {LINEAR: ("q_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "lm_head",
                       "language_model.layers.1.self_attn.k_proj"), EMBEDDING: ("embed_tokens",)},
             description="LlavaForConditionalGeneration: a CLIP vision tower, a projector and a Llama language model "
                         "under model.language_model"),
    # Diffusion (conformance/zoo/diffusion.py): the denoiser and the text encoder of a Stable-Diffusion-style model.
    ZooModel("sd-unet", diffusion.sd_unet, diffusion.unet_inputs,
             {LINEAR: ("to_q", "to_k", "to_v", "to_out.0", "attn2.to_k", "ff.net.0.proj", "ff.net.2",
                       "time_emb_proj"),
              CONV2D: ("conv1", "conv2", "proj_in", "proj_out", "conv_in")},
             saveable=("conv_norm_out",), requires="diffusers",
             description="UNet2DConditionModel (diffusers): 2 down and 2 up blocks (8 and 16 channels), "
                         "cross-attention on 12-wide text embeddings, 4x8x8 latents at two timesteps"),
    ZooModel("sd3-transformer", diffusion.sd3_transformer, diffusion.transformer_inputs,
             {LINEAR: ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
                       "ff_context.net.0.proj"),
              CONV2D: ("pos_embed.proj",)},
             layers=(0, 1), layers_pattern="transformer_blocks",
             in_blocks=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
                        "ff_context.net.0.proj"),
             saveable=("norm_out",), requires="diffusers",
             description="SD3Transformer2DModel (diffusers): an MMDiT of 2 joint-attention blocks over 2x2 patches of "
                         "4x8x8 latents and 12-wide text embeddings"),
    ZooModel("clip-text", diffusion.clip_text, hf.text_inputs,
             {LINEAR: ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), EMBEDDING: ("token_embedding",)},
             layers=(0, 1), layers_pattern="layers", in_blocks=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
             saveable=("final_layer_norm",),
             description="CLIPTextModel, 2 layers of width 12: the text encoder a Stable Diffusion LoRA also adapts"),
    # QLoRA bases (conformance/zoo/quantized.py): the llama above loaded through bitsandbytes, its projections
    # quantized, lm_head not (transformers keeps it in the run's dtype). Only the QLORA tests draw them.
    *[ZooModel(f"llama-{scheme}", hf.llama, hf.text_inputs,
               {kind: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                LINEAR: ("lm_head",)},
               layers=(0, 1), layers_pattern="layers", task_type="CAUSAL_LM", drawn=False, quantized=scheme,
               description=f"the llama, its projections quantized by bitsandbytes: {about}")
      for scheme, kind, about in [
          ("nf4", BNB_4BIT, "NF4, computing in the run's dtype"),
          ("fp4-dq", BNB_4BIT, "FP4 with double quantization, computing in the run's dtype"),
          ("nf4-bf16", BNB_4BIT, "NF4, computing in bfloat16 whatever the run's dtype"),
          ("int8", BNB_8BIT, "int8 rows (LLM.int8(), bitsandbytes' default outlier threshold 6)"),
          ("qlora", BNB_4BIT, "the QLoRA recipe: NF4 with double quantization computing in bfloat16, prepared for "
                              "k-bit training (half-precision weights upcast to float32, gradient checkpointing)")]],
    # For target_parameters (LORA-TPARAM-*): the parameters are named in ZooModel.parameters; not drawn elsewhere.
    ZooModel("moe", MoE, _tensor_inputs(2, 5, 12), {LINEAR: ("head",)}, drawn=False,
             parameters=("experts.gate_up_proj", "experts.down_proj", "router.weight"),
             description="a router, a 3-expert block with 3-d gate_up_proj (3, 12, 16) and down_proj (3, 8, 12), "
                         "a Linear head"),
    # For LoRA on nn.MultiheadAttention (LORA-MHA-*); not drawn elsewhere.
    ZooModel("attention-net", AttentionNet, _tensor_inputs(2, 5, 16),
             {ATTENTION: ("attn", "blocks.1.attn"), LINEAR: ("fc", "head")}, drawn=False,
             description="two pre-norm blocks on nn.MultiheadAttention (width 16, 2 heads, batch_first), a Linear "
                         "head"),
    ZooModel("single-linear", lambda: Single(nn.Linear(12, 10)), _tensor_inputs(2, 3, 12), {LINEAR: ("layer",)},
             layer="layer"),
    ZooModel("single-conv1d", _conv1d_single, _tensor_inputs(2, 3, 12), {CONV1D: ("layer",)}, layer="layer"),
    ZooModel("single-c_attn", lambda: _conv1d_single(32, 96, "c_attn"), _tensor_inputs(2, 3, 32),
             {CONV1D: ("c_attn",)}, layer="c_attn",
             description="GPT-2's fused q/k/v projection alone: Conv1D 32 -> 96 named c_attn"),
    ZooModel("single-embedding", lambda: Single(nn.Embedding(30, 10)),
             lambda g: {"x": torch.randint(0, 30, (2, 5), generator=g)}, {EMBEDDING: ("layer",)}, layer="layer"),
    ZooModel("single-conv2d", lambda: Single(nn.Conv2d(3, 5, 3, stride=2, padding=1)), _tensor_inputs(2, 3, 7, 7),
             {CONV2D: ("layer",)}, layer="layer"),
    ZooModel("grouped-conv2d", lambda: Single(nn.Conv2d(4, 6, 3, padding=1, groups=2)), _tensor_inputs(2, 4, 5, 5),
             {CONV2D: ("layer",)}, layer="layer", drawn=False, description="Conv2d 4 -> 6 in 2 groups (never merged)"),
]}


@functools.lru_cache(maxsize=64)
def _built(name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ZOO[name].build().eval()


def build_float(name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of the float model zoo model `name` is (a quantized one: the model it is quantized from)."""
    return copy.deepcopy(_built(name, seed))


def build(name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh copy of zoo model `name` built from `seed`, on `device` in `dtype` (a quantized model: quantized from
    that build, its other weights and its compute in `dtype`)."""
    scheme = ZOO[name].quantized
    if scheme:
        from . import quantized

        return copy.deepcopy(quantized.load(_built(name, seed), scheme, device, dtype))
    return copy.deepcopy(_built(name, seed)).to(device=device, dtype=dtype)


def inputs(name: str, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The model's inputs from `seed`; floating inputs in `dtype`."""
    made = ZOO[name].make_inputs(torch.Generator().manual_seed(seed))
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in made.items()}


def run(name: str, model: nn.Module, model_inputs: dict) -> torch.Tensor:
    """The forward pass through the model's own __call__, reduced to its output tensor."""
    return ZOO[name].output(model(**model_inputs))


def class_of_directory(folder) -> type:
    """The transformers model class a model directory's config.json names (its first 'architectures' entry)."""
    import json
    from pathlib import Path

    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = Path(folder) / "config.json"
    try:
        return getattr(transformers, json.loads(path.read_text())["architectures"][0])
    except FileNotFoundError:
        raise ValueError(f"{folder}: no config.json in the directory") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} must be a transformers config whose 'architectures' names a transformers model "
                         f"class ({type(error).__name__}: {error})") from None
