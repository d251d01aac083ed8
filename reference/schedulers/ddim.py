"""DDIM (Song et al. 2020): the deterministic (eta = 0) or partly stochastic sampler of a DDPM model.

Reproduces diffusers' `DDIMScheduler` (0.42) for the options Stable Diffusion checkpoints use;
dynamic thresholding (pixel-space models only) is rejected at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

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
from difflower.reference.schedulers.spacing import discrete_timesteps


@dataclass(frozen=True)
class DDIMConfig:
    """diffusers' `DDIMScheduler` config fields and defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"field 'num_train_timesteps' must be at least 1, got {self.num_train_timesteps}")
        check_trained_betas(self.trained_betas, self.num_train_timesteps)


class DDIMScheduler(SchedulerBase[DDIMConfig]):
    """DDIM; `eta` weighs the fresh noise of each step (0: deterministic DDIM, 1: DDPM-like).

    diffusers passes `eta` to every `step()` call; here it is fixed per scheduler so that
    `step()` keeps the signature every scheduler shares.
    """

    class_name = "DDIMScheduler"
    config_class = DDIMConfig
    # Only read by dynamic thresholding, which is rejected below.
    ignored_fields = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
    unsupported_fields = MappingProxyType({"thresholding": False})

    def __init__(self, config: DDIMConfig, *, eta: float = 0.0):
        if eta < 0:
            raise ArgumentError("eta", f"must be >= 0, got {eta}")
        super().__init__(config)
        self._eta = float(eta)
        self._alphas_cumprod = alphas_cumprod_for(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        # The "previous" alpha of the last step: 1 (fully denoised) or the first training alpha.
        self._final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self._alphas_cumprod[0]

    @property
    def eta(self) -> float:
        return self._eta

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> DDIMRun:
        """A new run of `num_inference_steps` steps with its per-step coefficients."""
        config = self._config
        timesteps = discrete_timesteps(
            config.timestep_spacing, config.num_train_timesteps, num_inference_steps, config.steps_offset
        )
        # DDIM steps back by T // n whatever the spacing, as diffusers does.
        stride = config.num_train_timesteps // num_inference_steps
        steps = [self._coefficients(int(t), int(t) - stride) for t in timesteps]
        return DDIMRun(
            timesteps=torch.from_numpy(timesteps).to(device),
            steps=steps,
            alphas_cumprod=self._alphas_cumprod,
            config=config,
            eta=self._eta,
        )

    def _coefficients(self, t: int, prev_t: int) -> _DDIMStep:
        """The step's scalars, computed with diffusers' float32 ops so they match it bit for bit."""
        alpha_prod_t = self._alphas_cumprod[t]
        alpha_prod_t_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        # sigma_t^2 of DDIM eq. (16), scaled by eta below.
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self._eta * variance ** (0.5)
        return _DDIMStep(
            sqrt_alpha_prod=(alpha_prod_t**0.5).item(),
            sqrt_beta_prod=(beta_prod_t**0.5).item(),
            sqrt_alpha_prod_prev=(alpha_prod_t_prev**0.5).item(),
            direction_coeff=((1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)).item(),
            std_dev=std_dev_t.item(),
        )


@dataclass(frozen=True)
class _DDIMStep:
    sqrt_alpha_prod: float
    sqrt_beta_prod: float
    sqrt_alpha_prod_prev: float
    direction_coeff: float
    std_dev: float


class DDIMRun(AlphaProductRun[_DDIMStep, DDIMConfig]):
    """One DDIM sampling run; stateless between steps."""

    def __init__(
        self,
        timesteps: torch.Tensor,
        steps: list[_DDIMStep],
        alphas_cumprod: torch.Tensor,
        config: DDIMConfig,
        eta: float,
    ):
        super().__init__(timesteps, steps, alphas_cumprod, config)
        self._eta = eta

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """x_{t-1} from x_t and the model output at `timesteps[step_index]`."""
        check_step_index(step_index, len(self._steps))
        c = self._steps[step_index]
        config = self._config

        # 1. predicted original sample (x_0) and the noise it implies
        pred_original_sample = predicted_original_sample(
            config.prediction_type, sample, model_output, c.sqrt_alpha_prod, c.sqrt_beta_prod
        )
        if config.prediction_type == "epsilon":
            pred_epsilon = model_output
        elif config.prediction_type == "sample":
            pred_epsilon = (sample - c.sqrt_alpha_prod * pred_original_sample) / c.sqrt_beta_prod
        else:  # v_prediction
            pred_epsilon = c.sqrt_alpha_prod * model_output + c.sqrt_beta_prod * sample

        # 2. clip x_0 (pixel-space models trained on [-1, 1])
        if config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)

        # 3. x_{t-1} = sqrt(alpha_prev) x_0 + sqrt(1 - alpha_prev - sigma_t^2) eps  (DDIM eq. 12)
        pred_sample_direction = c.direction_coeff * pred_epsilon
        prev_sample = c.sqrt_alpha_prod_prev * pred_original_sample + pred_sample_direction

        # 4. eta > 0: add sigma_t z with fresh noise
        if self._eta > 0:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + c.std_dev * noise
        return prev_sample
