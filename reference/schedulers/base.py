"""What every scheduler offers, and the small checks and noise draws they share.

A `Scheduler` is its frozen config plus tables derived from it (betas, alphas); it never
changes after construction. `set_timesteps` returns a new `SchedulerRun` holding one
sampling run: the timesteps, the per-step coefficients (precomputed as Python floats, so
`step()` never reads a tensor value back from the device), and, for multistep solvers, the
history of earlier model outputs. Two runs never share state.

`step_index` is always the position in `run.timesteps` of the timestep being denoised, so a
run can start mid-schedule (img2img) without any `set_begin_index` call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

import torch

from difflower.errors import ArgumentError
from difflower.reference.config import parse_config

PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["linspace", "leading", "trailing"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]

Generator = torch.Generator | Sequence[torch.Generator] | None


@runtime_checkable
class SchedulerRun(Protocol):
    """One sampling run: the schedule and the update rule at each of its steps."""

    timesteps: torch.Tensor
    """1-D, on the requested device; the values and dtype diffusers' `scheduler.timesteps` has."""
    sigmas: torch.Tensor | None
    """float32 on the CPU, as diffusers' `.sigmas` for sigma-based schedulers; None otherwise."""
    init_noise_sigma: float
    order: int

    def scale_model_input(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """The denoiser's input for the sample at `timesteps[step_index]`."""
        ...

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> torch.Tensor:
        """The sample at the next timestep, from the model output at `timesteps[step_index]`."""
        ...

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """`original_samples` noised to the level of `timesteps[step_index]`."""
        ...


@runtime_checkable
class Scheduler(Protocol):
    """A scheduler: an immutable config that makes runs."""

    @property
    def config(self) -> Any: ...

    @property
    def is_flow_matching(self) -> bool: ...

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device | str | None = None,
        mu: float | None = None,
    ) -> SchedulerRun: ...


C = TypeVar("C")


class SchedulerBase(Generic[C]):
    """What every scheduler shares: the config it is built from, reading it from a
    `scheduler_config.json` dict, and the checks before a run. A subclass sets the class
    attributes, builds its tables in `__init__` (after `super().__init__(config)`) and makes a
    run in `_run`; it keeps only its algorithm."""

    class_name: ClassVar[str]
    config_class: ClassVar[type]
    # Fields diffusers writes that have no effect on the options difflower supports.
    ignored_fields: ClassVar[frozenset[str]] = frozenset()
    # Fields for variants difflower does not implement, with the only value accepted.
    unsupported_fields: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    is_flow_matching: ClassVar[bool] = False
    # Discrete schedules pick timesteps among the training ones: more steps than those cannot be
    # honoured (diffusers raises for DDIM and DDPM; leading spacing would repeat t=1 thousands
    # of times). Flow matching spaces continuous sigmas and takes any count.
    max_steps_is_training_steps: ClassVar[bool] = True
    # Only flow matching takes a dynamic time shift `mu`.
    takes_mu: ClassVar[bool] = False

    def __init__(self, config: C):
        self._config = config

    @classmethod
    def from_raw(cls, raw: dict[str, Any], source: Path) -> Any:
        """Parse a `scheduler_config.json` dict; raises CheckpointError naming `source` and the field."""
        config: C = parse_config(
            cls.config_class, raw, source, ignored=cls.ignored_fields, must_be_default=dict(cls.unsupported_fields)
        )
        return cls(config)

    @property
    def config(self) -> C:
        return self._config

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device | str | None = None,
        mu: float | None = None,
    ) -> Any:
        """A new run of `num_inference_steps` steps, its timesteps on `device` (the CPU by default)."""
        limit = getattr(self._config, "num_train_timesteps", None) if self.max_steps_is_training_steps else None
        check_num_inference_steps(num_inference_steps, limit)
        if not self.takes_mu:
            check_no_mu(mu, self.class_name)
        return self._run(num_inference_steps, resolve_device(device), mu)

    def _run(self, num_inference_steps: int, device: torch.device, mu: float | None) -> Any:
        raise NotImplementedError


def predicted_original_sample(
    prediction_type: str,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sqrt_alpha_prod: float,
    sqrt_beta_prod: float,
) -> torch.Tensor:
    """x_0 implied by the model output at x_t = sqrt(alpha_prod) x_0 + sqrt(1 - alpha_prod) eps
    (DDPM, DDIM and LCM write it alike; v_prediction: Salimans & Ho 2022, section 2.4)."""
    if prediction_type == "epsilon":
        return (sample - sqrt_beta_prod * model_output) / sqrt_alpha_prod
    if prediction_type == "sample":
        return model_output
    return sqrt_alpha_prod * sample - sqrt_beta_prod * model_output  # v_prediction


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int | None = None) -> None:
    """Raise ArgumentError unless 1 <= num_inference_steps (<= num_train_timesteps when given)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ArgumentError("num_inference_steps", f"must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ArgumentError("num_inference_steps", f"must be at least 1, got {num_inference_steps}")
    if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
        raise ArgumentError(
            "num_inference_steps",
            f"{num_inference_steps} is more than the {num_train_timesteps} timesteps the model was trained on; "
            f"use at most {num_train_timesteps}",
        )


def check_no_mu(mu: float | None, scheduler: str) -> None:
    """Raise ArgumentError when `mu` (a flow-matching time shift) is passed to a scheduler without one."""
    if mu is not None:
        raise ArgumentError("mu", f"{scheduler} has no dynamic time shift; pass mu=None")


def check_step_index(step_index: int, num_steps: int, name: str = "step_index") -> None:
    """Raise ArgumentError unless 0 <= step_index < num_steps (a Python int, never a tensor)."""
    if isinstance(step_index, bool) or not isinstance(step_index, int):
        raise ArgumentError(name, f"must be a Python int position in run.timesteps, got {type(step_index).__name__}")
    if not 0 <= step_index < num_steps:
        raise ArgumentError(name, f"{step_index} is outside 0..{num_steps - 1} (the run has {num_steps} timesteps)")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device for a run's timesteps; None means the CPU, as in diffusers."""
    return torch.device("cpu") if device is None else torch.device(device)


def randn_like_diffusers(
    shape: torch.Size | tuple[int, ...],
    generator: Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor` draws it.

    The draw happens on the generator's device (a CPU generator with a CUDA sample draws on
    the CPU, then moves), and a list of generators draws one batch row from each, so seeded
    runs match diffusers bit for bit.
    """
    draw_device = device
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if generator is not None:
        gen_device = generator[0].device if isinstance(generator, Sequence) else generator.device
        if gen_device.type != device.type:
            if gen_device.type != "cpu":
                raise ArgumentError(
                    "generator", f"a {gen_device.type} generator cannot draw noise for a {device.type} sample"
                )
            draw_device = torch.device("cpu")
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ArgumentError("generator", f"got {len(generator)} generators for a batch of {shape[0]}")
        row_shape = (1, *shape[1:])
        rows = [torch.randn(row_shape, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
