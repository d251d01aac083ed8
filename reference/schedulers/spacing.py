"""Where a run's timesteps and sigmas come from: spacing rules, Karras sigmas, sigma -> t.

The numpy expressions are diffusers' own, kept in the same order and dtypes: the timesteps a
run produces must equal diffusers' exactly (a different rounding of one timestep changes
every later step).
"""

from __future__ import annotations

import numpy as np

from difflower.reference.schedulers.base import TimestepSpacing


def spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int,
) -> np.ndarray:
    """Descending float64 timesteps, unrounded for "linspace" (callers round or cast as diffusers does).

    "leading" takes every (T // n)-th timestep from 0 and adds `steps_offset`; "trailing" counts
    down from T - 1 in steps of T / n; "linspace" spreads n points over [0, T - 1]
    (Lin et al. 2023, Table 2).
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        return (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        fractional_ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -fractional_ratio)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of 'linspace', 'leading', 'trailing'")


def discrete_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int,
) -> np.ndarray:
    """Descending int64 timesteps of the DDPM-family schedulers (DDIM, DDPM, PNDM)."""
    timesteps = spaced_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset)
    return timesteps.round().astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """n float64 sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep whose sigma is `sigma`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    # The last training sigma at or below `sigma`, kept one short of the end so high = low + 1 exists.
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def sigmas_to_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """`sigma_to_t` of each sigma, one at a time as diffusers does (a vectorised log may differ by an ulp)."""
    return np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
