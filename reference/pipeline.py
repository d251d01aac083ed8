"""The golden pipeline: txt2img, img2img and inpainting for SD 1.x/2.x, SDXL and SD3.

`DiffusionPipeline` reproduces diffusers' pipelines step for step (the same generator draws in
the same order, the same scheduler calls, the same guidance and blending), so with the eager
components it is the golden source every backend is compared with. A call runs four stages,
each in its own module:

1. `request.build_request`: the arguments, checked and defaulted once (and the memory estimate);
2. `prompts`: the family's prompt inputs encoded to the denoiser's conditioning;
3. `latents.prepare_latents` and `loop.denoise`: the starting state and the one loop;
4. decoding: the VAE decoder and the image post-processing.

It reaches the models only through a `ModelCalls` object (text encoders, denoiser, VAE
encode/decode), so an exported artifact runs through this same loop with its engines in place
of the torch modules: `TorchModelCalls` here, the runtimes' engine calls elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from difflower.errors import ArgumentError
from difflower.reference.compile import compile_regions
from difflower.reference.control import controlnet_name, prepare_control
from difflower.reference.embeddings import guidance_scale_embedding
from difflower.reference.images import ImageInput, OutputType, postprocess
from difflower.reference.latents import prepare_latents
from difflower.reference.loading import Family, load_components, load_controlnet, resolve_controlnet
from difflower.reference.loop import ControlRun, denoise
from difflower.reference.lora import Lora, check_components, fuse_loras
from difflower.reference.memory import check_memory as check_request_memory
from difflower.reference.model_calls import ModelCalls, Residuals
from difflower.reference.prompts import Conditioning, TextEncoderOutput
from difflower.reference.request import GenerateRequest, GeneratorArg, build_request
from difflower.reference.schedulers import (
    FlowMatchEulerScheduler,
    Scheduler,
    calculate_shift,
    load_scheduler,
    scheduler_by_name,
)
from difflower.reference.spec import PipelineSpec, spec_from_configs
from difflower.reference.step_cache import CachePolicy, DeepCache
from difflower.reference.transformer_flux import cached_inputs, packed_inputs, tokens_to_grid, unpack_latents


class TorchModelCalls:
    """ModelCalls over the eager reference modules (and transformers' text encoders)."""

    def __init__(self, components: dict[str, Any], family: Family):
        self.components = components
        self.family = family

    def has_component(self, name: str) -> bool:
        return self.components.get(name) is not None

    def prepare_run(self, request: GenerateRequest) -> None:
        """Eager modules take any shape and a checkpoint holds every component; a DeepCache
        branch must exist in this UNet, a first-block cache needs blocks after the first."""
        if isinstance(request.cache, DeepCache):
            try:
                self.components["unet"].deepcache_split(request.cache.branch)
            except ValueError as err:
                raise ArgumentError("cache", str(err)) from None
        elif request.cache is not None and self.components["transformer"].config.blocks_after_first < 1:
            raise ArgumentError("cache", "first-block needs a transformer of two blocks or more")

    @torch.no_grad()
    def text_encoder(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput:
        model = self.components[name]
        out = model(input_ids.to(model.device), output_hidden_states=True)
        hidden_states = getattr(out, "hidden_states", None)
        return TextEncoderOutput(
            last_hidden_state=out.last_hidden_state,
            penultimate_hidden_state=hidden_states[-2] if hidden_states is not None else None,
            text_embeds=getattr(out, "text_embeds", None),
            pooler_output=getattr(out, "pooler_output", None),
        )

    @torch.no_grad()
    def denoiser(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, residuals: Residuals | None = None
    ) -> torch.Tensor:
        if self.family == "sd3":
            return self.components["transformer"](*self._transformer_inputs(sample, timestep, cond))[0]
        if self.family == "flux":
            return self._flux(sample, timestep, cond)
        added = _text_time(cond)
        unet = self.components["unet"]
        context = cond.encoder_hidden_states
        return unet(
            sample,
            timestep,
            context,
            added_cond_kwargs=added,
            timestep_cond=cond.timestep_cond,
            down_block_additional_residuals=residuals.down if residuals is not None else None,
            mid_block_additional_residual=residuals.mid if residuals is not None else None,
        )[0]

    @torch.no_grad()
    def denoiser_deepcache(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        branch: int,
        feature: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        added = _text_time(cond)
        return self.components["unet"].forward_deepcache(
            sample,
            timestep,
            cond.encoder_hidden_states,
            branch,
            feature,
            added_cond_kwargs=added,
            timestep_cond=cond.timestep_cond,
        )

    @torch.no_grad()
    def first_block(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        transformer = self.components["transformer"]
        if self.family != "flux":
            return transformer.first_block(*self._transformer_inputs(sample, timestep, cond))
        first, residual = transformer.first_block(**flux_inputs(sample, timestep, cond))
        return tokens_to_grid(first, *sample.shape[-2:]), tokens_to_grid(residual, *sample.shape[-2:])

    @torch.no_grad()
    def denoiser_with_tail(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        transformer = self.components["transformer"]
        if self.family != "flux":
            return transformer.forward_with_tail(*self._transformer_inputs(sample, timestep, cond))
        output, tail = transformer.forward_with_tail(**flux_inputs(sample, timestep, cond))
        return unpack_latents(output, *sample.shape[-2:]), tokens_to_grid(tail, *sample.shape[-2:])

    @torch.no_grad()
    def denoiser_from_cache(
        self, first: torch.Tensor, tail_residual: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        transformer = self.components["transformer"]
        if self.family != "flux":
            return transformer.forward_from_cache(first, tail_residual, cond.pooled_projections, timestep)
        assert cond.pooled_projections is not None  # FluxPrompts always sets CLIP's pooled output
        inputs = cached_inputs(first, tail_residual, timestep, cond.pooled_projections, cond.guidance)
        return unpack_latents(transformer.forward_from_cache(**inputs), first.shape[2] * 2, first.shape[3] * 2)

    def _flux(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The Flux transformer on the loop's (B, C, h, w) latents: packed in, unpacked out."""
        return unpack_latents(self.components["transformer"](**flux_inputs(sample, timestep, cond))[0],
                              *sample.shape[-2:])  # fmt: skip

    @staticmethod
    def _transformer_inputs(sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning):
        return sample, cond.encoder_hidden_states, cond.pooled_projections, timestep

    @torch.no_grad()
    def controlnet(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        image: torch.Tensor,
        conditioning_scale: float,
        guess_mode: bool,
    ) -> Residuals:
        added = _text_time(cond)
        down, mid = self.components[name](
            sample,
            timestep,
            cond.encoder_hidden_states,
            image,
            conditioning_scale,
            guess_mode,
            added_cond_kwargs=added,
            return_dict=False,
        )
        return Residuals(down, mid)

    @torch.no_grad()
    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.components["vae"]
        return vae.encode(image.to(vae.dtype))[0]

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components["vae"]
        return vae.decode(latents.to(vae.dtype))[0]


def flux_inputs(sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
    """The Flux transformer's inputs (in its graph's order) for the loop's (B, C, h, w) latents."""
    assert cond.pooled_projections is not None  # FluxPrompts always sets CLIP's pooled output
    return packed_inputs(sample, timestep, cond.encoder_hidden_states, cond.pooled_projections, cond.guidance)


def _text_time(cond: Conditioning) -> dict[str, torch.Tensor] | None:
    """SDXL's added_cond_kwargs, when the run has them."""
    if cond.text_embeds is None or cond.time_ids is None:
        return None
    return {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}


@dataclass
class PipelineOutput:
    """`.images` as diffusers returns them; `.trajectory` the latents after every step (when asked)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: list[torch.Tensor] | None = None
    timesteps: list[float] = field(default_factory=list)
    full_steps: list[bool] | None = None  # with a step cache: which steps ran the whole denoiser


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
        return_trajectory: bool = False,
        progress: bool = True,
        check_memory: bool = True,
        control_image: ImageInput | list[ImageInput] | None = None,
        controlnet_conditioning_scale: float | list[float] | None = None,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        cache: str | CachePolicy | None = None,
        **family_options: Any,
    ) -> PipelineOutput:
        """Generate images; the task follows from the inputs (image -> img2img, image + mask -> inpaint).

        `family_options` are the family's own, named as diffusers names them: SDXL's `prompt_2`,
        `negative_prompt_2`, `original_size`, `crops_coords_top_left`, `target_size`,
        `aesthetic_score`, `negative_aesthetic_score`; SD3's `prompt_2`, `prompt_3`, their
        negatives, `max_sequence_length` and `skip_t5`. `check_memory=False` runs a size whose
        memory estimate exceeds what is available.

        With ControlNets: `control_image` (one per ControlNet; diffusers' ControlNet txt2img
        pipelines call it `image`), `controlnet_conditioning_scale`, `guess_mode` and
        `control_guidance_start`/`_end`, with diffusers' ControlNet pipelines' defaults.
        `cache` is a step-caching policy (`"deepcache:interval=3,branch=0"` for UNets,
        `"first-block:threshold=0.1"` or `"first-block:interval=2"` for transformers, or a
        `step_cache` policy object); the output's `full_steps` says which steps ran the whole denoiser.
        """
        request = build_request(
            self.spec,
            self.calls.has_component("text_encoder_3"),
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            seed=seed,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            image=image,
            mask_image=mask_image,
            strength=strength,
            return_trajectory=return_trajectory,
            progress=progress,
            control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            guess_mode=guess_mode,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
            cache=cache,
            **family_options,
        )
        return self.run(request, check_memory=check_memory)

    def run(self, request: GenerateRequest, check_memory: bool = True) -> PipelineOutput:
        """Run a checked request: every refusal happens before the first model call."""
        spec = self.spec

        # 1. guards: what the engines can serve, the memory it needs, the steps the scheduler can honour
        self.calls.prepare_run(request)
        if check_memory:
            check_request_memory(spec, request)
        run = self._set_timesteps(request)
        skipped = 0 if request.task == "txt2img" else self._start_index(request)
        if request.steps - skipped < 1:
            raise ArgumentError(
                "strength",
                f"{request.strength} with {request.steps} steps leaves no denoising step; raise strength or steps",
            )
        start = skipped * run.order  # img2img and inpainting start part-way, as diffusers' get_timesteps

        # 2. prompt conditioning: (B, ...) halves, batched negatives first for CFG
        positive, negative = request.prompts.encode(self._text, self.tokenizers, request.images_per_prompt)
        cond = Conditioning.for_guidance(negative, positive) if negative is not None else positive
        dtype = positive.encoder_hidden_states.dtype
        if spec.time_cond_proj_dim is not None:  # a guidance-distilled UNet: w - 1 as an embedding, (B, dim)
            w = torch.full((request.batch,), request.guidance_scale - 1)
            w_embedding = guidance_scale_embedding(w, spec.time_cond_proj_dim)
            cond = replace(cond, timestep_cond=w_embedding.to(self.device, dtype))
        if spec.guidance_embeds:  # FLUX.1-dev: the guidance scale is an input of the transformer
            batch = cond.encoder_hidden_states.shape[0]  # both halves under true CFG
            cond = replace(cond, guidance=torch.full((batch,), request.guidance_scale, dtype=torch.float32))

        # 3. the control images, the starting latents (drawing the generator in diffusers'
        #    order), then the loop
        control = self._control_run(request, start, len(run.timesteps) - start, dtype)
        state = prepare_latents(request, spec, self.calls, run, start, self.device, dtype)
        result = denoise(request, spec, self.calls, run, start, cond, state, control)

        # 4. decode
        if request.output_type == "latent":
            images: Any = result.latents
        else:
            decoded = self.calls.vae_decode(spec.from_latents(result.latents))  # (B, 3, H, W) in [-1, 1]
            images = postprocess(decoded.float(), request.output_type)
        return PipelineOutput(images, result.trajectory, result.timesteps, result.full_steps)

    def _control_run(self, request: GenerateRequest, start: int, steps: int, dtype: torch.dtype) -> ControlRun | None:
        if request.control is None:
            return None
        guess = request.control.guess_mode
        images = prepare_control(
            request.control,
            request.height,
            request.width,
            request.batch,
            request.images_per_prompt,
            request.do_cfg and not guess,
            self.spec.vae_scale_factor,
            self.device,
            dtype,
        )
        names = [controlnet_name(k) for k in range(self.spec.controlnets)]
        return ControlRun(names, request.control, images, start, steps, request.do_cfg)

    def _start_index(self, request: GenerateRequest) -> int:
        """How many scheduled steps img2img/inpainting skip (SD3 rounds differently from SD/SDXL)."""
        steps, strength = request.steps, request.strength
        if self.spec.is_transformer:
            return int(max(steps - min(steps * strength, steps), 0))
        return max(steps - min(int(steps * strength), steps), 0)

    def _set_timesteps(self, request: GenerateRequest) -> Any:
        """The scheduler's run; FluxPipeline gives flow-matching Euler its own sigmas, 1 down to 1/steps."""
        mu = self._mu(request)
        if self.spec.family == "flux" and isinstance(self.scheduler, FlowMatchEulerScheduler):
            sigmas = np.linspace(1.0, 1 / request.steps, request.steps)
            return self.scheduler.set_timesteps(request.steps, device=self.device, mu=mu, sigmas=sigmas)
        return self.scheduler.set_timesteps(request.steps, device=self.device, mu=mu)

    def _mu(self, request: GenerateRequest) -> float | None:
        """The flow-matching time shift for this image size, when the scheduler shifts dynamically."""
        config = self.scheduler.config
        if not getattr(config, "use_dynamic_shifting", False):
            return None
        patch = self.spec.vae_scale_factor * self.spec.patch_size
        tokens = (request.height // patch) * (request.width // patch)
        return calculate_shift(config, tokens)

    def _text(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput:
        return self.calls.text_encoder(name, input_ids.to(self.device))


# -- loading ---------------------------------------------------------------------------------------


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
    compile: bool = False,
    loras: Sequence[Lora] = (),
    controlnets: Sequence[Path | str] = (),
) -> DiffusionPipeline:
    """The eager reference pipeline of a diffusers-format checkpoint folder; `compile` compiles
    the denoiser's and the VAE's repeated blocks with torch.compile (see reference.compile);
    `loras` are fused into the denoiser and the text encoders (see reference.lora);
    `controlnets` (folders or Hub repo ids) drive the UNet (see reference.control)."""

    index, components = load_components(path, dtype=dtype, variant=variant)
    sources = [resolve_controlnet(source, index) for source in controlnets]
    check_components(loras, set(index.components))
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if loras and isinstance(components.get(name), torch.nn.Module):
            fuse_loras(components[name], name, loras)
    spec = spec_from_configs(index)
    for k, source in enumerate(sources):
        components[controlnet_name(k)] = load_controlnet(source.folder, dtype)
    if sources:
        spec = replace(
            spec, controlnets=len(sources), controlnet_pools_conditions=sources[0].config.global_pool_conditions
        )
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            components[name] = component.to(device)
    if compile:
        for name in ("unet", "transformer", "vae"):
            if name in components:
                compile_regions(components[name], where=name)
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
