"""DDPM (Ho et al. 2020): ancestral sampling of the posterior q(x_{t-1} | x_t, x_0).

Reproduces diffusers' `DDPMScheduler` (0.42) with the fixed variances ("fixed_small",
"fixed_small_log"); learned variances and dynamic thresholding are rejected at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

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
from difflower.reference.schedulers.spacing import discrete_timesteps


@dataclass(frozen=True)
class DDPMConfig:
    """diffusers' `DDPMScheduler` config fields and defaults (the supported subset)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: Literal["fixed_small", "fixed_small_log"] = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        check_trained_betas(self.trained_betas, self.num_train_timesteps)


class DDPMScheduler(SchedulerBase[DDPMConfig]):
    """DDPM ancestral sampling; every step but the one at t = 0 draws fresh noise."""

    class_name = "DDPMScheduler"
    config_class = DDPMConfig
    # Only read by dynamic thresholding, which is rejected below.
    ignored_fields = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
    unsupported_fields = MappingProxyType({"thresholding": False})

    def __init__(self, config: DDPMConfig):
        super().__init__(config)
        self._alphas_cumprod = alphas_cumprod_for(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> DDPMRun:
        """A new run of `num_inference_steps` steps with its per-step coefficients."""
        config = self._config
        timesteps = discrete_timesteps(
            config.timestep_spacing, config.num_train_timesteps, num_inference_steps, config.steps_offset
        )
        values = [int(t) for t in timesteps]
        # Unlike DDIM, the previous timestep is the next entry of the schedule (-1 after the last).
        steps = [self._coefficients(t, values[i + 1] if i + 1 < len(values) else -1) for i, t in enumerate(values)]
        return DDPMRun(
            timesteps=torch.from_numpy(timesteps).to(device),
            steps=steps,
            alphas_cumprod=self._alphas_cumprod,
            config=config,
        )

    def _coefficients(self, t: int, prev_t: int) -> _DDPMStep:
        """The step's scalars, computed with diffusers' float32 ops so they match it bit for bit."""
        one = torch.tensor(1.0)
        alpha_prod_t = self._alphas_cumprod[t]
        alpha_prod_t_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # Posterior variance beta~_t (DDPM eq. 7), floored so its log stays finite.
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        variance = torch.clamp(variance, min=1e-20)
        if self._config.variance_type == "fixed_small_log":
            noise_scale = torch.exp(0.5 * torch.log(variance))
        else:
            noise_scale = variance**0.5

        return _DDPMStep(
            sqrt_alpha_prod=(alpha_prod_t**0.5).item(),
            sqrt_beta_prod=(beta_prod_t**0.5).item(),
            # Posterior mean coefficients (DDPM eq. 7).
            pred_original_sample_coeff=((alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t).item(),
            current_sample_coeff=(current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t).item(),
            noise_scale=noise_scale.item(),
            adds_noise=t > 0,
        )


@dataclass(frozen=True)
class _DDPMStep:
    sqrt_alpha_prod: float
    sqrt_beta_prod: float
    pred_original_sample_coeff: float
    current_sample_coeff: float
    noise_scale: float
    adds_noise: bool


class DDPMRun(AlphaProductRun[_DDPMStep, DDPMConfig]):
    """One DDPM sampling run; stateless between steps."""

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """x_{t-1} sampled from the posterior at `timesteps[step_index]`."""
        check_step_index(step_index, len(self._steps))
        c = self._steps[step_index]
        config = self._config

        # 1. predicted original sample (x_0)
        pred_original_sample = predicted_original_sample(
            config.prediction_type, sample, model_output, c.sqrt_alpha_prod, c.sqrt_beta_prod
        )

        # 2. clip x_0 (pixel-space models trained on [-1, 1])
        if config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)

        # 3. posterior mean mu~_t(x_t, x_0)
        pred_prev_sample = c.pred_original_sample_coeff * pred_original_sample + c.current_sample_coeff * sample

        # 4. add sigma_t z, except at t = 0 where the posterior is a point
        if c.adds_noise:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            pred_prev_sample = pred_prev_sample + c.noise_scale * noise
        return pred_prev_sample
