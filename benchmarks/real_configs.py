"""Real architecture configs (SD1.5, SDXL base, SD3-medium) for checkpoints with random weights.

Speed does not depend on the weights' values, so benchmarks build these locally instead of
downloading. The shapes are the published models' (their config.json files); the CLIP
vocabulary is CLIP's 49408 entries although the locally built tokenizer uses only a few
hundred of them. SD3's T5-XXL encoder (4.7 B parameters, 19 GB in fp32) is left out: SD3
runs without it (`skip_t5`) and the MMDiT's cost does not change.
"""

from __future__ import annotations

from dataclasses import replace

from difflower.reference.autoencoder_kl import VAEConfig
from difflower.reference.tiny import TinyCLIP, TinySpec, tiny_spec
from difflower.reference.transformer_sd3 import SD3Config
from difflower.reference.unet_2d_condition import UNetConfig

CLIP_L = TinyCLIP(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    vocab_size=49408,
)
CLIP_G = TinyCLIP(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    with_projection=True,
    hidden_act="gelu",
    vocab_size=49408,
)
SD_VAE = VAEConfig(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    force_upcast=True,
)

SD15_UNET = UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = UNetConfig(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD3_MEDIUM = SD3Config(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)


def real_spec(family: str) -> TinySpec:
    """The checkpoint definition of a real-size family ("sd15", "sdxl" or "sd3")."""
    if family == "sd15":
        return replace(tiny_spec("sd"), unet=SD15_UNET, vae=replace(SD_VAE, force_upcast=False), clips=(CLIP_L,))
    if family == "sdxl":
        return replace(
            tiny_spec("sdxl"),
            unet=SDXL_UNET,
            vae=replace(SD_VAE, scaling_factor=0.13025),
            clips=(CLIP_L, CLIP_G),
        )
    if family == "sd3":
        clip_l = replace(CLIP_L, with_projection=True)
        vae = replace(
            SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        return replace(tiny_spec("sd3"), transformer=SD3_MEDIUM, vae=vae, clips=(clip_l, CLIP_G), t5_d_model=None)
    raise ValueError(f"unknown family {family!r}; use sd15, sdxl or sd3")
