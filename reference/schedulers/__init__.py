"""Our own torch schedulers, one algorithm per file, matching diffusers 0.42 step for step.

scheduler = load_scheduler(raw_config, source=path)          # by the checkpoint's _class_name
scheduler = scheduler_by_name("dpm++2m-karras", raw_config, flow_matching=False)
run = scheduler.set_timesteps(30, device)                    # a new run; the scheduler never changes
for i, t in enumerate(run.timesteps):
    x_in = run.scale_model_input(x, i)
    x = run.step(model(x_in, t), i, x, generator=generator)
"""

from difflower.reference.schedulers.base import Scheduler, SchedulerRun
from difflower.reference.schedulers.ddim import DDIMConfig, DDIMScheduler
from difflower.reference.schedulers.ddpm import DDPMConfig, DDPMScheduler
from difflower.reference.schedulers.dpm_solver_multistep import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from difflower.reference.schedulers.euler import EulerConfig, EulerScheduler
from difflower.reference.schedulers.euler_ancestral import EulerAncestralConfig, EulerAncestralScheduler
from difflower.reference.schedulers.flow_match_euler import (
    FlowMatchEulerConfig,
    FlowMatchEulerScheduler,
    calculate_shift,
)
from difflower.reference.schedulers.lcm import LCMConfig, LCMScheduler
from difflower.reference.schedulers.pndm import PNDMConfig, PNDMScheduler
from difflower.reference.schedulers.registry import (
    SCHEDULER_CLASSES,
    SCHEDULER_NAMES,
    load_scheduler,
    scheduler_by_name,
    scheduler_names,
)
from difflower.reference.schedulers.tcd import TCDConfig, TCDScheduler

__all__ = [
    "SCHEDULER_CLASSES",
    "SCHEDULER_NAMES",
    "DDIMConfig",
    "DDIMScheduler",
    "DDPMConfig",
    "DDPMScheduler",
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "EulerAncestralConfig",
    "EulerAncestralScheduler",
    "EulerConfig",
    "EulerScheduler",
    "FlowMatchEulerConfig",
    "FlowMatchEulerScheduler",
    "LCMConfig",
    "LCMScheduler",
    "PNDMConfig",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerRun",
    "TCDConfig",
    "TCDScheduler",
    "calculate_shift",
    "load_scheduler",
    "scheduler_by_name",
    "scheduler_names",
]
