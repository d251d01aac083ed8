"""Our UNet equals diffusers' UNet2DConditionModel on the same weights (written by diffusers)."""

from __future__ import annotations

import diffusers  # noqa: E402 - the oracle: missing it fails the suite, never skips it
import pytest
import torch

from difflower.reference.attention import set_attention_backend  # noqa: E402
from difflower.reference.loading import load_unet  # noqa: E402

SD1 = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
SD2 = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)
SDXL = dict(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 1, 2),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=8,
)
# SDXL-refiner-like asymmetric depths, scale-shift resnets and an inpainting-style 9-channel input.
ASYMMETRIC = dict(
    sample_size=8,
    in_channels=9,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    transformer_layers_per_block=((1,), (2,)),
    reverse_transformer_layers_per_block=((1, 2), (1, 1)),
    resnet_time_scale_shift="scale_shift",
    only_cross_attention=(True, False),
    norm_num_groups=8,
)

CASES = {"sd1-conv-proj": SD1, "sd2-linear-upcast": SD2, "sdxl-text-time": SDXL, "asymmetric-9ch": ASYMMETRIC}


def _inputs(config: dict, batch: int = 2, size: int = 8):
    gen = torch.Generator().manual_seed(1)
    cross = config["cross_attention_dim"]
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0]] * batch),
        }
    sample = torch.randn(batch, config.get("in_channels", 4), size, size, generator=gen)
    context = torch.randn(batch, 7, cross, generator=gen)
    return sample, context, kwargs


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
    """Each config as a diffusers model saved by diffusers' save_pretrained, with its folder."""
    out = {}
    for name, config in CASES.items():
        torch.manual_seed(0)
        model = diffusers.UNet2DConditionModel(**config).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("timestep", [torch.tensor([10, 999]), torch.tensor(500), 321.5])
def test_unet_matches_diffusers(saved_unets, name, timestep):
    theirs, folder = saved_unets[name]
    ours = load_unet(folder)
    sample, context, kwargs = _inputs(CASES[name])
    with torch.no_grad():
        expected = theirs(sample, timestep, context, **kwargs).sample
        actual = ours(sample, timestep, context, **kwargs).sample
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5
    assert expected.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors


def test_unet_odd_latent_size_uses_explicit_upsample_sizes(saved_unets):
    theirs, folder = saved_unets["sd1-conv-proj"]
    ours = load_unet(folder)
    sample, context, _ = _inputs(SD1, size=9)
    with torch.no_grad():
        expected = theirs(sample, 10, context).sample
        actual = ours(sample, 10, context).sample
    assert actual.shape == (2, 4, 9, 9)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_math_attention_backend_matches_sdpa(saved_unets):
    _, folder = saved_unets["sdxl-text-time"]
    ours = load_unet(folder)
    sample, context, kwargs = _inputs(SDXL)
    with torch.no_grad():
        sdpa = ours(sample, 10, context, **kwargs).sample
        switched = set_attention_backend(ours, "math")
        math = ours(sample, 10, context, **kwargs).sample
    # transformer blocks: down 2x1 + 2x2, mid 2, up 3x2 + 3x1 = 17, each with attn1 and attn2
    assert switched == 34
    assert (sdpa - math).abs().max().item() <= 1e-5


def test_return_dict_false_and_fp16_load(saved_unets):
    _, folder = saved_unets["sd1-conv-proj"]
    ours32 = load_unet(folder)
    ours16 = load_unet(folder, dtype=torch.bfloat16)
    assert ours16.dtype == torch.bfloat16
    sample, context, _ = _inputs(SD1)
    with torch.no_grad():
        (out32,) = ours32(sample, 10, context, return_dict=False)
        out16 = ours16(sample.bfloat16(), 10, context.bfloat16()).sample.float()
    cosine = torch.nn.functional.cosine_similarity(out32.flatten(), out16.flatten(), dim=0)
    assert cosine.item() > 0.99
