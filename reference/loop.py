"""The denoising loop: the one piece of code every engine's denoiser runs under.

Per step: the model input (the latents, doubled for classifier-free guidance, scaled by the
scheduler; 9-channel inpainting denoisers also get the mask and the masked image), the
ControlNets' residuals (`ControlRun`, when the pipeline has ControlNets), one denoiser call
through `ModelCalls`, the guidance mix, the scheduler step and, for 4- and 16-channel
inpainting, the blend that keeps the unmasked region on the image's own noised trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from difflower.reference.control import ControlInputs
from difflower.reference.latents import StartState
from difflower.reference.model_calls import ModelCalls, Residuals
from difflower.reference.prompts import Conditioning
from difflower.reference.request import GenerateRequest
from difflower.reference.schedulers import SchedulerRun
from difflower.reference.spec import PipelineSpec
from difflower.reference.step_cache import CachePolicy, DeepCache, FirstBlockCache


@dataclass(frozen=True)
class ControlRun:
    """The ControlNets of one run: their names, prepared images and per-step scales."""

    names: list[str]
    control: ControlInputs
    images: list[torch.Tensor]
    start: int  # the scheduler index the loop starts at (img2img and inpainting skip some)
    steps: int  # the steps the loop runs (diffusers' len(timesteps) after img2img's cut)
    do_cfg: bool

    def keep(self, k: int, step: int) -> float:
        """1 inside ControlNet k's guidance window at `step` (0-based within the run), else 0."""
        outside = step / self.steps < self.control.starts[k] or (step + 1) / self.steps > self.control.ends[k]
        return 1.0 - float(outside)

    def residuals(
        self,
        calls: ModelCalls,
        i: int,
        latents: torch.Tensor,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        run: SchedulerRun,
    ) -> Residuals | None:
        """The summed residuals of every ControlNet at `step` (None when every ControlNet is
        outside its window: diffusers adds zeros then, which changes nothing), batched like
        `model_input`; `i` is the scheduler index."""
        step = i - self.start
        guess_cfg = self.control.guess_mode and self.do_cfg
        if guess_cfg:  # only the conditional half goes through the ControlNets
            control_input = run.scale_model_input(latents, i)
            control_cond = cond.positive_half()
        else:
            control_input, control_cond = model_input, cond
        total: Residuals | None = None
        for k, name in enumerate(self.names):
            scale = self.control.scales[k] * self.keep(k, step)
            if scale == 0.0:  # diffusers adds this net's residuals times zero
                continue
            down, mid = calls.controlnet(
                name,
                control_input,
                timestep.expand(control_input.shape[0]),
                control_cond,
                self.images[k],
                scale,
                self.control.guess_mode,
            )
            if total is None:
                total = Residuals(down, mid)
            else:  # diffusers' MultiControlNetModel: the nets' residuals summed in order
                total = Residuals([a + b for a, b in zip(total.down, down, strict=True)], total.mid + mid)
        if total is not None and guess_cfg:  # the unconditional half gets no control
            total = Residuals(
                [torch.cat([torch.zeros_like(d), d]) for d in total.down],
                torch.cat([torch.zeros_like(total.mid), total.mid]),
            )
        return total


@dataclass(frozen=True)
class LoopResult:
    """The final latents, the latents after every step (when asked) and the timesteps run."""

    latents: torch.Tensor
    trajectory: list[torch.Tensor] | None
    timesteps: list[float]
    full_steps: list[bool] | None = None  # with a step cache: which steps ran the whole denoiser


def denoise(
    request: GenerateRequest,
    spec: PipelineSpec,
    calls: ModelCalls,
    run: SchedulerRun,
    start: int,
    cond: Conditioning,
    state: StartState,
    control: ControlRun | None = None,
) -> LoopResult:
    """Run `run`'s steps from index `start` on `state.latents`."""
    latents = state.latents  # (B, C, h, w)
    trajectory: list[torch.Tensor] | None = [] if request.return_trajectory else None
    blend = request.task == "inpaint" and spec.denoiser_in_channels == spec.latent_channels
    concat_mask = request.task == "inpaint" and not blend
    indices = range(start, len(run.timesteps))
    cached = _CachedDenoiser.for_policy(request.cache, len(indices))
    for i in tqdm(indices, disable=not request.progress, desc=f"{spec.family} {request.task}", leave=False):
        t = run.timesteps[i]
        model_input = torch.cat([latents] * 2) if request.do_cfg else latents  # (2B or B, C, h, w)
        model_input = run.scale_model_input(model_input, i)
        # the ControlNets read the latents before the inpainting channels are added
        residuals = control.residuals(calls, i, latents, model_input, t, cond, run) if control else None
        if concat_mask:
            assert state.mask is not None and state.masked_latents is not None
            # (2B or B, C + 1 + C, h, w): what the 9-channel inpainting UNet reads
            model_input = torch.cat([model_input, state.mask, state.masked_latents], dim=1)
        timestep = t.expand(model_input.shape[0])
        if cached is None:
            prediction = calls.denoiser(model_input, timestep, cond, residuals)
        else:
            prediction = cached(calls, i - start, model_input, timestep, cond)
        if request.do_cfg:
            uncond, text = prediction.chunk(2)  # (B, C, h, w) each: negatives first
            prediction = uncond + request.cfg_scale * (text - uncond)
        latents = run.step(prediction, i, latents, generator=request.generator)
        if blend:
            latents = _blend(latents, state, run, i, request.do_cfg)
        if trajectory is not None:
            trajectory.append(latents.detach().cpu().clone())
    timesteps = [float(run.timesteps[i]) for i in indices]
    return LoopResult(latents, trajectory, timesteps, cached.full_steps if cached is not None else None)


class _CachedDenoiser:
    """The denoiser under a step cache: what it keeps between steps, and which steps ran it whole."""

    def __init__(self) -> None:
        self.full_steps: list[bool] = []

    @staticmethod
    def for_policy(policy: CachePolicy | None, steps: int) -> _CachedDenoiser | None:
        """The cached denoiser of a run of `steps` steps under `policy` (None: uncached)."""
        if policy is None:
            return None
        return _DeepCacheRun(policy, steps) if isinstance(policy, DeepCache) else _FirstBlockRun(policy)

    def __call__(
        self, calls: ModelCalls, step: int, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        raise NotImplementedError


class _DeepCacheRun(_CachedDenoiser):
    """The whole UNet on refresh steps, else its shallow path fed the kept deep feature."""

    def __init__(self, policy: DeepCache, steps: int):
        super().__init__()
        self.policy = policy
        self.refresh = set(policy.refresh_steps(steps))
        self.feature: torch.Tensor | None = None

    def __call__(self, calls, step, sample, timestep, cond):
        full = self.feature is None or step in self.refresh
        prediction, deep = calls.denoiser_deepcache(
            sample, timestep, cond, self.policy.branch, None if full else self.feature
        )
        if full:
            self.feature = deep
        self.full_steps.append(full)
        return prediction


class _FirstBlockRun(_CachedDenoiser):
    """The first block every step; the blocks after it when the policy says so (their tail residual
    kept), else that residual reused on the first block's fresh tokens. In fixed-interval mode the
    first block runs alone only on the steps that reuse (a full step needs nothing from it)."""

    def __init__(self, policy: FirstBlockCache):
        super().__init__()
        self.policy = policy
        self.first_residual: torch.Tensor | None = None  # at the last step that ran every block
        self.tail: torch.Tensor | None = None

    def __call__(self, calls, step, sample, timestep, cond):
        first = residual = None
        if self.policy.threshold is not None:  # the decision reads its residual
            first, residual = calls.first_block(sample, timestep, cond)
        full = self.tail is None or self.policy.run_all(step, residual, self.first_residual)
        self.full_steps.append(full)
        if not full:
            if first is None:  # fixed interval: the first block runs alone only on reusing steps
                first, _ = calls.first_block(sample, timestep, cond)
            assert self.tail is not None
            return calls.denoiser_from_cache(first, self.tail, timestep, cond)
        prediction, self.tail = calls.denoiser_with_tail(sample, timestep, cond)
        self.first_residual = residual
        return prediction


def _blend(latents: torch.Tensor, state: StartState, run: SchedulerRun, i: int, do_cfg: bool) -> torch.Tensor:
    """Keep the unmasked region on the image's own noised trajectory (4-/16-channel inpainting)."""
    assert state.mask is not None and state.image_latents is not None and state.noise is not None
    init_mask = state.mask.chunk(2)[0] if do_cfg else state.mask  # (B, 1, h, w): one CFG half
    known = state.image_latents
    if i < len(run.timesteps) - 1:
        known = run.add_noise(state.image_latents, state.noise, i + 1)
    return (1 - init_mask) * known + init_mask * latents
