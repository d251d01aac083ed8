"""LCM (Luo et al. 2023): multistep sampling of a latent consistency model.

Reproduces diffusers' `LCMScheduler` (0.42). The schedule picks `n` evenly spaced entries of the
distillation schedule (`original_inference_steps` points, every T/original-th training timestep);
each step maps the sample to the model's estimate of x_0 through the consistency boundary
condition (c_skip x + c_out x_0), then, except at the last step, noises it back to the next
timestep with fresh noise. Dynamic thresholding is rejected at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from difflower.errors import ArgumentError
from difflower.reference.schedulers.base import (
    BetaSchedule,
    Generator,
    PredictionType,
    SchedulerBase,
    TimestepSpacing,
    check_step_index,
    predicted_original_sample,
    randn_like_diffusers,
)
from difflower.reference.schedulers.betas import (
    AlphaProductRun,
    alphas_cumprod_for,
    check_trained_betas,
)

# The consistency models' data standard deviation, in their boundary condition (diffusers' sigma_data).
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCMConfig:
    """diffusers' `LCMScheduler` config fields and defaults (TCDScheduler's are the same)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0  # kept for config round trips: the LCM schedule does not offset
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"  # likewise unused by the LCM schedule
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"field 'original_inference_steps' must be in 1..{self.num_train_timesteps}, "
                f"got {self.original_inference_steps}"
            )
        check_trained_betas(self.trained_betas, self.num_train_timesteps)


def distillation_timesteps(config: LCMConfig, num_inference_steps: int) -> np.ndarray:
    """n descending int64 timesteps, evenly spaced (by index) over the distillation schedule."""
    original_steps = config.original_inference_steps
    if num_inference_steps > original_steps:
        raise ArgumentError(
            "num_inference_steps",
            f"{num_inference_steps} is more than the {original_steps} steps this model was distilled with "
            "(original_inference_steps); use at most that many",
        )
    k = config.num_train_timesteps // original_steps
    origin = (np.asarray(list(range(1, original_steps + 1))) * k - 1)[::-1].copy()  # descending
    indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[indices]


def boundary_scalings(timestep: int, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) of the discrete-time boundary condition, in diffusers' float32 ops."""
    scaled = torch.tensor(timestep) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.item(), c_out.item()


class LCMScheduler(SchedulerBase[LCMConfig]):
    """LCM multistep sampling; every step but the last draws fresh noise."""

    class_name = "LCMScheduler"
    config_class = LCMConfig
    # Only read by dynamic thresholding, which is rejected below.
    ignored_fields = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
    unsupported_fields = MappingProxyType({"thresholding": False})

    def __init__(self, config: LCMConfig):
        super().__init__(config)
        self._alphas_cumprod = alphas_cumprod_for(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        # The alpha after the last step: 1 (fully denoised) or the first training alpha.
        self._final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self._alphas_cumprod[0]

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> LCMRun:
        timesteps = distillation_timesteps(self._config, num_inference_steps)
        values = [int(t) for t in timesteps]
        # The next timestep of the last step is itself (diffusers' choice; it adds no noise there).
        steps = [self._coefficients(t, values[i + 1] if i + 1 < len(values) else t) for i, t in enumerate(values)]
        return LCMRun(torch.from_numpy(timesteps).to(device), steps, self._alphas_cumprod, self._config)

    def _coefficients(self, t: int, prev_t: int) -> _LCMStep:
        """The step's scalars, computed with diffusers' float32 ops so they match it bit for bit."""
        alpha_prod_t = self._alphas_cumprod[t]
        alpha_prod_t_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        c_skip, c_out = boundary_scalings(t, self._config.timestep_scaling)
        return _LCMStep(
            sqrt_alpha_prod=alpha_prod_t.sqrt().item(),
            sqrt_beta_prod=(1 - alpha_prod_t).sqrt().item(),
            sqrt_alpha_prod_prev=alpha_prod_t_prev.sqrt().item(),
            sqrt_beta_prod_prev=(1 - alpha_prod_t_prev).sqrt().item(),
            c_skip=c_skip,
            c_out=c_out,
        )


@dataclass(frozen=True)
class _LCMStep:
    sqrt_alpha_prod: float
    sqrt_beta_prod: float
    sqrt_alpha_prod_prev: float
    sqrt_beta_prod_prev: float
    c_skip: float
    c_out: float


class LCMRun(AlphaProductRun[_LCMStep, LCMConfig]):
    """One LCM sampling run; stateless between steps."""

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """The sample at the next timestep: the consistency estimate, re-noised unless this is the last step."""
        check_step_index(step_index, len(self._steps))
        c = self._steps[step_index]
        config = self._config

        # 1. predicted original sample (x_0)
        pred_original_sample = predicted_original_sample(
            config.prediction_type, sample, model_output, c.sqrt_alpha_prod, c.sqrt_beta_prod
        )
        if config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)

        # 2. the boundary condition: the consistency function's output
        denoised = c.c_out * pred_original_sample + c.c_skip * sample

        # 3. fresh noise to the next timestep, except after the last step (and in one-step sampling)
        if step_index == len(self._steps) - 1:
            return denoised
        noise = randn_like_diffusers(model_output.shape, generator, model_output.device, denoised.dtype)
        return c.sqrt_alpha_prod_prev * denoised + c.sqrt_beta_prod_prev * noise
