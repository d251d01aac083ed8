"""Euler's method on a rectified-flow ODE (SD3, Flux): x_sigma = (1 - sigma) x_0 + sigma noise.

Reproduces diffusers' `FlowMatchEulerDiscreteScheduler` (0.42): a static `shift` or, with
`use_dynamic_shifting`, a resolution-dependent shift `mu` given at `set_timesteps`; an
optional terminal stretch. Inverted sigmas, stochastic sampling and Karras/exponential/beta
sigmas are rejected at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch

from difflower.errors import ArgumentError
from difflower.reference.schedulers.base import (
    Generator,
    SchedulerBase,
    check_step_index,
)


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """diffusers' `FlowMatchEulerDiscreteScheduler` config fields and defaults (the supported subset)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: Literal["exponential", "linear"] = "exponential"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"field 'shift' must be > 0, got {self.shift}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"field 'shift_terminal' must be in [0, 1), got {self.shift_terminal}")


def calculate_shift(config: FlowMatchEulerConfig, image_seq_len: int) -> float:
    """The dynamic shift mu for `image_seq_len` latent tokens: linear from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (the pipelines' `calculate_shift`)."""
    base_shift = 0.5 if config.base_shift is None else config.base_shift
    max_shift = 1.15 if config.max_shift is None else config.max_shift
    m = (max_shift - base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


class FlowMatchEulerScheduler(SchedulerBase[FlowMatchEulerConfig]):
    """Flow-matching Euler sampler; the model predicts the velocity noise - x_0."""

    class_name = "FlowMatchEulerDiscreteScheduler"
    config_class = FlowMatchEulerConfig
    unsupported_fields = MappingProxyType(
        {
            "invert_sigmas": False,
            "stochastic_sampling": False,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
        }
    )
    is_flow_matching = True
    takes_mu = True  # the dynamic time shift
    max_steps_is_training_steps = False  # continuous sigmas: any step count is honoured

    def __init__(self, config: FlowMatchEulerConfig):
        super().__init__(config)
        self._sigmas: np.ndarray | None = None  # a caller's schedule, for the one set_timesteps call
        # The training sigmas' ends, which set_timesteps spaces between. With a static shift they
        # are already shifted here and get shifted again in set_timesteps: diffusers does this
        # (sigma_min grows slightly), so it is kept for parity.
        train_timesteps = np.linspace(1, config.num_train_timesteps, config.num_train_timesteps, dtype=np.float32)
        sigmas = torch.from_numpy(train_timesteps[::-1].copy()) / config.num_train_timesteps
        if not config.use_dynamic_shifting:
            sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
        self._sigma_max = sigmas[0].item()
        self._sigma_min = sigmas[-1].item()

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device | str | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> FlowMatchEulerRun:
        """A new run; `sigmas` (one per step, before the shift) replaces the evenly spaced ones, as
        diffusers' `set_timesteps(sigmas=...)` (FluxPipeline passes 1 down to 1/steps)."""
        self._sigmas = None if sigmas is None else np.asarray(sigmas).astype(np.float32)
        if self._sigmas is not None and len(self._sigmas) != num_inference_steps:
            raise ArgumentError("sigmas", f"has {len(self._sigmas)} entries for {num_inference_steps} steps")
        try:
            return super().set_timesteps(num_inference_steps, device, mu)
        finally:
            self._sigmas = None

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> FlowMatchEulerRun:
        """A new run: n float32 timesteps (= sigma * T) and n + 1 sigmas ending in 0.

        `mu` is required with `use_dynamic_shifting` (see `calculate_shift`) and refused without it.
        """
        config = self._config
        if config.use_dynamic_shifting and mu is None:
            raise ArgumentError("mu", "use_dynamic_shifting is set: pass mu (see calculate_shift)")
        if not config.use_dynamic_shifting and mu is not None:
            raise ArgumentError(
                "mu", "use_dynamic_shifting is false: this scheduler uses its static shift; pass mu=None"
            )
        if config.shift_terminal and num_inference_steps < 2:
            # The stretch divides by 1 - sigma_last, which is 0 for a single step (diffusers gives NaN).
            raise ArgumentError("num_inference_steps", "shift_terminal needs at least 2 steps")
        T = config.num_train_timesteps

        # 1. evenly spaced timesteps between the training ends, as float64 (or the caller's, float32)
        if self._sigmas is not None:
            sigmas = self._sigmas
        else:
            timesteps = np.linspace(self._sigma_max * T, self._sigma_min * T, num_inference_steps)
            sigmas = timesteps / T

        # 2. shift towards high noise: static shift s maps sigma -> s sigma / (1 + (s - 1) sigma)
        if config.use_dynamic_shifting:
            assert mu is not None  # checked above
            sigmas = time_shift(config.time_shift_type, mu, 1.0, sigmas)
        else:
            sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)

        # 3. optional stretch so the last sigma lands on shift_terminal
        if config.shift_terminal:
            one_minus_z = 1 - sigmas
            scale_factor = one_minus_z[-1] / (1 - config.shift_terminal)
            sigmas = 1 - (one_minus_z / scale_factor)

        sigmas_t = torch.from_numpy(sigmas).to(dtype=torch.float32)
        timesteps_t = sigmas_t * T
        sigmas_t = torch.cat([sigmas_t, torch.zeros(1)])
        return FlowMatchEulerRun(timesteps=timesteps_t.to(device), sigmas=sigmas_t)


def time_shift(kind: Literal["exponential", "linear"], mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift of the noise levels t (SD3 paper, section 5.3.2)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return mu / (mu + (1 / t - 1) ** sigma)


class FlowMatchEulerRun:
    """One flow-matching Euler run; stateless between steps."""

    # The starting noise is used as drawn (sigma_max is 1 on the flow path).
    init_noise_sigma = 1.0
    order = 1

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        self.timesteps = timesteps
        self.sigmas = sigmas
        # dt = sigma_{i+1} - sigma_i in float32, as diffusers subtracts the two table entries.
        self._dts = [(sigmas[i + 1] - sigmas[i]).item() for i in range(len(sigmas) - 1)]

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        check_step_index(step_index, len(self._dts))
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """x at sigma_{i+1} = x + (sigma_{i+1} - sigma_i) * velocity."""
        check_step_index(step_index, len(self._dts))
        # Upcast: the update adds a small dt * velocity to a large sample.
        sample = sample.to(torch.float32)
        prev_sample = sample + self._dts[step_index] * model_output
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """(1 - sigma) x_0 + sigma noise at sigmas[step_index]: diffusers' `scale_noise`."""
        check_step_index(step_index, len(self.timesteps))
        sigma = self.sigmas[step_index].to(dtype=original_samples.dtype)
        return sigma * noise + (1.0 - sigma) * original_samples
