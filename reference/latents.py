"""The loop's starting point: initial latents drawn in diffusers' order, and for img2img and
inpainting the encoded image, the noise and the latent-size mask.

Every random draw happens here, from the request's generator and in the order diffusers'
pipelines draw (image posterior samples, then the noise), so a seeded run equals diffusers'
bit for bit on the same machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from difflower.errors import ArgumentError
from difflower.reference.images import preprocess_image, preprocess_mask
from difflower.reference.model_calls import ModelCalls
from difflower.reference.request import GenerateRequest, GeneratorArg
from difflower.reference.schedulers import SchedulerRun
from difflower.reference.schedulers.base import randn_like_diffusers
from difflower.reference.spec import PipelineSpec


@dataclass(frozen=True)
class StartState:
    """The latents at the loop's first step, and what img2img/inpainting keep beside them."""

    latents: torch.Tensor  # (B, C, h, w)
    noise: torch.Tensor | None = None  # the noise image latents were (and will be) noised with
    image_latents: torch.Tensor | None = None  # (B, C, h, w) the encoded init image
    mask: torch.Tensor | None = None  # (B or 2B, 1, h, w): 1 where the image is repainted
    masked_latents: torch.Tensor | None = None  # (B or 2B, C, h, w) the encoded image outside the mask


def prepare_latents(
    request: GenerateRequest,
    spec: PipelineSpec,
    calls: ModelCalls,
    run: SchedulerRun,
    start: int,
    device: torch.device,
    dtype: torch.dtype,
) -> StartState:
    """The starting state of `request`'s task, drawing the generator in diffusers' order."""
    latent_shape = (
        request.batch,
        spec.latent_channels,
        request.height // spec.vae_scale_factor,
        request.width // spec.vae_scale_factor,
    )
    generator = request.generator
    if request.task == "txt2img":
        return StartState(randn_like_diffusers(latent_shape, generator, device, dtype) * run.init_noise_sigma)
    encoder = ImageEncoder(spec, calls, device)
    if request.task == "img2img":
        assert request.image is not None
        pixels = preprocess_image(request.image, request.height, request.width, spec.vae_scale_factor)
        image_latents = encoder.latents(pixels, generator, dtype, request.batch)
        noise = randn_like_diffusers(image_latents.shape, generator, device, dtype)
        return StartState(run.add_noise(image_latents, noise, start), noise, image_latents)
    return _prepare_inpaint(request, spec, encoder, run, start, latent_shape, device, dtype)


def _prepare_inpaint(
    request: GenerateRequest,
    spec: PipelineSpec,
    encoder: ImageEncoder,
    run: SchedulerRun,
    start: int,
    latent_shape: tuple[int, int, int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> StartState:
    """diffusers' inpainting set-up: image latents, noise, latent-size mask, masked-image latents."""
    if spec.denoiser_in_channels not in (spec.latent_channels, 2 * spec.latent_channels + 1):
        raise ArgumentError(
            "image",
            f"inpainting needs a denoiser with {spec.latent_channels} or {2 * spec.latent_channels + 1} input "
            f"channels; this one has {spec.denoiser_in_channels}",
        )
    assert request.image is not None and request.mask_image is not None
    batch, generator = latent_shape[0], request.generator
    pixels = preprocess_image(request.image, request.height, request.width, spec.vae_scale_factor)
    is_strength_max = request.strength == 1.0
    image_latents = None
    if spec.denoiser_in_channels == spec.latent_channels or not is_strength_max:
        image_latents = encoder.latents(pixels, generator, dtype, 1)
        image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)  # (B, C, h, w)
    noise = randn_like_diffusers(latent_shape, generator, device, dtype)
    if is_strength_max:
        latents = noise * run.init_noise_sigma
    else:
        assert image_latents is not None
        latents = run.add_noise(image_latents, noise, start)
    mask = preprocess_mask(request.mask_image, request.height, request.width)  # (1, 1, H, W)
    masked_latents = encoder.latents(pixels * (mask < 0.5), generator, dtype, 1)
    mask = torch.nn.functional.interpolate(mask, size=latent_shape[-2:]).to(device, dtype)  # (1, 1, h, w)
    mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)  # (B, 1, h, w)
    masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)  # (B, C, h, w)
    if request.do_cfg:
        mask, masked_latents = torch.cat([mask] * 2), torch.cat([masked_latents] * 2)  # (2B, ...): both CFG halves
    return StartState(latents, noise, image_latents, mask, masked_latents)


class ImageEncoder:
    """Images -> scaled latents sampled from the VAE posterior (with the request's generator)."""

    def __init__(self, spec: PipelineSpec, calls: ModelCalls, device: torch.device):
        self.spec, self.calls, self.device = spec, calls, device

    def latents(self, pixels: torch.Tensor, generator: GeneratorArg, dtype: torch.dtype, batch: int) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (max(N, batch), C, h, w), repeated up to `batch`."""
        pixels = pixels.to(self.device)
        if isinstance(generator, Sequence) and len(generator) > 1:
            if pixels.shape[0] < batch:
                pixels = pixels.repeat(batch // pixels.shape[0], 1, 1, 1)  # (batch, 3, H, W)
            samples = [self._posterior_sample(pixels[i : i + 1], generator[i]) for i in range(pixels.shape[0])]
            sample = torch.cat(samples)
        else:
            sample = self._posterior_sample(pixels, generator)
        latents = self.spec.to_latents(sample.to(dtype))
        if latents.shape[0] < batch:
            if batch % latents.shape[0]:
                raise ArgumentError("image", f"{latents.shape[0]} images cannot be spread over {batch} outputs")
            latents = torch.cat([latents] * (batch // latents.shape[0]))  # (batch, C, h, w)
        return latents

    def _posterior_sample(self, pixels: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        moments = self.calls.vae_encode(pixels)  # (N, 2C, h, w): mean and log-variance
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        if isinstance(generator, Sequence):
            generator = generator[0]
        return mean + std * randn_like_diffusers(mean.shape, generator, mean.device, mean.dtype)
