"""A generation request: every argument of a pipeline call, checked and defaulted once.

`build_request` is the one place a call's arguments are read: it picks the task from the
inputs (an image: img2img; an image and a mask: inpainting), fills diffusers' defaults for the
family and task, refuses what cannot be honoured (a non-finite number, a size the model cannot
take, a strength without an image) in one line naming the argument, and builds the family's
prompt inputs. Everything after it reads the typed `GenerateRequest`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from difflower.errors import ArgumentError
from difflower.reference.control import ControlInputs
from difflower.reference.images import OUTPUT_TYPES, ImageInput, OutputType, default_size, image_size
from difflower.reference.prompts import (
    FluxPrompts,
    PromptInputs,
    SD3Prompts,
    SDPrompts,
    SDXLPrompts,
    as_prompt_list,
    finite,
)
from difflower.reference.spec import PipelineSpec
from difflower.reference.step_cache import CachePolicy, DeepCache, FirstBlockCache, parse_cache

Task = Literal["txt2img", "img2img", "inpaint"]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class TaskDefaults:
    """diffusers' defaults for one pipeline class."""

    num_inference_steps: int
    guidance_scale: float
    strength: float = 1.0
    control_scale: float = 1.0  # controlnet_conditioning_scale, for the ControlNet pipelines


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
    ("flux", "txt2img"): TaskDefaults(28, 3.5),
    ("flux", "img2img"): TaskDefaults(28, 7.0, 0.6),
    ("flux", "inpaint"): TaskDefaults(28, 7.0, 0.6),
}
# Pipelines whose own defaults differ from their family's (diffusers' LatentConsistencyModel*Pipeline).
PIPELINE_DEFAULTS: dict[tuple[str, Task], TaskDefaults] = {
    ("LatentConsistencyModelPipeline", "txt2img"): TaskDefaults(4, 8.5),
    ("LatentConsistencyModelImg2ImgPipeline", "img2img"): TaskDefaults(4, 8.5, 0.8),
}


# diffusers' ControlNet pipelines where their defaults differ from their family's.
CONTROL_DEFAULTS: dict[tuple[str, Task], TaskDefaults] = {
    ("sd", "img2img"): TaskDefaults(50, 7.5, 0.8, control_scale=0.8),
    ("sd", "inpaint"): TaskDefaults(50, 7.5, 1.0, control_scale=0.5),
    ("sdxl", "img2img"): TaskDefaults(50, 5.0, 0.8, control_scale=0.8),
    ("sdxl", "inpaint"): TaskDefaults(50, 5.0, 0.9999),
}


@dataclass(frozen=True)
class GenerateRequest:
    """One pipeline call, checked: what to make, at which size, from which inputs."""

    task: Task
    prompts: PromptInputs
    cfg: bool  # classifier-free guidance: negative and positive halves in one doubled denoiser batch
    prompt_count: int
    images_per_prompt: int
    steps: int
    guidance_scale: float
    strength: float
    height: int
    width: int
    output_type: OutputType
    image: ImageInput | None
    mask_image: ImageInput | None
    generator: GeneratorArg
    return_trajectory: bool
    progress: bool
    control: ControlInputs | None = None  # the ControlNets' images, scales and windows
    cache: CachePolicy | None = None  # a step-caching policy the loop consults each step
    true_cfg_scale: float | None = None  # Flux's true CFG: the scale mixing the halves (guidance is embedded)

    @property
    def batch(self) -> int:
        """Images made in all (prompts x images per prompt)."""
        return self.prompt_count * self.images_per_prompt

    @property
    def do_cfg(self) -> bool:
        return self.cfg

    @property
    def cfg_scale(self) -> float:
        """The scale of the guidance mix of the CFG halves: the guidance scale, or Flux's true_cfg_scale."""
        return self.guidance_scale if self.true_cfg_scale is None else self.true_cfg_scale


def build_request(
    spec: PipelineSpec,
    has_t5: bool,
    *,
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
    return_trajectory: bool = False,
    progress: bool = True,
    control_image: ImageInput | Sequence[ImageInput] | None = None,
    controlnet_conditioning_scale: float | Sequence[float] | None = None,
    guess_mode: bool = False,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    cache: str | CachePolicy | None = None,
    **family_options: Any,
) -> GenerateRequest:
    """The checked request of one pipeline call (`family_options`: prompt_2, prompt_3, negative
    prompts 2 and 3, max_sequence_length, skip_t5, SDXL's size and aesthetic conditioning).

    With ControlNets (`spec.controlnets`) the control arguments are diffusers' ControlNet
    pipelines' (their txt2img `image` is `control_image` here, so `image` always means the init
    image); ControlNets that pool their conditions force guess mode, as diffusers does."""
    # 1. the task and its defaults
    if mask_image is not None and image is None:
        raise ArgumentError("mask_image", "needs an image to inpaint; pass image= as well")
    task: Task = "txt2img" if image is None else ("inpaint" if mask_image is not None else "img2img")
    defaults = PIPELINE_DEFAULTS.get((spec.pipeline_class or "", task)) or DEFAULTS[(spec.family, task)]
    if spec.controlnets:
        defaults = CONTROL_DEFAULTS.get((spec.family, task), defaults)
    if task == "txt2img" and strength is not None:
        raise ArgumentError("strength", "applies to img2img and inpainting; pass an image as well, or drop it")

    # 2. numbers
    if output_type not in OUTPUT_TYPES:
        raise ArgumentError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    _positive_int(num_images_per_prompt, "num_images_per_prompt")
    steps = _positive_int(
        defaults.num_inference_steps if num_inference_steps is None else num_inference_steps, "num_inference_steps"
    )
    guidance = defaults.guidance_scale if guidance_scale is None else finite(guidance_scale, "guidance_scale")
    strength = defaults.strength if strength is None else finite(strength, "strength")
    if not 0.0 <= strength <= 1.0:
        raise ArgumentError("strength", f"must be in [0, 1], got {strength}")

    # 3. noise
    if generator is not None and seed is not None:
        raise ArgumentError("seed", "pass either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ArgumentError("seed", f"must be an int in [0, 2**63), got {seed!r}")
        generator = torch.Generator("cpu").manual_seed(seed)
    prompts = as_prompt_list(prompt)
    batch = len(prompts) * num_images_per_prompt
    if isinstance(generator, Sequence) and len(generator) not in (1, batch):
        raise ArgumentError("generator", f"got {len(generator)} generators for {batch} images; give one or {batch}")

    # 4. control, then the size (a ControlNet run defaults to its control image's size)
    control = ControlInputs.build(
        spec.controlnets,
        control_image,
        controlnet_conditioning_scale,
        guess_mode or spec.controlnet_pools_conditions,
        control_guidance_start,
        control_guidance_end,
        defaults.control_scale,
    )
    if control is not None and height is None and width is None:
        if task == "inpaint":  # diffusers' ControlNet inpainting: the init image's size
            assert image is not None
            height, width = default_size(image, None, None, spec.vae_scale_factor)
        else:
            height, width = control.size(spec.vae_scale_factor)
    height, width = _size(spec, task, image, height, width)
    if mask_image is not None and image is not None and image_size(mask_image) != image_size(image):
        raise ArgumentError(
            "mask_image", f"is {image_size(mask_image)} (h, w) but image is {image_size(image)}; give them one size"
        )

    # 5. step caching: DeepCache splits a UNet (and not one driven by ControlNets' residuals), the
    # first-block cache a transformer
    policy = parse_cache(cache)
    unet = not spec.is_transformer
    if isinstance(policy, DeepCache) and not unet:
        label = "Flux" if spec.family == "flux" else "SD3"
        raise ArgumentError("cache", f"deepcache splits a UNet; {label} is a transformer: use first-block")
    if isinstance(policy, DeepCache) and control is not None:
        raise ArgumentError("cache", "deepcache with ControlNets is not supported yet; drop one of them")
    if policy is not None and not isinstance(policy, DeepCache) and unet:
        raise ArgumentError("cache", "first-block caches a transformer's blocks; for a UNet use deepcache")
    if isinstance(policy, DeepCache):
        policy.refresh_steps(steps)  # a non-uniform schedule this run cannot have: refused before any work

    # A guidance-distilled UNet takes the guidance scale as an input instead: no doubled batch. So does
    # FLUX.1-dev (schnell has no guidance at all); Flux doubles it only for true CFG, as FluxPipeline
    # runs the transformer on the negative prompt when true_cfg_scale > 1 and one is given.
    cfg = guidance > 1.0 and spec.time_cond_proj_dim is None and spec.family != "flux"
    true_cfg = None
    if spec.family == "flux":
        true_cfg = finite(family_options.pop("true_cfg_scale", 1.0), "true_cfg_scale")
        cfg = true_cfg > 1.0
        if cfg and negative_prompt is None:
            raise ArgumentError(
                "true_cfg_scale", "true CFG needs a negative_prompt (FluxPipeline would run without it)"
            )
        if not cfg and negative_prompt is not None:
            raise ArgumentError(
                "negative_prompt", "Flux reads a negative prompt only with true_cfg_scale > 1 (true CFG); set it"
            )
        if cfg and isinstance(policy, FirstBlockCache) and policy.threshold is not None:
            # FluxPipeline's cache keeps one state per half; the loop runs both halves in one call
            raise ArgumentError(
                "cache",
                "true CFG with a first-block threshold would decide for both halves at once, where FluxPipeline "
                "decides per half: use first-block:interval=N",
            )
    return GenerateRequest(
        task=task,
        cfg=cfg,
        prompts=_prompt_inputs(
            spec,
            has_t5,
            prompts,
            cfg,
            (height, width),
            {"negative_prompt": negative_prompt, **family_options},
        ),
        prompt_count=len(prompts),
        images_per_prompt=num_images_per_prompt,
        steps=steps,
        guidance_scale=guidance,
        strength=strength,
        height=height,
        width=width,
        output_type=output_type,
        image=image,
        mask_image=mask_image,
        generator=generator,
        return_trajectory=return_trajectory,
        progress=progress,
        control=control,
        cache=policy,
        true_cfg_scale=true_cfg if cfg else None,
    )


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(argument, f"must be a positive int, got {value!r}")
    return value


def _size(spec: PipelineSpec, task: Task, image: ImageInput | None, height: int | None, width: int | None):
    """diffusers' default size: the denoiser's sample size, or the input image's for SD/SDXL img2img."""
    multiple = spec.size_multiple
    if task == "img2img" and not spec.is_transformer and height is None and width is None:
        assert image is not None
        image_h, image_w = image_size(image)
        if image_h < multiple or image_w < multiple:
            raise ArgumentError(
                "image", f"is {image_w}x{image_h} pixels; this model needs at least {multiple}x{multiple}"
            )
        height, width = default_size(image, None, None, spec.vae_scale_factor)
    height = spec.native_size if height is None else height
    width = spec.native_size if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ArgumentError(name, f"must be a positive multiple of {multiple} for this model, got {value!r}")
    return height, width


def _prompt_inputs(
    spec: PipelineSpec,
    has_t5: bool,
    prompts: list[str],
    do_cfg: bool,
    size: tuple[int, int],
    options: dict[str, Any],
) -> PromptInputs:
    """The family's prompt inputs; an option only another family takes is refused by name."""
    builders: dict[str, Callable[..., PromptInputs]] = {
        "sd": SDPrompts.build,
        "sdxl": SDXLPrompts.build,
        "sd3": SD3Prompts.build,
        "flux": FluxPrompts.build,
    }
    parameters = inspect.signature(builders[spec.family]).parameters.values()
    accepted = {p.name for p in parameters if p.kind == p.KEYWORD_ONLY}
    accepted.add("negative_prompt")
    for name in options:
        if name not in accepted:
            raise ArgumentError(name, f"is not an option of a {spec.family} pipeline")
    if spec.family == "sd":
        return SDPrompts.build(prompts, do_cfg, **options)
    if spec.family == "sdxl":
        return SDXLPrompts.build(
            prompts,
            do_cfg,
            size,
            force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt,
            requires_aesthetics_score=spec.requires_aesthetics_score,
            **options,
        )
    if spec.family == "flux":
        return FluxPrompts.build(prompts, do_cfg, **options)
    assert spec.joint_attention_dim is not None  # every SD3 spec has one
    return SD3Prompts.build(prompts, do_cfg, joint_attention_dim=spec.joint_attention_dim, has_t5=has_t5, **options)
