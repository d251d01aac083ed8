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

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from difflower.errors import ArgumentError

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


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int | None = None) -> None:
    """Raise ArgumentError unless 1 <= num_inference_steps (<= num_train_timesteps when given)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ArgumentError("num_inference_steps", f"must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ArgumentError("num_inference_steps", f"must be at least 1, got {num_inference_steps}")
    if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
        raise ArgumentError(
            "num_inference_steps",
            f"{num_inference_steps} is more than the {num_train_timesteps} timesteps the model was trained on",
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
