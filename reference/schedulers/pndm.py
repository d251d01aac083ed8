"""PNDM in its PLMS mode (Liu et al. 2022): a linear multistep method on the DDIM transfer.

Reproduces diffusers' `PNDMScheduler` (0.42) with `skip_prk_steps=True`, the mode Stable
Diffusion 1.x checkpoints ship. The first step is an Euler step whose model output is kept;
the second evaluates the model at the step's end and redoes the step with the average of the
two outputs (the second schedule entry repeats a timestep for that). From then on the update
uses the Adams-Bashforth combination of up to four earlier outputs. The Runge-Kutta warm-up
(`skip_prk_steps=False`) is rejected at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from difflower.errors import ArgumentError
from difflower.reference.schedulers.base import (
    BetaSchedule,
    Generator,
    SchedulerBase,
    TimestepSpacing,
    check_step_index,
)
from difflower.reference.schedulers.betas import add_noise_alpha_prod, alphas_cumprod_for, check_trained_betas
from difflower.reference.schedulers.spacing import discrete_timesteps


@dataclass(frozen=True)
class PNDMConfig:
    """diffusers' `PNDMScheduler` config fields and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        check_trained_betas(self.trained_betas, self.num_train_timesteps)
        # diffusers' default (false) is the Runge-Kutta warm-up, which we do not implement; an
        # absent field means that default, so it is refused here rather than run as PLMS.
        if not self.skip_prk_steps:
            raise ValueError(
                "field 'skip_prk_steps' is false (or missing): difflower implements only PNDM's PLMS mode; "
                'set "skip_prk_steps": true as Stable Diffusion checkpoints do'
            )


class PNDMScheduler(SchedulerBase[PNDMConfig]):
    """PNDM with `skip_prk_steps=True` (PLMS)."""

    class_name = "PNDMScheduler"
    config_class = PNDMConfig

    def __init__(self, config: PNDMConfig):
        super().__init__(config)
        self._alphas_cumprod = alphas_cumprod_for(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            rescale_betas_zero_snr=False,
        )
        # The "previous" alpha of the last step: 1 (fully denoised) or the first training alpha.
        self._final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self._alphas_cumprod[0]

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> PNDMRun:
        """A new run: n + 1 timesteps for n steps (the second entry repeats the first step's end)."""
        config = self._config
        descending = discrete_timesteps(
            config.timestep_spacing, config.num_train_timesteps, num_inference_steps, config.steps_offset
        )
        ascending = descending[::-1]
        # [t_0 > t_1 > ... > t_last] becomes [t_0, t_1, t_1, t_2, ..., t_last]: the repeated t_1 is
        # where the second warm-up evaluation happens.
        timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].astype(np.int64)

        stride = config.num_train_timesteps // num_inference_steps
        values = [int(t) for t in timesteps]
        steps = [self._coefficients(t, t - stride) for t in values]
        # The second call of a run redoes the first step: from t + stride back to t.
        restart_steps = [
            self._coefficients(t + stride, t) if t + stride < config.num_train_timesteps else None for t in values
        ]
        return PNDMRun(
            timesteps=torch.from_numpy(timesteps.copy()).to(device),
            steps=steps,
            restart_steps=restart_steps,
            alphas_cumprod=self._alphas_cumprod,
            config=config,
        )

    def _coefficients(self, t: int, prev_t: int) -> _PNDMStep:
        """The scalars of the transfer x_t -> x_prev_t (PNDM eq. 11), in diffusers' float32 ops."""
        alpha_prod_t = self._alphas_cumprod[t]
        alpha_prod_t_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** (0.5)
        return _PNDMStep(
            sqrt_alpha_prod=(alpha_prod_t**0.5).item(),
            sqrt_beta_prod=(beta_prod_t**0.5).item(),
            sample_coeff=((alpha_prod_t_prev / alpha_prod_t) ** (0.5)).item(),
            alpha_prod_diff=(alpha_prod_t_prev - alpha_prod_t).item(),
            model_output_denom_coeff=model_output_denom_coeff.item(),
        )


@dataclass(frozen=True)
class _PNDMStep:
    sqrt_alpha_prod: float
    sqrt_beta_prod: float
    sample_coeff: float
    alpha_prod_diff: float
    model_output_denom_coeff: float


class PNDMRun:
    """One PLMS run. Holds the model-output history; its first `step()` starts it afresh."""

    init_noise_sigma = 1.0
    order = 1
    sigmas = None

    def __init__(
        self,
        timesteps: torch.Tensor,
        steps: list[_PNDMStep],
        restart_steps: list[_PNDMStep | None],
        alphas_cumprod: torch.Tensor,
        config: PNDMConfig,
    ):
        self.timesteps = timesteps
        self._steps = steps
        self._restart_steps = restart_steps
        self._timestep_values = [int(t) for t in timesteps.tolist()]
        self._alphas_cumprod = alphas_cumprod
        self._config = config
        # Per-run history, as diffusers keeps it: earlier model outputs (at most 4), the number
        # of step() calls so far, the sample the warm-up restarts from, and the index expected next.
        self._ets: list[torch.Tensor] = []
        self._counter = 0
        self._cur_sample: torch.Tensor | None = None
        self._next_index: int | None = None

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        check_step_index(step_index, len(self._steps))
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """The next sample; calls must follow each other through `timesteps` from the first one."""
        check_step_index(step_index, len(self._steps))
        if self._next_index is not None and step_index != self._next_index:
            raise ArgumentError(
                "step_index",
                f"PNDM is multistep: expected {self._next_index} after the previous call, got {step_index}; "
                "start a new run with set_timesteps",
            )
        self._next_index = step_index + 1

        # 1. pick the transfer: the second call redoes the first step (t + stride -> t)
        c = self._restart_steps[step_index] if self._counter == 1 else self._steps[step_index]
        if c is None:
            raise ArgumentError(
                "step_index",
                f"a PLMS run cannot take its second step at index {step_index}: the warm-up would restart "
                "beyond the last training timestep",
            )
        if self._counter != 1:
            self._ets = [*self._ets[-3:], model_output]

        # 2. combine the model outputs (linear multistep, PNDM eq. 12)
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            self._cur_sample = sample
        elif len(ets) == 1 and self._counter == 1:
            assert self._cur_sample is not None  # kept by the first call of the run
            model_output = (model_output + ets[-1]) / 2
            sample = self._cur_sample
            self._cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        # 3. v_prediction -> epsilon
        if self._config.prediction_type == "v_prediction":
            model_output = c.sqrt_alpha_prod * model_output + c.sqrt_beta_prod * sample

        # 4. the transfer x_t -> x_prev (PNDM eq. 11)
        prev_sample = c.sample_coeff * sample - c.alpha_prod_diff * model_output / c.model_output_denom_coeff
        self._counter += 1
        return prev_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """q(x_t | x_0) at t = timesteps[step_index]."""
        check_step_index(step_index, len(self._steps))
        return add_noise_alpha_prod(self._alphas_cumprod, self._timestep_values[step_index], original_samples, noise)
