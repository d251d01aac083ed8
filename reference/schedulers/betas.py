"""Training noise schedules: betas, their cumulative alphas, the zero-terminal-SNR rescale, and
the forward process q(x_t | x_0) of the DDPM-family schedulers.

Every table is float32, computed with the same torch ops in the same order as diffusers, so
the values (and everything derived from them) are bit-identical to diffusers'.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

import torch

from difflower.reference.schedulers.base import BetaSchedule, check_step_index


def make_betas(
    beta_schedule: BetaSchedule,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The (num_train_timesteps,) float32 betas of a training schedule."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the schedule latent diffusion models were trained with.
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_cosine_alpha_bar(num_train_timesteps)
    raise ValueError(f"field 'beta_schedule' = {beta_schedule!r} is not supported")


def betas_for_cosine_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretise the cosine alpha_bar(t) of Nichol & Dhariwal (2021), capped at `max_beta`."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep has zero signal (Lin et al. 2023, Algorithm 1)."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    # Shift so the last value is zero, then scale so the first keeps its value.
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_for(
    beta_schedule: BetaSchedule,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas: tuple[float, ...] | None,
    rescale_betas_zero_snr: bool,
) -> torch.Tensor:
    """The (num_train_timesteps,) float32 cumulative product of (1 - beta)."""
    betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_alphas_cumprod(
    beta_schedule: BetaSchedule,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas: tuple[float, ...] | None,
    rescale_betas_zero_snr: bool,
) -> torch.Tensor:
    """alpha_bar for the sigma-based schedulers (Euler, Euler-ancestral, DPM-Solver).

    With zero terminal SNR the last alpha_bar is 0 and its sigma infinite; these schedulers
    set it to 2^-24 instead, as diffusers does, so every sigma stays finite.
    """
    alphas_cumprod = alphas_cumprod_for(
        beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr
    )
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def check_trained_betas(trained_betas: tuple[float, ...] | None, num_train_timesteps: int) -> None:
    """Raise ValueError (turned into a CheckpointError by parse_config) on a wrong-length table."""
    if trained_betas is not None and len(trained_betas) != num_train_timesteps:
        raise ValueError(
            f"field 'trained_betas' has {len(trained_betas)} values but num_train_timesteps is {num_train_timesteps}"
        )


def add_noise_alpha_prod(
    alphas_cumprod: torch.Tensor, timestep: int, original_samples: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, as the DDPM-family `add_noise` computes it.

    The coefficients are computed in the sample's dtype (diffusers casts the table first) and
    stay 0-dim CPU tensors, which torch reads as scalars without a device copy.
    """
    alpha_prod = alphas_cumprod[timestep].to(dtype=original_samples.dtype)
    sqrt_alpha_prod = alpha_prod**0.5
    sqrt_one_minus_alpha_prod = (1 - alpha_prod) ** 0.5
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


StepT = TypeVar("StepT")
ConfigT = TypeVar("ConfigT")


class AlphaProductRun(Generic[StepT, ConfigT]):
    """What the runs of the alpha-product samplers (DDPM, DDIM, LCM, TCD) share: the schedule and
    its per-step coefficients, no input scaling, and q(x_t | x_0) for img2img. Each adds `step`."""

    init_noise_sigma = 1.0
    order = 1
    sigmas = None

    def __init__(self, timesteps: torch.Tensor, steps: list[StepT], alphas_cumprod: torch.Tensor, config: ConfigT):
        self.timesteps = timesteps
        self._steps = steps
        self._timestep_values = [int(t) for t in timesteps.tolist()]
        self._alphas_cumprod = alphas_cumprod
        self._config = config

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        check_step_index(step_index, len(self._steps))
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """q(x_t | x_0) at t = timesteps[step_index]."""
        check_step_index(step_index, len(self._steps))
        return add_noise_alpha_prod(self._alphas_cumprod, self._timestep_values[step_index], original_samples, noise)
