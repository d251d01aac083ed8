"""Our AutoencoderKL equals diffusers' on the same weights (written by diffusers)."""

from __future__ import annotations

import diffusers  # noqa: E402 - the oracle: missing it fails the suite, never skips it
import pytest
import torch

from difflower.reference.loading import load_vae  # noqa: E402

BASE = dict(
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8,
)
CASES = {
    "sd-4ch": dict(BASE, latent_channels=4, layers_per_block=1),
    "sd3-16ch-no-quant": dict(
        BASE,
        latent_channels=16,
        layers_per_block=2,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "no-mid-attention-2-blocks": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
        mid_block_add_attention=False,
    ),
}


@pytest.fixture(scope="module")
def saved_vaes(tmp_path_factory):
    out = {}
    for name, config in CASES.items():
        torch.manual_seed(0)
        model = diffusers.AutoencoderKL(**config).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_vae_encode_decode_match_diffusers(saved_vaes, name):
    theirs, folder = saved_vaes[name]
    ours = load_vae(folder)
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 48, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        their_dist = theirs.encode(image).latent_dist
        our_dist = ours.encode(image).latent_dist
        assert (our_dist.parameters - their_dist.parameters).abs().max().item() <= 1e-5
        assert torch.equal(ours.encode(image)[0], our_dist.parameters)
        their_sample = their_dist.sample(torch.Generator().manual_seed(7))
        our_sample = our_dist.sample(torch.Generator().manual_seed(7))
        assert (our_sample - their_sample).abs().max().item() <= 1e-5

        latents = torch.randn(2, CASES[name]["latent_channels"], 6, 8, generator=gen)
        expected = theirs.decode(latents).sample
        actual = ours.decode(latents).sample
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5
    assert expected.abs().max().item() > 0.05


def test_vae_config_exposes_scaling(saved_vaes):
    _, folder = saved_vaes["sd3-16ch-no-quant"]
    vae = load_vae(folder)
    assert vae.config.scaling_factor == pytest.approx(1.5305)
    assert vae.config.shift_factor == pytest.approx(0.0609)
    assert vae.config.downscale_factor == 8
    assert vae.quant_conv is None and vae.post_quant_conv is None


def test_force_upcast_keeps_fp16_request_in_fp32(saved_vaes):
    _, folder = saved_vaes["sd-4ch"]  # diffusers' default force_upcast=True
    assert load_vae(folder, dtype=torch.float16).dtype == torch.float32
    assert load_vae(folder, dtype=torch.float16, honour_force_upcast=False).dtype == torch.float16
    assert load_vae(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
