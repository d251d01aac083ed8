"""Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 2 with no churn).

Reproduces diffusers' `EulerDiscreteScheduler` (0.42) with linear sigma interpolation,
optional Karras sigmas and s_churn = 0 (the pipelines' default). Exponential, beta and
continuous-time variants are rejected at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch

from difflower.reference.schedulers.base import (
    BetaSchedule,
    Generator,
    PredictionType,
    SchedulerBase,
    TimestepSpacing,
    check_step_index,
)
from difflower.reference.schedulers.betas import check_trained_betas, sigma_alphas_cumprod
from difflower.reference.schedulers.spacing import karras_sigmas, sigmas_to_timesteps, spaced_timesteps


@dataclass(frozen=True)
class EulerConfig:
    """diffusers' `EulerDiscreteScheduler` config fields and defaults (the supported subset)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: PredictionType = "epsilon"
    interpolation_type: Literal["linear"] = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: TimestepSpacing = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        check_trained_betas(self.trained_betas, self.num_train_timesteps)


class EulerScheduler(SchedulerBase[EulerConfig]):
    """Euler discrete sampler in the sigma parametrisation (x = x_0 + sigma * eps)."""

    class_name = "EulerDiscreteScheduler"
    config_class = EulerConfig
    unsupported_fields = MappingProxyType(
        {"use_exponential_sigmas": False, "use_beta_sigmas": False, "timestep_type": "discrete"}
    )

    def __init__(self, config: EulerConfig):
        super().__init__(config)
        self._alphas_cumprod = sigma_alphas_cumprod(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> EulerRun:
        """A new run: n float32 timesteps and n + 1 sigmas (the last one 0 or sigma_min)."""
        config = self._config
        timesteps, sigmas = euler_schedule(
            self._alphas_cumprod,
            num_inference_steps,
            config.timestep_spacing,
            config.steps_offset,
            use_karras_sigmas=config.use_karras_sigmas,
            sigma_min=config.sigma_min,
            sigma_max=config.sigma_max,
            final_sigmas_type=config.final_sigmas_type,
        )
        return EulerRun(
            timesteps=torch.from_numpy(timesteps).to(device),
            sigmas=torch.from_numpy(sigmas),
            prediction_type=config.prediction_type,
            init_noise_sigma=initial_sigma(torch.from_numpy(sigmas), config.timestep_spacing),
        )


def euler_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: TimestepSpacing,
    steps_offset: int,
    *,
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) as float32 arrays of length n and n + 1, by diffusers' numpy recipe.

    Shared with Euler-ancestral, whose schedule is this one without Karras sigmas.
    """
    num_train_timesteps = len(alphas_cumprod)
    timesteps = spaced_timesteps(timestep_spacing, num_train_timesteps, num_inference_steps, steps_offset).astype(
        np.float32
    )

    # sigma of each training timestep, then interpolated at the (possibly fractional) timesteps
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

    if use_karras_sigmas:
        sigma_min = sigma_min if sigma_min is not None else sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else sigmas[0].item()
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
        timesteps = sigmas_to_timesteps(sigmas, log_sigmas)

    if final_sigmas_type == "sigma_min":
        sigma_last = (((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5).item()
    else:
        sigma_last = 0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    return timesteps.astype(np.float32), sigmas


def initial_sigma(sigmas: torch.Tensor, timestep_spacing: TimestepSpacing) -> float:
    """The scale of the starting noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing.

    sqrt(sigma^2 + 1) is the std of x_0 + sigma * eps for unit-variance x_0; diffusers uses it
    only with "leading" spacing and sigma_max alone otherwise. Kept as it is, for parity.
    """
    max_sigma = sigmas.max()
    if timestep_spacing in ("linspace", "trailing"):
        return max_sigma.item()
    return ((max_sigma**2 + 1) ** 0.5).item()


@dataclass(frozen=True)
class _SigmaStep:
    sigma: float
    input_scale: float
    v_output_coeff: float
    v_sample_divisor: float


def sigma_steps(sigmas: torch.Tensor) -> list[_SigmaStep]:
    """Per-step scalars of the sigma-parametrised samplers, in diffusers' float32 ops."""
    steps = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        steps.append(
            _SigmaStep(
                sigma=sigma.item(),
                input_scale=((sigma**2 + 1) ** 0.5).item(),
                v_output_coeff=(-sigma / (sigma**2 + 1) ** 0.5).item(),
                v_sample_divisor=(sigma**2 + 1).item(),
            )
        )
    return steps


class EulerRun:
    """One Euler run; stateless between steps."""

    order = 1

    def __init__(
        self,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        prediction_type: PredictionType,
        init_noise_sigma: float,
    ):
        self.timesteps = timesteps
        self.sigmas = sigmas
        self.init_noise_sigma = init_noise_sigma
        self._prediction_type = prediction_type
        self._steps = sigma_steps(sigmas)
        # dt = sigma_{i+1} - sigma_i, in float32 as diffusers subtracts the two table entries.
        self._dts = [(sigmas[i + 1] - sigmas[i]).item() for i in range(len(sigmas) - 1)]

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the denoiser was trained on unit-variance-ish inputs."""
        check_step_index(step_index, len(self._steps))
        return sample / self._steps[step_index].input_scale

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """x at sigma_{i+1} by one Euler step from sigma_i."""
        check_step_index(step_index, len(self._steps))
        c = self._steps[step_index]
        # Upcast: the update adds a small dt * derivative to a large sample.
        sample = sample.to(torch.float32)

        # 1. predicted original sample (x_0)
        if self._prediction_type == "epsilon":
            pred_original_sample = sample - c.sigma * model_output
        elif self._prediction_type == "v_prediction":
            pred_original_sample = model_output * c.v_output_coeff + (sample / c.v_sample_divisor)
        else:  # sample
            pred_original_sample = model_output

        # 2. ODE derivative dx/dsigma = (x - x_0) / sigma, then one Euler step
        derivative = (sample - pred_original_sample) / c.sigma
        prev_sample = sample + derivative * self._dts[step_index]
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """x_0 + sigma * noise at sigma = sigmas[step_index] (in the sample's dtype, as diffusers)."""
        check_step_index(step_index, len(self.timesteps))
        sigma = self.sigmas[step_index].to(dtype=original_samples.dtype)
        return original_samples + noise * sigma
