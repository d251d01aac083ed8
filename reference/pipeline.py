"""The one denoising loop: txt2img, img2img and inpainting for SD 1.x/2.x, SDXL and SD3.

`DiffusionPipeline` reproduces diffusers' pipelines step for step (the same generator draws in
the same order, the same scheduler calls, the same guidance and blending), so with the eager
components it is the golden source every backend is compared with. It reaches the models
only through a `ModelCalls` object (text encoders, denoiser, VAE encode/decode), so an
exported artifact runs through this same loop with its engines in place of the torch
modules: `TorchModelCalls` here, the runtimes' engine calls elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from difflower.errors import ArgumentError
from difflower.reference.images import (
    OUTPUT_TYPES,
    ImageInput,
    OutputType,
    default_size,
    image_size,
    postprocess,
    preprocess_image,
    preprocess_mask,
)
from difflower.reference.loading import Family, ModelIndex, load_components
from difflower.reference.prompts import (
    Conditioning,
    TextEncoderOutput,
    as_negative_list,
    as_prompt_list,
    encode_sd,
    encode_sd3,
    encode_sdxl,
    sdxl_time_ids,
)
from difflower.reference.schedulers import Scheduler, calculate_shift, load_scheduler, scheduler_by_name
from difflower.reference.schedulers.base import randn_like_diffusers

Task = Literal["txt2img", "img2img", "inpaint"]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class TaskDefaults:
    """diffusers' defaults for one pipeline class."""

    num_inference_steps: int
    guidance_scale: float
    strength: float = 1.0


DEFAULTS: dict[tuple[str, Task], TaskDefaults] = {
    ("sd", "txt2img"): TaskDefaults(50, 7.5),
    ("sd", "img2img"): TaskDefaults(50, 7.5, 0.8),
    ("sd", "inpaint"): TaskDefaults(50, 7.5, 1.0),
    ("sdxl", "txt2img"): TaskDefaults(50, 5.0),
    ("sdxl", "img2img"): TaskDefaults(50, 5.0, 0.3),
    ("sdxl", "inpaint"): TaskDefaults(50, 7.5, 0.9999),
    ("sd3", "txt2img"): TaskDefaults(28, 7.0),
    ("sd3", "img2img"): TaskDefaults(50, 7.0, 0.6),
    ("sd3", "inpaint"): TaskDefaults(50, 7.0, 0.6),
}


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

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this (the VAE factor times the MMDiT patch)."""
        return self.vae_scale_factor * self.patch_size

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
        shape = (1, len(self.latents_mean), 1, 1)
        mean = torch.tensor(self.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std


class ModelCalls(Protocol):
    """How the loop reaches the models; the reference uses torch modules, runtimes use engines."""

    def has_component(self, name: str) -> bool: ...

    def prepare_run(self, batch: int, height: int, width: int, guidance: bool) -> None:
        """Raise before any work when a backend cannot serve this request (e.g. a static shape)."""
        ...

    def text_encoder(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput: ...

    def denoiser(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model prediction for `sample` (B, C, h, w) at `timestep` (B,)."""
        ...

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2C, h, w)."""
        ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        ...


class TorchModelCalls:
    """ModelCalls over the eager reference modules (and transformers' text encoders)."""

    def __init__(self, components: dict[str, Any], family: Family):
        self.components = components
        self.family = family

    def has_component(self, name: str) -> bool:
        return self.components.get(name) is not None

    def prepare_run(self, batch: int, height: int, width: int, guidance: bool) -> None:
        """Eager modules take any shape."""

    @torch.no_grad()
    def text_encoder(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput:
        model = self.components[name]
        out = model(input_ids.to(model.device), output_hidden_states=True)
        hidden_states = getattr(out, "hidden_states", None)
        return TextEncoderOutput(
            last_hidden_state=out.last_hidden_state,
            penultimate_hidden_state=hidden_states[-2] if hidden_states is not None else None,
            text_embeds=getattr(out, "text_embeds", None),
        )

    @torch.no_grad()
    def denoiser(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.family == "sd3":
            return self.components["transformer"](
                hidden_states=sample,
                timestep=timestep,
                encoder_hidden_states=cond.encoder_hidden_states,
                pooled_projections=cond.pooled_projections,
            )[0]
        added = None
        if cond.text_embeds is not None:
            added = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
        return self.components["unet"](sample, timestep, cond.encoder_hidden_states, added_cond_kwargs=added)[0]

    @torch.no_grad()
    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.components["vae"]
        return vae.encode(image.to(vae.dtype))[0]

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components["vae"]
        return vae.decode(latents.to(vae.dtype))[0]


@dataclass
class PipelineOutput:
    """`.images` as diffusers returns them; `.trajectory` the latents after every step (when asked)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: list[torch.Tensor] | None = None
    timesteps: list[float] = field(default_factory=list)


class DiffusionPipeline:
    """The golden pipeline; call it like diffusers' pipelines.

    Components are attributes named as in `model_index.json` (`pipe.unet`, `pipe.vae`, ...).
    """

    def __init__(
        self,
        spec: PipelineSpec,
        calls: ModelCalls,
        tokenizers: dict[str, Any],
        scheduler: Scheduler,
        scheduler_config: dict[str, Any] | None = None,
        components: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.spec = spec
        self.calls = calls
        self.tokenizers = tokenizers  # keyed by the text encoder each one feeds
        self.scheduler = scheduler
        # The checkpoint's own scheduler_config.json: swaps start from it, as diffusers' from_config does.
        self.scheduler_config = dict(scheduler_config or {})
        self.device = torch.device(device)
        self.dtype = dtype
        for name, component in (components or {}).items():
            setattr(self, name, component)

    @property
    def family(self) -> Family:
        return self.spec.family

    def set_scheduler(self, name: str) -> Scheduler:
        """Swap the scheduler by name (`euler`, `dpm++2m-karras`, ...), keeping the training schedule."""
        self.scheduler = scheduler_by_name(
            name, base_config=self.scheduler_config, flow_matching=self.scheduler.is_flow_matching
        )
        return self.scheduler

    # -- the call -------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: GeneratorArg = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: OutputType = "pil",
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        max_sequence_length: int = 256,
        skip_t5: bool = False,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        return_trajectory: bool = False,
        progress: bool = True,
    ) -> PipelineOutput:
        """Generate images; the task follows from the inputs (image -> img2img, image + mask -> inpaint)."""
        spec = self.spec

        # 1. check and default the arguments
        task: Task = "txt2img" if image is None else ("inpaint" if mask_image is not None else "img2img")
        defaults = DEFAULTS[(spec.family, task)]
        if mask_image is not None and image is None:
            raise ArgumentError("mask_image", "needs an image to inpaint; pass image= as well")
        if output_type not in OUTPUT_TYPES:
            raise ArgumentError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ArgumentError("num_images_per_prompt", f"must be at least 1, got {num_images_per_prompt}")
        steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ArgumentError("num_inference_steps", f"must be a positive int, got {steps!r}")
        guidance = defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
        do_cfg = guidance > 1.0
        strength = defaults.strength if strength is None else float(strength)
        if task != "txt2img" and not 0.0 <= strength <= 1.0:
            raise ArgumentError("strength", f"must be in [0, 1], got {strength}")
        if generator is not None and seed is not None:
            raise ArgumentError("seed", "pass either seed or generator, not both")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        prompts = as_prompt_list(prompt)
        batch = len(prompts) * num_images_per_prompt
        if isinstance(generator, Sequence) and len(generator) not in (1, batch):
            raise ArgumentError("generator", f"got {len(generator)} generators for {batch} images; give one or {batch}")
        height, width = self._size(task, image, height, width)
        if task == "inpaint" and image_size(mask_image) != image_size(image):
            raise ArgumentError(
                "mask_image", f"is {image_size(mask_image)} (h, w) but image is {image_size(image)}; give them one size"
            )

        self.calls.prepare_run(batch, height, width, do_cfg)

        # 2. prompt conditioning
        positive, negative = self._encode(
            prompts,
            prompt_2,
            prompt_3,
            negative_prompt,
            negative_prompt_2,
            negative_prompt_3,
            do_cfg,
            num_images_per_prompt,
            max_sequence_length,
            skip_t5,
            (height, width),
            original_size,
            crops_coords_top_left,
            target_size,
            aesthetic_score,
            negative_aesthetic_score,
        )
        cond = Conditioning.for_guidance(negative, positive) if do_cfg else positive
        dtype = positive.encoder_hidden_states.dtype

        # 3. timesteps (img2img and inpainting start part-way, as diffusers' get_timesteps)
        run = self.scheduler.set_timesteps(steps, device=self.device, mu=self._mu(height, width))
        skipped = 0 if task == "txt2img" else self._start_index(steps, strength)
        start = skipped * run.order
        if steps - skipped < 1:
            raise ArgumentError(
                "strength", f"{strength} with {steps} steps leaves no denoising step; raise strength or steps"
            )

        # 4. initial latents, drawing the generator in diffusers' order
        latent_shape = (batch, spec.latent_channels, height // spec.vae_scale_factor, width // spec.vae_scale_factor)
        mask = masked_latents = image_latents = noise = None
        if task == "txt2img":
            latents = randn_like_diffusers(latent_shape, generator, self.device, dtype) * run.init_noise_sigma
        elif task == "img2img":
            pixels = preprocess_image(image, height, width, spec.vae_scale_factor)
            image_latents = self._encode_image(pixels, generator, dtype, batch)
            noise = randn_like_diffusers(image_latents.shape, generator, self.device, dtype)
            latents = run.add_noise(image_latents, noise, start)
        else:
            latents, noise, image_latents, mask, masked_latents = self._prepare_inpaint(
                image, mask_image, height, width, strength, run, start, latent_shape, generator, dtype, do_cfg
            )

        # 5. the loop
        trajectory: list[torch.Tensor] | None = [] if return_trajectory else None
        blend = task == "inpaint" and spec.denoiser_in_channels == spec.latent_channels
        indices = range(start, len(run.timesteps))
        for i in tqdm(indices, disable=not progress, desc=f"{spec.family} {task}", leave=False):
            t = run.timesteps[i]
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = run.scale_model_input(model_input, i)
            if task == "inpaint" and not blend:
                model_input = torch.cat([model_input, mask, masked_latents], dim=1)
            prediction = self.calls.denoiser(model_input, t.expand(model_input.shape[0]), cond)
            if do_cfg:
                uncond, text = prediction.chunk(2)
                prediction = uncond + guidance * (text - uncond)
            latents = run.step(prediction, i, latents, generator=generator)
            if blend:
                latents = self._blend(latents, image_latents, noise, mask, run, i, do_cfg)
            if trajectory is not None:
                trajectory.append(latents.detach().cpu().clone())

        # 6. decode
        if output_type == "latent":
            images: Any = latents
        else:
            decoded = self.calls.vae_decode(spec.from_latents(latents))
            images = postprocess(decoded.float(), output_type)
        return PipelineOutput(images, trajectory, [float(run.timesteps[i]) for i in indices])

    # -- pieces of the call -----------------------------------------------------------------

    def _size(self, task: Task, image, height: int | None, width: int | None) -> tuple[int, int]:
        """diffusers' default size: the denoiser's sample size, or the input image's for SD/SDXL img2img."""
        spec = self.spec
        if task == "img2img" and spec.family != "sd3" and height is None and width is None:
            height, width = default_size(image, None, None, spec.vae_scale_factor)
        default = spec.sample_size * spec.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        multiple = spec.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ArgumentError(name, f"must be a positive multiple of {multiple} for this model, got {value!r}")
        return height, width

    def _start_index(self, steps: int, strength: float) -> int:
        """How many scheduled steps img2img/inpainting skip (SD3 rounds differently from SD/SDXL)."""
        if self.spec.family == "sd3":
            return int(max(steps - min(steps * strength, steps), 0))
        return max(steps - min(int(steps * strength), steps), 0)

    def _mu(self, height: int, width: int) -> float | None:
        """The flow-matching time shift for this image size, when the scheduler shifts dynamically."""
        config = self.scheduler.config
        if not getattr(config, "use_dynamic_shifting", False):
            return None
        spec = self.spec
        tokens = (height // spec.vae_scale_factor // spec.patch_size) * (
            width // spec.vae_scale_factor // spec.patch_size
        )
        return calculate_shift(config, tokens)

    def _encode(
        self,
        prompts,
        prompt_2,
        prompt_3,
        negative_prompt,
        negative_prompt_2,
        negative_prompt_3,
        do_cfg,
        images_per_prompt,
        max_sequence_length,
        skip_t5,
        size,
        original_size,
        crops_coords_top_left,
        target_size,
        aesthetic_score,
        negative_aesthetic_score,
    ) -> tuple[Conditioning, Conditioning | None]:
        family = self.spec.family
        n = len(prompts)
        if family == "sd":
            negatives = as_negative_list(negative_prompt, n) if do_cfg else None
            return encode_sd(self._text, self.tokenizers["text_encoder"], prompts, negatives, images_per_prompt)
        if family == "sdxl":
            prompts_2 = as_negative_list(prompt_2, n, "prompt_2") if prompt_2 is not None else prompts
            negatives = None
            if do_cfg:
                first = as_negative_list(negative_prompt, n)
                second = as_negative_list(negative_prompt_2, n, "negative_prompt_2") if negative_prompt_2 else first
                negatives = (first, second)
            original = tuple(original_size or size)
            target = tuple(target_size or size)
            if self.spec.requires_aesthetics_score:
                ids = sdxl_time_ids(original, crops_coords_top_left, target, aesthetic_score)
                negative_ids = sdxl_time_ids(original, crops_coords_top_left, target, negative_aesthetic_score)
            else:
                ids = negative_ids = sdxl_time_ids(original, crops_coords_top_left, target)
            zero_negative = negative_prompt is None and self.spec.force_zeros_for_empty_prompt
            return encode_sdxl(
                self._text,
                self.tokenizers,
                prompts,
                prompts_2,
                negatives,
                images_per_prompt,
                zero_negative,
                ids,
                negative_ids,
            )
        prompts_2 = as_negative_list(prompt_2, n, "prompt_2") if prompt_2 is not None else prompts
        prompts_3 = as_negative_list(prompt_3, n, "prompt_3") if prompt_3 is not None else prompts
        negatives = None
        if do_cfg:
            first = as_negative_list(negative_prompt, n)
            second = as_negative_list(negative_prompt_2, n, "negative_prompt_2") if negative_prompt_2 else first
            third = as_negative_list(negative_prompt_3, n, "negative_prompt_3") if negative_prompt_3 else first
            negatives = (first, second, third)
        skip = skip_t5 or not self.calls.has_component("text_encoder_3")
        return encode_sd3(
            self._text,
            self.tokenizers,
            (prompts, prompts_2, prompts_3),
            negatives,
            images_per_prompt,
            max_sequence_length,
            self.spec.joint_attention_dim,
            skip,
        )

    def _text(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput:
        return self.calls.text_encoder(name, input_ids.to(self.device))

    def _encode_image(self, pixels: torch.Tensor, generator: GeneratorArg, dtype: torch.dtype, batch: int):
        """Image -> scaled latents sampled from the VAE posterior, repeated up to `batch`."""
        pixels = pixels.to(self.device)
        if isinstance(generator, Sequence) and len(generator) > 1:
            if pixels.shape[0] < batch:
                pixels = pixels.repeat(batch // pixels.shape[0], 1, 1, 1)
            samples = [self._posterior_sample(pixels[i : i + 1], generator[i]) for i in range(pixels.shape[0])]
            sample = torch.cat(samples)
        else:
            sample = self._posterior_sample(pixels, generator)
        latents = self.spec.to_latents(sample.to(dtype))
        if latents.shape[0] < batch:
            if batch % latents.shape[0]:
                raise ArgumentError("image", f"{latents.shape[0]} images cannot be spread over {batch} outputs")
            latents = torch.cat([latents] * (batch // latents.shape[0]))
        return latents

    def _posterior_sample(self, pixels: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
        moments = self.calls.vae_encode(pixels)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        if isinstance(generator, Sequence):
            generator = generator[0]
        return mean + std * randn_like_diffusers(mean.shape, generator, mean.device, mean.dtype)

    def _prepare_inpaint(
        self, image, mask_image, height, width, strength, run, start, latent_shape, generator, dtype, do_cfg
    ):
        """diffusers' inpainting set-up: image latents, noise, latent-size mask, masked-image latents."""
        spec = self.spec
        batch = latent_shape[0]
        pixels = preprocess_image(image, height, width, spec.vae_scale_factor)
        is_strength_max = strength == 1.0
        needs_image_latents = spec.denoiser_in_channels == spec.latent_channels or not is_strength_max
        image_latents = None
        if needs_image_latents:
            image_latents = self._encode_image(pixels, generator, dtype, 1)
            image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
        noise = randn_like_diffusers(latent_shape, generator, self.device, dtype)
        if is_strength_max:
            latents = noise * run.init_noise_sigma
        else:
            latents = run.add_noise(image_latents, noise, start)
        mask = preprocess_mask(mask_image, height, width)
        masked_pixels = pixels * (mask < 0.5)
        masked_latents = self._encode_image(masked_pixels, generator, dtype, 1)
        mask = torch.nn.functional.interpolate(mask, size=latent_shape[-2:]).to(self.device, dtype)
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
        masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)
        if do_cfg:
            mask, masked_latents = torch.cat([mask] * 2), torch.cat([masked_latents] * 2)
        if spec.denoiser_in_channels not in (spec.latent_channels, 2 * spec.latent_channels + 1):
            raise ArgumentError(
                "image",
                f"inpainting needs a denoiser with {spec.latent_channels} or {2 * spec.latent_channels + 1} input "
                f"channels; this one has {spec.denoiser_in_channels}",
            )
        return latents, noise, image_latents, mask, masked_latents

    @staticmethod
    def _blend(latents, image_latents, noise, mask, run, i, do_cfg) -> torch.Tensor:
        """Keep the unmasked region on the image's own noised trajectory (4-/16-channel inpainting)."""
        init_mask = mask.chunk(2)[0] if do_cfg else mask
        known = image_latents
        if i < len(run.timesteps) - 1:
            known = run.add_noise(image_latents, noise, i + 1)
        return (1 - init_mask) * known + init_mask * latents


# -- loading ---------------------------------------------------------------------------------------


def spec_from_configs(index: ModelIndex) -> PipelineSpec:
    """The PipelineSpec of a checkpoint, read from its config files (no weights are loaded)."""
    from difflower.reference.config import read_json
    from difflower.reference.loading import read_sd3_config, read_unet_config, read_vae_config

    root = index.root
    vae = read_vae_config(root / "vae")
    raw_index = read_json(root / "model_index.json")
    if index.family == "sd3":
        denoiser = read_sd3_config(root / "transformer")
        extra: dict[str, Any] = dict(
            patch_size=denoiser.patch_size,
            joint_attention_dim=denoiser.joint_attention_dim,
            denoiser_in_channels=denoiser.in_channels,
            sample_size=denoiser.sample_size,
        )
    else:
        unet = read_unet_config(root / "unet")
        sample_size = unet.sample_size[0] if isinstance(unet.sample_size, tuple) else unet.sample_size
        extra = dict(denoiser_in_channels=unet.in_channels, sample_size=sample_size or 64)
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
        **extra,
    )


def tokenizers_by_encoder(components: dict[str, Any]) -> dict[str, Any]:
    """{"text_encoder": tokenizer, "text_encoder_2": tokenizer_2, ...} for the encoders present."""
    out = {}
    for suffix in ("", "_2", "_3"):
        if components.get("tokenizer" + suffix) is not None:
            out["text_encoder" + suffix] = components["tokenizer" + suffix]
    return out


def load_pipeline(
    path: Path | str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
    scheduler: str | None = None,
) -> DiffusionPipeline:
    """The eager reference pipeline of a diffusers-format checkpoint folder."""

    index, components = load_components(path, dtype=dtype, variant=variant)
    spec = spec_from_configs(index)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            components[name] = component.to(device)
    scheduler_config = components.pop("scheduler")
    sched = load_scheduler(scheduler_config, source=index.root / "scheduler" / "scheduler_config.json")
    pipe = DiffusionPipeline(
        spec,
        TorchModelCalls(components, index.family),
        tokenizers_by_encoder(components),
        sched,
        scheduler_config,
        components=components,
        device=device,
        dtype=dtype,
    )
    if scheduler is not None:
        pipe.set_scheduler(scheduler)
    return pipe


__all__ = [
    "DiffusionPipeline",
    "ModelCalls",
    "PipelineOutput",
    "PipelineSpec",
    "TorchModelCalls",
    "load_pipeline",
]
