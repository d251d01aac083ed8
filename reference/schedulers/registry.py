"""Building schedulers: from a checkpoint's `scheduler_config.json`, or by a user-facing name.

`load_scheduler` picks the class from `_class_name`. `scheduler_by_name` swaps the algorithm
while keeping the checkpoint's training schedule, the way diffusers' `Class.from_config(base,
**overrides)` does: the base config's fields that the new class knows are carried over, the
name's overrides are applied on top, and everything else takes the new class's defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.schedulers.base import Scheduler, SchedulerBase
from difflower.reference.schedulers.ddim import DDIMScheduler
from difflower.reference.schedulers.ddpm import DDPMScheduler
from difflower.reference.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
from difflower.reference.schedulers.euler import EulerScheduler
from difflower.reference.schedulers.euler_ancestral import EulerAncestralScheduler
from difflower.reference.schedulers.flow_match_euler import FlowMatchEulerScheduler
from difflower.reference.schedulers.lcm import LCMScheduler
from difflower.reference.schedulers.pndm import PNDMScheduler
from difflower.reference.schedulers.tcd import TCDScheduler

# Where a config that came from no file is said to come from, in error messages.
_DEFAULT_SOURCE = Path("scheduler/scheduler_config.json")


_SchedulerClass = type[SchedulerBase[Any]]

SCHEDULER_CLASSES: tuple[_SchedulerClass, ...] = (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    EulerScheduler,
    EulerAncestralScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerScheduler,
    LCMScheduler,
    TCDScheduler,
)
_BY_CLASS_NAME: dict[str, _SchedulerClass] = {cls.class_name: cls for cls in SCHEDULER_CLASSES}


@dataclass(frozen=True)
class _NamedScheduler:
    """A user-facing scheduler name: the class and the config fields the name fixes."""

    cls: _SchedulerClass
    overrides: Mapping[str, Any]


_NAMED: dict[str, _NamedScheduler] = {
    "ddim": _NamedScheduler(DDIMScheduler, {}),
    "ddpm": _NamedScheduler(DDPMScheduler, {}),
    # Only PNDM's PLMS mode is implemented; a DDIM-based checkpoint's config would otherwise give
    # diffusers' default (the Runge-Kutta warm-up).
    "pndm": _NamedScheduler(PNDMScheduler, {"skip_prk_steps": True}),
    "euler": _NamedScheduler(EulerScheduler, {"use_karras_sigmas": False}),
    "euler-karras": _NamedScheduler(EulerScheduler, {"use_karras_sigmas": True}),
    "euler-a": _NamedScheduler(EulerAncestralScheduler, {}),
    "dpm++1m": _NamedScheduler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 1, "use_karras_sigmas": False},
    ),
    "dpm++2m": _NamedScheduler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": _NamedScheduler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # Few-step samplers for consistency-distilled models (LCM, LCM-LoRA, TCD), 2-8 steps.
    "lcm": _NamedScheduler(LCMScheduler, {}),
    "tcd": _NamedScheduler(TCDScheduler, {}),
    "flow-euler": _NamedScheduler(FlowMatchEulerScheduler, {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_NAMED)


def scheduler_names(flow_matching: bool) -> tuple[str, ...]:
    """The names that pair with a flow-matching model (True) or an epsilon/v-prediction one (False)."""
    return tuple(name for name, named in _NAMED.items() if named.cls.is_flow_matching == flow_matching)


def load_scheduler(raw: dict[str, Any], source: Path | str = _DEFAULT_SOURCE) -> Scheduler:
    """The scheduler a `scheduler_config.json` dict describes, chosen by its `_class_name`.

    Raises CheckpointError naming `source` for an unknown class or a malformed/unsupported field.
    """
    source = Path(source)
    class_name = raw.get("_class_name")
    cls = _BY_CLASS_NAME.get(class_name) if isinstance(class_name, str) else None
    if cls is None:
        supported = ", ".join(_BY_CLASS_NAME)
        raise CheckpointError(source, f"field '_class_name' is {class_name!r}; difflower reads {supported}")
    # Like diffusers, drop the fields of the other schedulers a saved config often carries
    # (an SDXL Euler config keeps PNDM's skip_prk_steps): they are not mistakes worth a warning.
    own = _accepted_fields(cls)
    others = set().union(*(_accepted_fields(other) for other in SCHEDULER_CLASSES)) - own
    return cls.from_raw(_without_default_marked({k: v for k, v in raw.items() if k not in others}), source)


def scheduler_by_name(
    name: str,
    base_config: dict[str, Any],
    flow_matching: bool,
    source: Path | str = _DEFAULT_SOURCE,
) -> Scheduler:
    """The scheduler `name` with the checkpoint's training schedule (betas, prediction type, shift...).

    `base_config` is the checkpoint's raw `scheduler_config.json` dict and `flow_matching` says
    whether the model is a flow-matching one (SD3): "flow-euler" pairs only with those, the
    others only with epsilon/v-prediction models. Raises ArgumentError("--scheduler") for an
    unknown name or a wrong pairing, CheckpointError for a base field the new class cannot use.
    """
    valid = scheduler_names(flow_matching)
    kind = "flow-matching" if flow_matching else "epsilon/v-prediction"
    named = _NAMED.get(name)
    if named is None:
        raise ArgumentError(
            "--scheduler", f"unknown scheduler {name!r}; for this {kind} model use one of {', '.join(valid)}"
        )
    if named.cls.is_flow_matching != flow_matching:
        raise ArgumentError("--scheduler", f"{name!r} does not pair with a {kind} model; use one of {', '.join(valid)}")
    accepted = _accepted_fields(named.cls)
    base = _without_default_marked(base_config)
    carried = {k: v for k, v in base.items() if k in accepted}
    return named.cls.from_raw({**carried, **named.overrides}, Path(source))


def _accepted_fields(cls: _SchedulerClass) -> set[str]:
    """Every config key the class reads, ignores on purpose, or checks for its default."""
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    return fields | set(cls.ignored_fields) | set(cls.unsupported_fields)


def _without_default_marked(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` less the keys diffusers recorded as defaults (`_use_default_values`).

    diffusers' from_config drops them so the (possibly other) class applies its own default;
    a checkpoint saved with PNDM's default "leading" spacing gives Euler its "linspace".
    """
    defaults = raw.get("_use_default_values") or []
    if not isinstance(defaults, list):
        return dict(raw)
    return {k: v for k, v in raw.items() if k not in defaults and k != "_use_default_values"}
