"""DPM-Solver++ multistep (Lu et al. 2022), first and second order, in the data (x_0) prediction form.

Reproduces diffusers' `DPMSolverMultistepScheduler` (0.42) with `algorithm_type="dpmsolver++"`,
`solver_order` 1 or 2, midpoint or Heun second-order updates, optional Karras sigmas and the
lower-order final steps. The SDE variants, third order, flow sigmas, Lu lambdas and dynamic
thresholding are rejected at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

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
)
from difflower.reference.schedulers.betas import check_trained_betas, sigma_alphas_cumprod
from difflower.reference.schedulers.spacing import karras_sigmas, sigmas_to_timesteps

# Below this many steps the last steps fall back to lower orders: with few, large steps the
# multistep extrapolation is unstable near sigma = 0 (diffusers' threshold).
_LOWER_ORDER_FINAL_MAX_STEPS = 15


@dataclass(frozen=True)
class DPMSolverMultistepConfig:
    """diffusers' `DPMSolverMultistepScheduler` config fields and defaults (the supported subset)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: PredictionType = "epsilon"
    algorithm_type: Literal["dpmsolver++"] = "dpmsolver++"
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    # Not __init__ arguments in diffusers, but read from its config when present (e.g. carried
    # over from an Euler config by from_config), so they are read here too.
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float = -float("inf")
    # Only "learned"/"learned_range" change anything (they are refused); DDPM configs carry others.
    variance_type: str | None = None
    timestep_spacing: TimestepSpacing = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        check_trained_betas(self.trained_betas, self.num_train_timesteps)
        if self.solver_order not in (1, 2):
            raise ValueError(f"field 'solver_order' = {self.solver_order} is not supported by difflower (only 1 or 2)")
        if self.variance_type in ("learned", "learned_range"):
            raise ValueError(
                f"field 'variance_type' = {self.variance_type!r} (learned variance) is not supported by difflower"
            )


class DPMSolverMultistepScheduler(SchedulerBase[DPMSolverMultistepConfig]):
    """DPM-Solver++(1M/2M); `solver_order=1` is DDIM in the log-SNR variable."""

    class_name = "DPMSolverMultistepScheduler"
    config_class = DPMSolverMultistepConfig
    # flow_shift and time_shift_type only act with flow sigmas / dynamic shifting (both refused);
    # the thresholding parameters only with thresholding (refused).
    ignored_fields = frozenset({"flow_shift", "time_shift_type", "dynamic_thresholding_ratio", "sample_max_value"})
    unsupported_fields = MappingProxyType(
        {
            "algorithm_type": "dpmsolver++",
            "thresholding": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "use_lu_lambdas": False,
            "use_flow_sigmas": False,
            "use_dynamic_shifting": False,
        }
    )

    def __init__(self, config: DPMSolverMultistepConfig):
        super().__init__(config)
        self._alphas_cumprod = sigma_alphas_cumprod(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        # log-SNR lambda(t) = log(alpha_t / sigma_t) of the training timesteps (for lambda_min_clipped)
        alpha_t = torch.sqrt(self._alphas_cumprod)
        sigma_t = torch.sqrt(1 - self._alphas_cumprod)
        self._lambda_t = torch.log(alpha_t) - torch.log(sigma_t)

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> DPMSolverMultistepRun:
        """A new run: n int64 timesteps, n + 1 sigmas, and the solver's per-step coefficients."""
        timesteps, sigmas = self._schedule(num_inference_steps)
        return DPMSolverMultistepRun(
            timesteps=torch.from_numpy(timesteps).to(device=device, dtype=torch.int64),
            sigmas=torch.from_numpy(sigmas),
            config=self._config,
        )

    def _schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, float32 sigmas) by diffusers' numpy recipe (n + 1 points, the last dropped)."""
        config = self._config
        n = num_inference_steps
        # Timesteps whose lambda falls below lambda_min_clipped are never visited (for cosine schedules).
        clipped_idx = torch.searchsorted(torch.flip(self._lambda_t, [0]), config.lambda_min_clipped)
        last_timestep = int(config.num_train_timesteps - clipped_idx.item())

        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif config.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += config.steps_offset
        else:  # trailing
            fractional_ratio = config.num_train_timesteps / n
            timesteps = np.arange(last_timestep, 0, -fractional_ratio).round().copy().astype(np.int64)
            timesteps -= 1

        train_sigmas = (((1 - self._alphas_cumprod) / self._alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(train_sigmas)
        if config.use_karras_sigmas:
            descending = np.flip(train_sigmas).copy()
            sigma_min = config.sigma_min if config.sigma_min is not None else descending[-1].item()
            sigma_max = config.sigma_max if config.sigma_max is not None else descending[0].item()
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
            # The cosine schedule keeps fractional timesteps; the others snap to integers.
            if config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

        if config.final_sigmas_type == "sigma_min":
            sigma_last = (((1 - self._alphas_cumprod[0]) / self._alphas_cumprod[0]) ** 0.5).item()
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return timesteps, sigmas


@dataclass(frozen=True)
class _DPMStep:
    """Scalars of step i, in diffusers' float32 ops.

    x0 = (x - sigma_t eps) / alpha_t at sigma_i; first order:
    x_{i+1} = (sigma_{i+1} / sigma_i) x - alpha_{i+1} (e^{-h} - 1) x0, h = lambda_{i+1} - lambda_i.
    """

    alpha: float
    sigma: float
    sample_coeff: float
    d0_coeff: float
    # second order only (None at i = 0, which has no previous sigma)
    inv_r0: float | None
    d1_coeff: float | None
    first_order: bool


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process from the VE sigma: alpha_t = 1 / sqrt(sigma^2 + 1)."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    alpha_t, sigma_t = _alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpm_steps(sigmas: torch.Tensor, config: DPMSolverMultistepConfig) -> list[_DPMStep]:
    """The per-step scalars and order decisions of a run with these sigmas."""
    num_steps = len(sigmas) - 1
    short_run = config.lower_order_final and num_steps < _LOWER_ORDER_FINAL_MAX_STEPS
    steps = []
    for i in range(num_steps):
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        inv_r0 = d1_coeff = None
        if i > 0:
            h_0 = lambda_s0 - _log_snr(sigmas[i - 1])
            r0 = h_0 / h
            inv_r0 = (1.0 / r0).item()
            if config.solver_type == "midpoint":
                d1_coeff = (0.5 * (alpha_t * (torch.exp(-h) - 1.0))).item()
            else:  # heun
                d1_coeff = (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)).item()
        is_last = i == num_steps - 1
        steps.append(
            _DPMStep(
                alpha=alpha_s0.item(),
                sigma=sigma_s0.item(),
                sample_coeff=(sigma_t / sigma_s0).item(),
                d0_coeff=(alpha_t * (torch.exp(-h) - 1.0)).item(),
                inv_r0=inv_r0,
                d1_coeff=d1_coeff,
                # The final step to sigma = 0 is always first order: h is infinite there.
                first_order=is_last and (config.euler_at_final or short_run or config.final_sigmas_type == "zero"),
            )
        )
    return steps


class DPMSolverMultistepRun:
    """One DPM-Solver++ run. Holds the history of x_0 predictions; its first `step()` starts it afresh."""

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor, config: DPMSolverMultistepConfig):
        self.timesteps = timesteps
        self.sigmas = sigmas
        self._config = config
        self._steps = dpm_steps(sigmas, config)
        # Per-run history, as diffusers keeps it: the last `solver_order` x_0 predictions, how many
        # steps have run (capped at the order), and the index expected next.
        self._model_outputs: list[torch.Tensor] = []
        self._lower_order_nums = 0
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
        """The sample at sigmas[step_index + 1]; calls must follow each other through `timesteps`."""
        check_step_index(step_index, len(self._steps))
        if self._next_index is not None and step_index != self._next_index:
            raise ArgumentError(
                "step_index",
                f"DPM-Solver is multistep: expected {self._next_index} after the previous call, got {step_index}; "
                "start a new run with set_timesteps",
            )
        self._next_index = step_index + 1
        c = self._steps[step_index]
        order = self._config.solver_order

        # 1. convert the model output to a data prediction x_0 (in the sample's own dtype)
        if self._config.prediction_type == "epsilon":
            x0_pred = (sample - c.sigma * model_output) / c.alpha
        elif self._config.prediction_type == "v_prediction":
            x0_pred = c.alpha * sample - c.sigma * model_output
        else:  # sample
            x0_pred = model_output
        self._model_outputs = [*self._model_outputs[-(order - 1) :], x0_pred] if order > 1 else [x0_pred]

        # Upcast: the update is a small correction to a large sample.
        sample = sample.to(torch.float32)

        # 2. first order while the history is short, and at the final step
        if order == 1 or self._lower_order_nums < 1 or c.first_order:
            prev_sample = c.sample_coeff * sample - c.d0_coeff * x0_pred
        # 3. second order: D1 is the backward difference of x_0 in lambda, scaled by h / h_0
        else:
            m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
            assert c.inv_r0 is not None and c.d1_coeff is not None  # every step but the first has them
            d1 = c.inv_r0 * (m0 - m1)
            if self._config.solver_type == "midpoint":
                prev_sample = c.sample_coeff * sample - c.d0_coeff * m0 - c.d1_coeff * d1
            else:  # heun
                prev_sample = c.sample_coeff * sample - c.d0_coeff * m0 + c.d1_coeff * d1

        self._lower_order_nums = min(self._lower_order_nums + 1, order)
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """alpha_t x_0 + sigma_t noise at sigmas[step_index] (computed in the sample's dtype, as diffusers)."""
        check_step_index(step_index, len(self.timesteps))
        sigma = self.sigmas[step_index].to(dtype=original_samples.dtype)
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
