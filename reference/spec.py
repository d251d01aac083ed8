"""The static facts the denoising loop needs about a checkpoint, read from its configs.

`PipelineSpec` is what an artifact's manifest records under `pipeline`, so a runtime runs the
same loop as the eager reference without loading the source checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difflower.reference.config import read_json
from difflower.reference.loading import (
    TRANSFORMER_FAMILIES,
    Family,
    ModelIndex,
    read_flux_config,
    read_sd3_config,
    read_unet_config,
    read_vae_config,
)

# FluxPipeline's default_sample_size: 128 latent pixels, 1024 image pixels (the transformer has no sample_size).
FLUX_SAMPLE_SIZE = 128


@dataclass(frozen=True)
class PipelineSpec:
    """The static facts the loop needs about a checkpoint (read from its configs)."""

    family: Family
    vae_scale_factor: int
    latent_channels: int
    denoiser_in_channels: int
    sample_size: int
    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    patch_size: int = 1
    joint_attention_dim: int | None = None
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False
    # For the memory estimate: the widest channel count the VAE decoder holds at full
    # resolution, and the denoiser's first block width (None in manifests of older exports).
    vae_full_resolution_channels: int | None = None
    denoiser_channels: int | None = None
    # A guidance-distilled UNet (LCM): the guidance scale goes in as an embedding of this width,
    # and classifier-free guidance (the doubled batch) is off.
    time_cond_proj_dim: int | None = None
    # The checkpoint's pipeline class, for the defaults of the pipelines that have their own (LCM).
    pipeline_class: str | None = None
    # ControlNets driving the UNet (components `controlnet`, `controlnet_1`, ...); when theirs
    # pool the conditions (`global_pool_conditions`) guess mode is always on, as in diffusers.
    controlnets: int = 0
    controlnet_pools_conditions: bool = False
    # FLUX.1-dev: the (distilled) guidance scale is an input of the transformer, not a doubled batch.
    guidance_embeds: bool = False

    def __post_init__(self) -> None:
        for name in ("vae_scale_factor", "latent_channels", "denoiser_in_channels", "sample_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"field '{name}' must be at least 1, got {getattr(self, name)}")

    @property
    def is_transformer(self) -> bool:
        """The denoiser is a transformer (SD3, Flux), not a UNet."""
        return self.family in TRANSFORMER_FAMILIES

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this (the VAE factor times the MMDiT patch)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def native_size(self) -> int:
        """The pixel size the denoiser was made for (its sample size times the VAE factor)."""
        return self.sample_size * self.vae_scale_factor

    def to_latents(self, moments_sample: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample -> the latents the denoiser works on."""
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self._stats(moments_sample)
            return (moments_sample - mean) * self.scaling_factor / std
        if self.shift_factor is not None:
            return (moments_sample - self.shift_factor) * self.scaling_factor
        return self.scaling_factor * moments_sample

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> the VAE decoder's input."""
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self._stats(latents)
            return latents * std / self.scaling_factor + mean
        latents = latents / self.scaling_factor
        return latents + self.shift_factor if self.shift_factor is not None else latents

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.latents_mean is not None and self.latents_std is not None
        shape = (1, len(self.latents_mean), 1, 1)
        mean = torch.tensor(self.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std


def spec_from_configs(index: ModelIndex) -> PipelineSpec:
    """The PipelineSpec of a checkpoint, read from its config files (no weights are loaded)."""
    root = index.root
    vae = read_vae_config(root / "vae")
    raw_index = read_json(root / "model_index.json")
    extra: dict[str, Any]
    if index.family == "sd3":
        denoiser = read_sd3_config(root / "transformer")
        extra = dict(
            patch_size=denoiser.patch_size,
            joint_attention_dim=denoiser.joint_attention_dim,
            denoiser_in_channels=denoiser.in_channels,
            sample_size=denoiser.sample_size,
            denoiser_channels=denoiser.num_attention_heads * denoiser.attention_head_dim,
        )
    elif index.family == "flux":
        flux = read_flux_config(root / "transformer")
        extra = dict(
            patch_size=2,  # the pipeline packs 2x2 latent patches into one token
            joint_attention_dim=flux.joint_attention_dim,
            denoiser_in_channels=flux.in_channels // 4,  # the loop's latents are unpacked
            sample_size=FLUX_SAMPLE_SIZE,
            denoiser_channels=flux.inner_dim,
            guidance_embeds=flux.guidance_embeds,
        )
    else:
        unet = read_unet_config(root / "unet")
        sample_size = unet.sample_size[0] if isinstance(unet.sample_size, tuple) else unet.sample_size
        extra = dict(
            denoiser_in_channels=unet.in_channels,
            sample_size=sample_size or 64,
            denoiser_channels=unet.block_out_channels[0],
            time_cond_proj_dim=unet.time_cond_proj_dim,
        )
    channels = vae.block_out_channels
    return PipelineSpec(
        family=index.family,
        vae_scale_factor=vae.downscale_factor,
        latent_channels=vae.latent_channels,
        scaling_factor=vae.scaling_factor,
        shift_factor=vae.shift_factor,
        latents_mean=vae.latents_mean,
        latents_std=vae.latents_std,
        force_zeros_for_empty_prompt=bool(raw_index.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=bool(raw_index.get("requires_aesthetics_score", False)),
        # The decoder's last block works at full size with channels[0]; the upsampler before it
        # hands over channels[1] at full size.
        vae_full_resolution_channels=max(channels[:2]),
        pipeline_class=index.pipeline_class,
        **extra,
    )
