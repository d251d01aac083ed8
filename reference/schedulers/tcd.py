"""TCD (Zheng et al. 2024): strategic stochastic sampling of a trajectory consistency model.

Reproduces diffusers' `TCDScheduler` (0.42). The schedule is LCM's (n entries of the
distillation schedule). Each step estimates x_0 and the noise, moves to an intermediate
timestep s = floor((1 - gamma) * t_next) along the predicted trajectory, then, for gamma > 0
and except at the last step, noises forward from s to t_next with fresh noise. `gamma` is
diffusers' `eta` step argument, fixed per scheduler here (default 0.3, TCD's recommendation;
diffusers' Stable Diffusion pipelines pass their own `eta`, 0 unless given).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from difflower.errors import ArgumentError
from difflower.reference.schedulers.base import Generator, SchedulerBase, check_step_index, randn_like_diffusers
from difflower.reference.schedulers.betas import AlphaProductRun, alphas_cumprod_for
from difflower.reference.schedulers.lcm import LCMConfig, distillation_timesteps

# diffusers' TCDScheduler takes exactly LCMScheduler's config.
TCDConfig = LCMConfig


class TCDScheduler(SchedulerBase[TCDConfig]):
    """TCD sampling with stochasticity `gamma` in [0, 1] (0: deterministic)."""

    class_name = "TCDScheduler"
    config_class = TCDConfig
    # Only read by dynamic thresholding, which diffusers' TCD does not apply; refused with it.
    ignored_fields = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
    unsupported_fields = MappingProxyType({"thresholding": False})

    def __init__(self, config: TCDConfig, *, gamma: float = 0.3):
        if not 0.0 <= gamma <= 1.0:
            raise ArgumentError("gamma", f"must be in [0, 1], got {gamma}")
        super().__init__(config)
        self._gamma = float(gamma)
        self._alphas_cumprod = alphas_cumprod_for(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        self._final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self._alphas_cumprod[0]

    @property
    def gamma(self) -> float:
        return self._gamma

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> TCDRun:
        timesteps = distillation_timesteps(self._config, num_inference_steps)
        values = [int(t) for t in timesteps]
        # After the last step the trajectory ends at t = 0.
        steps = [self._coefficients(t, values[i + 1] if i + 1 < len(values) else 0) for i, t in enumerate(values)]
        return TCDRun(torch.from_numpy(timesteps).to(device), steps, self._alphas_cumprod, self._config, self._gamma)

    def _coefficients(self, t: int, prev_t: int) -> _TCDStep:
        """The step's scalars, computed with diffusers' float32 ops so they match it bit for bit."""
        # s = floor((1 - gamma) t_next), computed as diffusers does: a float32 product of the int64 timestep.
        s = int(torch.floor((1 - self._gamma) * torch.tensor(prev_t)).to(dtype=torch.long))
        alpha_prod_t = self._alphas_cumprod[t]
        beta_prod_t = 1 - alpha_prod_t
        alpha_prod_t_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        alpha_prod_s = self._alphas_cumprod[s]
        beta_prod_s = 1 - alpha_prod_s
        return _TCDStep(
            alpha_prod_t_sqrt=alpha_prod_t.sqrt().item(),
            beta_prod_t_sqrt=beta_prod_t.sqrt().item(),
            # v-prediction and x-prediction write the same roots as powers (equal in float32 on
            # every value tested, kept as diffusers writes them)
            alpha_prod_t_pow=(alpha_prod_t**0.5).item(),
            beta_prod_t_pow=(beta_prod_t**0.5).item(),
            alpha_prod_s_sqrt=alpha_prod_s.sqrt().item(),
            beta_prod_s_sqrt=beta_prod_s.sqrt().item(),
            forward_coeff=(alpha_prod_t_prev / alpha_prod_s).sqrt().item(),
            noise_coeff=(1 - alpha_prod_t_prev / alpha_prod_s).sqrt().item(),
        )


@dataclass(frozen=True)
class _TCDStep:
    alpha_prod_t_sqrt: float
    beta_prod_t_sqrt: float
    alpha_prod_t_pow: float
    beta_prod_t_pow: float
    alpha_prod_s_sqrt: float
    beta_prod_s_sqrt: float
    forward_coeff: float
    noise_coeff: float


class TCDRun(AlphaProductRun[_TCDStep, TCDConfig]):
    """One TCD sampling run; stateless between steps."""

    def __init__(
        self,
        timesteps: torch.Tensor,
        steps: list[_TCDStep],
        alphas_cumprod: torch.Tensor,
        config: TCDConfig,
        gamma: float,
    ):
        super().__init__(timesteps, steps, alphas_cumprod, config)
        self._gamma = gamma

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """The sample at the next timestep, through the intermediate timestep s."""
        check_step_index(step_index, len(self._steps))
        c = self._steps[step_index]
        prediction_type = self._config.prediction_type

        # 1. x_0 and the noise, then the predicted noised sample at s
        if prediction_type == "epsilon":
            pred_original_sample = (sample - c.beta_prod_t_sqrt * model_output) / c.alpha_prod_t_sqrt
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - c.alpha_prod_t_pow * pred_original_sample) / c.beta_prod_t_pow
        else:  # v_prediction
            pred_original_sample = c.alpha_prod_t_pow * sample - c.beta_prod_t_pow * model_output
            pred_epsilon = c.alpha_prod_t_pow * model_output + c.beta_prod_t_pow * sample
        pred_noised_sample = c.alpha_prod_s_sqrt * pred_original_sample + c.beta_prod_s_sqrt * pred_epsilon

        # 2. forward from s to the next timestep with fresh noise (gamma > 0), except after the last step
        if self._gamma <= 0 or step_index == len(self._steps) - 1:
            return pred_noised_sample
        noise = randn_like_diffusers(model_output.shape, generator, model_output.device, pred_noised_sample.dtype)
        return c.forward_coeff * pred_noised_sample + c.noise_coeff * noise
