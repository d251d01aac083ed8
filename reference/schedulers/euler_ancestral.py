"""Euler ancestral: an Euler step to sigma_down, then fresh noise of scale sigma_up.

Reproduces diffusers' `EulerAncestralDiscreteScheduler` (0.42). The split of sigma_{i+1}^2
into sigma_down^2 + sigma_up^2 follows k-diffusion's `get_ancestral_step` with eta = 1. Its
schedule is Euler's (linear interpolation, final sigma 0), shared from `euler.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from difflower.reference.schedulers.base import (
    BetaSchedule,
    Generator,
    SchedulerBase,
    TimestepSpacing,
    check_step_index,
    randn_like_diffusers,
)
from difflower.reference.schedulers.betas import check_trained_betas, sigma_alphas_cumprod
from difflower.reference.schedulers.euler import euler_schedule, initial_sigma, sigma_steps


@dataclass(frozen=True)
class EulerAncestralConfig:
    """diffusers' `EulerAncestralDiscreteScheduler` config fields and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    # diffusers raises NotImplementedError for "sample" here, so it is refused at load time.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    timestep_spacing: TimestepSpacing = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        check_trained_betas(self.trained_betas, self.num_train_timesteps)


class EulerAncestralScheduler(SchedulerBase[EulerAncestralConfig]):
    """Euler ancestral sampler; every step draws fresh noise."""

    class_name = "EulerAncestralDiscreteScheduler"
    config_class = EulerAncestralConfig

    def __init__(self, config: EulerAncestralConfig):
        super().__init__(config)
        self._alphas_cumprod = sigma_alphas_cumprod(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> EulerAncestralRun:
        """A new run: n float32 timesteps and n + 1 sigmas ending in 0."""
        config = self._config
        timesteps, sigmas = euler_schedule(
            self._alphas_cumprod, num_inference_steps, config.timestep_spacing, config.steps_offset
        )
        return EulerAncestralRun(
            timesteps=torch.from_numpy(timesteps).to(device),
            sigmas=torch.from_numpy(sigmas),
            prediction_type=config.prediction_type,
            init_noise_sigma=initial_sigma(torch.from_numpy(sigmas), config.timestep_spacing),
        )


@dataclass(frozen=True)
class _AncestralSplit:
    sigma_up: float
    dt: float


def ancestral_splits(sigmas: torch.Tensor) -> list[_AncestralSplit]:
    """sigma_up and dt = sigma_down - sigma_i of each step, in diffusers' float32 ops."""
    splits = []
    for i in range(len(sigmas) - 1):
        sigma_from = sigmas[i]
        sigma_to = sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        splits.append(_AncestralSplit(sigma_up=sigma_up.item(), dt=(sigma_down - sigma_from).item()))
    return splits


class EulerAncestralRun:
    """One Euler-ancestral run; stateless between steps (the noise comes from the caller's generator)."""

    order = 1

    def __init__(
        self,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        prediction_type: Literal["epsilon", "v_prediction"],
        init_noise_sigma: float,
    ):
        self.timesteps = timesteps
        self.sigmas = sigmas
        self.init_noise_sigma = init_noise_sigma
        self._prediction_type = prediction_type
        self._steps = sigma_steps(sigmas)
        self._splits = ancestral_splits(sigmas)

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
        """x at sigma_{i+1}: Euler to sigma_down, plus sigma_up * fresh noise (drawn at every step)."""
        check_step_index(step_index, len(self._steps))
        c = self._steps[step_index]
        split = self._splits[step_index]
        # Upcast: the update adds a small dt * derivative to a large sample.
        sample = sample.to(torch.float32)

        # 1. predicted original sample (x_0)
        if self._prediction_type == "epsilon":
            pred_original_sample = sample - c.sigma * model_output
        else:  # v_prediction
            pred_original_sample = model_output * c.v_output_coeff + (sample / c.v_sample_divisor)

        # 2. deterministic Euler step to sigma_down
        derivative = (sample - pred_original_sample) / c.sigma
        prev_sample = sample + derivative * split.dt

        # 3. ancestral noise; drawn even on the last step (sigma_up = 0) so the generator
        # advances exactly as diffusers' does
        noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = prev_sample + noise * split.sigma_up
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """x_0 + sigma * noise at sigma = sigmas[step_index] (in the sample's dtype, as diffusers)."""
        check_step_index(step_index, len(self.timesteps))
        sigma = self.sigmas[step_index].to(dtype=original_samples.dtype)
        return original_samples + noise * sigma
