"""The diffusion models of the zoo: a Stable-Diffusion-style denoiser and its text encoder, tiny, built from configs
(never downloaded). diffusers is optional: without it the UNet is not drawn (models.ZooModel.requires).

The UNet keeps what LoRA users target in an SD 1.x UNet: cross-attention (`attn2.to_k/to_v` read the text
embeddings, 12 wide), self-attention `to_q/to_k/to_v/to_out.0`, the feed-forward `ff.net.0.proj/ff.net.2`, 1x1
`proj_in/proj_out` convolutions, 3x3 resnet convolutions `conv1/conv2` and `time_emb_proj`. The text encoder is
CLIP's, as SD 1.x pairs it (`q_proj/k_proj/v_proj/out_proj`, `fc1/fc2`), its hidden size the UNet's cross-attention
width, so that its output is what the UNet reads.
"""

import torch

from . import transformers_zoo as hf

CROSS_WIDTH = 12  # the text encoder's hidden size = the UNet's cross_attention_dim
LATENT = (4, 8, 8)  # channels, height, width of the latents


def sd_unet():
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # each .to(dtype) would warn that from_pretrained keeps some modules in float32

    return UNet2DConditionModel(sample_size=LATENT[1], in_channels=LATENT[0], out_channels=LATENT[0],
                                layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=CROSS_WIDTH, attention_head_dim=4, norm_num_groups=4)


def unet_inputs(generator: torch.Generator) -> dict:
    """Two latents at two timesteps, each with its own text embeddings (5 tokens)."""
    return {"sample": torch.randn(2, *LATENT, generator=generator),
            "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 5, CROSS_WIDTH, generator=generator)}


def sd3_transformer():
    """An SD3-style MMDiT denoiser: joint attention over image patches and text (to_q/to_k/to_v beside
    add_q_proj/add_k_proj/add_v_proj, to_out.0 and to_add_out), feed-forward ff.net.*, a conv patch embedding."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    return SD3Transformer2DModel(sample_size=LATENT[1], patch_size=2, in_channels=LATENT[0], out_channels=LATENT[0],
                                 num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=CROSS_WIDTH, caption_projection_dim=16,
                                 pooled_projection_dim=CROSS_WIDTH, pos_embed_max_size=16)


def transformer_inputs(generator: torch.Generator) -> dict:
    """Two latents at two timesteps, their text embeddings (5 tokens) and pooled text embeddings."""
    return {"hidden_states": torch.randn(2, *LATENT, generator=generator),
            "encoder_hidden_states": torch.randn(2, 5, CROSS_WIDTH, generator=generator),
            "pooled_projections": torch.randn(2, CROSS_WIDTH, generator=generator),
            "timestep": torch.tensor([10, 500])}


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=CROSS_WIDTH, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=hf.VOCAB, max_position_embeddings=16,
                                       projection_dim=CROSS_WIDTH, attention_dropout=0.0, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0))


def pipeline(unet, text_encoder):
    """A StableDiffusionPipeline around these two, for what only a pipeline does (load_lora_weights, set_adapters,
    fuse_lora): a one-block VAE, a default scheduler, no tokenizer (inputs are token ids), no safety checker."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=LATENT[0], norm_num_groups=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDPMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
