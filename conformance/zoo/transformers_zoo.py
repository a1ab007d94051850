"""The transformers models of the zoo: tiny versions of the architectures LoRA is used on, each built from a config
(never downloaded) and named after what it stands for.

Sizes are the smallest that keep each architecture's shape: grouped-query attention (4 query heads over 2 key/value
heads), biased q/k/v (Qwen2), tied embeddings, classifier and QA heads, an encoder-decoder with shared embeddings,
a vision transformer, and a language model mounted under `model.language_model` beside a vision tower (LLaVA).
"""

from typing import Callable

import torch

VOCAB = 100
# Dropouts off everywhere, so that train-mode tests see LoRA's dropout alone.
_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=0.0)
_ENCODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_IMAGE = dict(image_size=16, patch_size=8)  # 4 patches per image
IMAGE_TOKEN = VOCAB - 1  # the LLaVA placeholder token: each one is replaced by one image feature


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_DECODER, tie_word_embeddings=False))


def qwen2_tied():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_DECODER, tie_word_embeddings=True))


def bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**_ENCODER, num_labels=3, classifier_dropout=0.0))


def roberta_tagger():
    from transformers import RobertaConfig, RobertaForTokenClassification

    config = RobertaConfig(**_ENCODER, num_labels=5, classifier_dropout=0.0, pad_token_id=1)
    config.max_position_embeddings += 2  # RoBERTa's positions start after the padding index
    return RobertaForTokenClassification(config)


def bert_qa():
    from transformers import BertConfig, BertForQuestionAnswering

    return BertForQuestionAnswering(BertConfig(**_ENCODER))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=2,
                                               num_heads=4, vocab_size=VOCAB, dropout_rate=0.0,
                                               decoder_start_token_id=0))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**{k: v for k, v in _ENCODER.items() if k != "vocab_size"
                                                  and k != "max_position_embeddings"}, **_IMAGE, num_labels=3))


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              projection_dim=16, attention_dropout=0.0, **_IMAGE)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=LlamaConfig(**_DECODER), vision_config=vision,
                                                     image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                                                     vision_feature_select_strategy="default"))


def _tokens(generator: torch.Generator, length: int = 8) -> dict:
    """Two rows of token ids (never the image token), the second right-padded with 0."""
    input_ids = torch.randint(2, IMAGE_TOKEN, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 3:] = 0
    input_ids[1, length - 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pixels(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 3, _IMAGE["image_size"], _IMAGE["image_size"], generator=generator)


def text_inputs(generator: torch.Generator) -> dict:
    return _tokens(generator)


def encoder_decoder_inputs(generator: torch.Generator) -> dict:
    inputs = _tokens(generator)
    inputs["decoder_input_ids"] = torch.randint(2, IMAGE_TOKEN, (2, 5), generator=generator)
    return inputs


def image_inputs(generator: torch.Generator) -> dict:
    return {"pixel_values": _pixels(generator)}


def image_text_inputs(generator: torch.Generator) -> dict:
    """One image per row: its 4 patch features take the place of 4 image tokens after the first text token."""
    inputs = _tokens(generator, length=10)
    inputs["input_ids"][:, 1:5] = IMAGE_TOKEN
    inputs["pixel_values"] = _pixels(generator)
    return inputs


def labels_for(task_type: str) -> Callable[[torch.Generator, dict], dict]:
    """Labels a task's forward accepts, so that it returns a loss (LORA-TASK-002)."""
    def make(generator: torch.Generator, inputs: dict) -> dict:
        rows = 2
        if task_type == "SEQ_CLS":
            return {"labels": torch.randint(0, 3, (rows,), generator=generator)}
        if task_type == "TOKEN_CLS":
            return {"labels": torch.randint(0, 5, inputs["input_ids"].shape, generator=generator)}
        if task_type == "QUESTION_ANS":
            length = inputs["input_ids"].shape[1]
            return {"start_positions": torch.randint(0, length, (rows,), generator=generator),
                    "end_positions": torch.randint(0, length, (rows,), generator=generator)}
        if task_type == "SEQ_2_SEQ_LM":
            return {"labels": torch.randint(2, IMAGE_TOKEN, inputs["decoder_input_ids"].shape, generator=generator)}
        return {"labels": inputs["input_ids"].clone()}  # CAUSAL_LM: the model shifts them itself
    return make


# Published configurations, written out by hand (never downloaded), built on the meta device for parameter counts:
# name -> (transformers class names, config fields, total parameters as published by the model's authors).
FULL_SIZE = {
    "Llama-3-8B": (("LlamaConfig", "LlamaForCausalLM"),
                   dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=False), 8_030_261_248),
    "Qwen2-7B": (("Qwen2Config", "Qwen2ForCausalLM"),
                 dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                      rope_theta=1000000.0, tie_word_embeddings=False), 7_615_616_512),
}


def full_size(name: str):
    """The published model `name` on the meta device: shapes without memory."""
    import transformers

    (config_class, model_class), fields, _ = FULL_SIZE[name]
    with torch.device("meta"):
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**fields))
