"""Our schedulers against diffusers 0.42 (the oracle): schedules, sampling loops, noise, names, errors.

Every comparison is numeric: the same timesteps (exactly), the same sigmas and the same final
latents (within 1e-6; in practice bit-identical, since the per-step scalars are computed with
diffusers' float32 ops) for a fixed deterministic stand-in for the model.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.schedulers import (
    SCHEDULER_NAMES,
    DDIMScheduler,
    Scheduler,
    SchedulerRun,
    calculate_shift,
    load_scheduler,
    scheduler_by_name,
    scheduler_names,
)

diffusers.utils.logging.set_verbosity_error()

SOURCE = Path("ckpt/scheduler/scheduler_config.json")
# Float schedules and latents: the scalars are float32 like diffusers'; 1e-6 absolute is the brief's bar.
ATOL = 1e-6
SHAPE = (1, 4, 8, 8)

# --- real checkpoint configs -----------------------------------------------------------------

SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_DDIM = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_FLOW = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SCALED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# (id, raw config, mu for set_timesteps)
CASES: list[tuple[str, dict[str, Any], float | None]] = [
    ("ddim-sd21-v", SD21_DDIM, None),
    ("ddim-defaults-clip", {"_class_name": "DDIMScheduler"}, None),
    (
        "ddim-trailing-zsnr-v",
        {
            "_class_name": "DDIMScheduler",
            **SCALED,
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "clip_sample": False,
        },
        None,
    ),
    (
        "ddim-linspace-cosine-sample",
        {
            "_class_name": "DDIMScheduler",
            "beta_schedule": "squaredcos_cap_v2",
            "timestep_spacing": "linspace",
            "prediction_type": "sample",
            "clip_sample_range": 2.0,
        },
        None,
    ),
    ("ddpm-defaults", {"_class_name": "DDPMScheduler"}, None),
    (
        "ddpm-trailing-v",
        {
            "_class_name": "DDPMScheduler",
            **SCALED,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "clip_sample": False,
        },
        None,
    ),
    (
        "ddpm-leading-offset-smalllog",
        {
            "_class_name": "DDPMScheduler",
            **SCALED,
            "steps_offset": 1,
            "variance_type": "fixed_small_log",
            "clip_sample": False,
        },
        None,
    ),
    ("pndm-sd15", SD15_PNDM, None),
    (
        "pndm-trailing-v-alpha1",
        {
            **SD15_PNDM,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "set_alpha_to_one": True,
            "steps_offset": 0,
        },
        None,
    ),
    (
        "pndm-linspace-linear",
        {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "timestep_spacing": "linspace"},
        None,
    ),
    ("euler-sdxl", SDXL_EULER, None),
    ("euler-karras", {"_class_name": "EulerDiscreteScheduler", **SCALED, "use_karras_sigmas": True}, None),
    (
        "euler-trailing-zsnr-v",
        {
            "_class_name": "EulerDiscreteScheduler",
            **SCALED,
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
        None,
    ),
    (
        "euler-karras-sigmamin-final-sample",
        {
            "_class_name": "EulerDiscreteScheduler",
            **SCALED,
            "use_karras_sigmas": True,
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "final_sigmas_type": "sigma_min",
            "prediction_type": "sample",
            "sigma_max": 10.0,
        },
        None,
    ),
    ("euler-a-leading", {**SDXL_EULER, "_class_name": "EulerAncestralDiscreteScheduler"}, None),
    (
        "euler-a-trailing-v",
        {
            "_class_name": "EulerAncestralDiscreteScheduler",
            **SCALED,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        None,
    ),
    ("dpm-defaults-scaled", {"_class_name": "DPMSolverMultistepScheduler", **SCALED}, None),
    (
        "dpm-karras-leading",
        {
            "_class_name": "DPMSolverMultistepScheduler",
            **SCALED,
            "use_karras_sigmas": True,
            "timestep_spacing": "leading",
            "steps_offset": 1,
        },
        None,
    ),
    (
        "dpm-1m-trailing-v",
        {
            "_class_name": "DPMSolverMultistepScheduler",
            **SCALED,
            "solver_order": 1,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        None,
    ),
    (
        "dpm-heun-sigmamin-no-lof",
        {
            "_class_name": "DPMSolverMultistepScheduler",
            **SCALED,
            "solver_type": "heun",
            "final_sigmas_type": "sigma_min",
            "lower_order_final": False,
        },
        None,
    ),
    (
        "dpm-karras-cosine-euler-final",
        {
            "_class_name": "DPMSolverMultistepScheduler",
            "beta_schedule": "squaredcos_cap_v2",
            "use_karras_sigmas": True,
            "euler_at_final": True,
            "final_sigmas_type": "sigma_min",
            "lambda_min_clipped": -5.1,
            "prediction_type": "sample",
        },
        None,
    ),
    (
        "dpm-trailing-zsnr-v",
        {
            "_class_name": "DPMSolverMultistepScheduler",
            **SCALED,
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
        None,
    ),
    ("lcm-dreamshaper", {"_class_name": "LCMScheduler", **SCALED, "set_alpha_to_one": True, "steps_offset": 1}, None),
    (
        "lcm-v-zsnr-unclipped",
        {
            "_class_name": "LCMScheduler",
            **SCALED,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "set_alpha_to_one": False,
            "timestep_scaling": 5.0,
        },
        None,
    ),
    ("lcm-sample-clip", {"_class_name": "LCMScheduler", "prediction_type": "sample", "clip_sample": True}, None),
    ("tcd-defaults", {"_class_name": "TCDScheduler", **SCALED}, None),
    ("tcd-v", {"_class_name": "TCDScheduler", **SCALED, "prediction_type": "v_prediction"}, None),
    ("tcd-sample", {"_class_name": "TCDScheduler", "prediction_type": "sample"}, None),
    ("flow-sd3-shift3", SD3_FLOW, None),
    ("flow-defaults", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, None),
    ("flow-dynamic-mu", FLUX_FLOW, 1.0),
    (
        "flow-dynamic-linear-terminal",
        {**FLUX_FLOW, "time_shift_type": "linear", "shift_terminal": 0.02},
        1.7,
    ),
]
CASE_IDS = [case[0] for case in CASES]
STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler"}


# --- helpers ---------------------------------------------------------------------------------


def pair(raw: dict[str, Any], eta: float = 0.0) -> tuple[Scheduler, Any]:
    """(ours, diffusers') for one raw config."""
    ours = load_scheduler(raw, SOURCE)
    if eta:
        ours = DDIMScheduler(ours.config, eta=eta)
    theirs = getattr(diffusers, raw["_class_name"]).from_config(raw)
    return ours, theirs


# A fixed pattern so the stand-in model output varies over space, not only with t.
PATTERN = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))


def fake_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the denoiser: 0.1 x + sin(t / 100 + pattern)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.1 * sample + torch.sin(t / 100 + PATTERN)


def diffusers_step(theirs: Any, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor, gen, eta: float) -> torch.Tensor:
    kwargs: dict[str, Any] = {}
    params = inspect.signature(theirs.step).parameters
    if "generator" in params:
        kwargs["generator"] = gen
    if eta:
        kwargs["eta"] = eta
    return theirs.step(out, t, x, **kwargs).prev_sample


def diffusers_add_noise(theirs: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if hasattr(theirs, "scale_noise"):
        return theirs.scale_noise(x0, t, noise)
    return theirs.add_noise(x0, noise, t)


def run_both(
    raw: dict[str, Any],
    n: int,
    mu: float | None,
    *,
    start: int | None = None,
    eta: float = 0.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents of ours and diffusers' sampling loops for one raw config."""
    ours, theirs = pair(raw, eta)
    return run_pair(ours, theirs, n, mu, start=start, eta=eta, seed=seed)


def run_pair(
    ours: Scheduler,
    theirs: Any,
    n: int,
    mu: float | None,
    *,
    start: int | None = None,
    eta: float = 0.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents of ours and diffusers' sampling loops.

    start=None: text-to-image from scaled noise. start=k: img2img from add_noise at index k
    (diffusers: set_begin_index(k)), checking the inpainting re-noise at every i + 1 on the way.
    """
    run = ours.set_timesteps(n, mu=mu)
    theirs.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
    gen_ours = torch.Generator().manual_seed(seed) if seed is not None else None
    gen_theirs = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    if start is None:
        first = 0
        if hasattr(theirs, "set_begin_index") and (theirs.timesteps == theirs.timesteps[0]).sum() > 1:
            # diffusers finds the first step by value and takes the second of two equal timesteps
            # (Karras sigmas on a cosine schedule repeat t=998); ours steps by position, as this does.
            theirs.set_begin_index(0)
        x_ours = noise * run.init_noise_sigma
        x_theirs = noise * getattr(theirs, "init_noise_sigma", 1.0)
    else:
        first = start
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 0.5
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(start)
        x_ours = run.add_noise(x0, noise, start)
        x_theirs = diffusers_add_noise(theirs, x0, noise, theirs.timesteps[start : start + 1])
        assert (x_ours - x_theirs).abs().max().item() <= ATOL

    timesteps = theirs.timesteps
    for i in range(first, len(timesteps)):
        t = timesteps[i]
        x_in_theirs = theirs.scale_model_input(x_theirs, t) if hasattr(theirs, "scale_model_input") else x_theirs
        x_in_ours = run.scale_model_input(x_ours, i)
        assert (x_in_ours - x_in_theirs).abs().max().item() <= ATOL, f"scale_model_input differs at step {i}"
        x_theirs = diffusers_step(theirs, fake_model(x_in_theirs, t), t, x_theirs, gen_theirs, eta)
        x_ours = run.step(fake_model(x_in_ours, run.timesteps[i]), i, x_ours, generator=gen_ours)
        if start is not None and i + 1 < len(timesteps):
            # 4-channel inpainting re-noises the known region to timesteps[i + 1] after each step.
            renoised_theirs = diffusers_add_noise(theirs, x0, noise, timesteps[i + 1 : i + 2])
            renoised_ours = run.add_noise(x0, noise, i + 1)
            assert (renoised_ours - renoised_theirs).abs().max().item() <= ATOL, f"add_noise differs at {i + 1}"
    return x_ours, x_theirs


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, what
    diff = (ours.double() - theirs.double()).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g}"


# --- (1) schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_schedule_matches_diffusers(case):
    _, raw, mu = case
    ours, theirs = pair(raw)
    for n in (1, 4, 20, 50):
        if n == 1 and raw.get("shift_terminal"):
            # diffusers divides 0 by 0 here (NaN sigmas); we refuse the request instead.
            with pytest.raises(ArgumentError, match="num_inference_steps"):
                ours.set_timesteps(n, mu=mu)
            continue
        run = ours.set_timesteps(n, device=torch.device("cpu"), mu=mu)
        theirs.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
        assert isinstance(run, SchedulerRun)
        assert run.timesteps.dtype == theirs.timesteps.dtype, n
        if run.timesteps.dtype == torch.int64:
            assert torch.equal(run.timesteps, theirs.timesteps), n
        else:
            assert_close(run.timesteps, theirs.timesteps, f"timesteps n={n}")
        if raw["_class_name"] in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler", "TCDScheduler"):
            assert run.sigmas is None
        else:
            assert run.sigmas.dtype == torch.float32
            assert_close(run.sigmas, theirs.sigmas.cpu(), f"sigmas n={n}")
        assert run.init_noise_sigma == pytest.approx(float(getattr(theirs, "init_noise_sigma", 1.0)), abs=ATOL)
        assert run.order == theirs.order


def test_flow_schedule_values_sd3():
    """Spot values for SD3 (shift 3): sigma_0 = 1 and the shifted last sigma, as diffusers gives them."""
    run = load_scheduler(SD3_FLOW, SOURCE).set_timesteps(4)
    expected = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW)
    expected.set_timesteps(4)
    assert run.sigmas[0].item() == pytest.approx(1.0)
    assert run.sigmas[-1].item() == 0.0
    assert torch.equal(run.sigmas, expected.sigmas)
    assert torch.equal(run.timesteps, expected.timesteps)


# --- (2) deterministic sampling loops --------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n", [4, 20, 50])
def test_sampling_loop_matches_diffusers(case, n):
    _, raw, mu = case
    seed = 1234 if raw["_class_name"] in STOCHASTIC else None
    ours, theirs = run_both(raw, n, mu, seed=seed)
    assert_close(ours, theirs, f"final latents n={n}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("n", "strength"), [(4, 0.5), (20, 0.6), (50, 0.3)])
def test_img2img_loop_matches_diffusers(case, n, strength):
    """Start mid-schedule from add_noise / scale_noise, as the img2img and inpaint pipelines do."""
    _, raw, mu = case
    start = n - int(n * strength)
    seed = 99 if raw["_class_name"] in STOCHASTIC else None
    ours, theirs = run_both(raw, n, mu, start=start, seed=seed)
    assert_close(ours, theirs, f"img2img final latents n={n} start={start}")


def test_add_noise_at_start_matches_diffusers_for_full_strength():
    """strength 1.0: add_noise at index 0 (the inpainting pipeline's start)."""
    for _, raw, mu in CASES:
        ours, theirs = run_both(raw, 10, mu, start=0, seed=3)
        assert_close(ours, theirs, raw["_class_name"])


# --- (3) stochastic schedulers with seeded generators ----------------------------------------


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("raw", [SD21_DDIM, {"_class_name": "DDIMScheduler"}], ids=["sd21-v", "defaults"])
def test_ddim_eta_matches_diffusers(raw, eta):
    ours, theirs = run_both(raw, 20, None, eta=eta, seed=5)
    assert_close(ours, theirs, f"DDIM eta={eta}")
    ours, theirs = run_both(raw, 20, None, eta=eta, seed=5, start=8)
    assert_close(ours, theirs, f"DDIM eta={eta} img2img")


@pytest.mark.parametrize(
    "raw",
    [
        {**SDXL_EULER, "_class_name": "EulerAncestralDiscreteScheduler"},
        {"_class_name": "DDPMScheduler", **SCALED, "clip_sample": False},
    ],
    ids=["euler-a", "ddpm"],
)
def test_noise_depends_on_seed_and_matches(raw):
    """Different seeds give different latents; the same seed gives diffusers' latents."""
    a, ref = run_both(raw, 10, None, seed=1)
    b, _ = run_both(raw, 10, None, seed=2)
    assert_close(a, ref, "seed 1")
    assert (a - b).abs().max().item() > 1e-3


def test_list_of_generators_draws_per_row_like_diffusers():
    raw = {**SDXL_EULER, "_class_name": "EulerAncestralDiscreteScheduler"}
    ours, theirs = pair(raw)
    run = ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * run.init_noise_sigma
    x_ours, x_theirs = x.clone(), x.clone()
    gens_ours = [torch.Generator().manual_seed(s) for s in (10, 11)]
    gens_theirs = [torch.Generator().manual_seed(s) for s in (10, 11)]
    for i, t in enumerate(theirs.timesteps):
        out = 0.1 * x_ours
        x_theirs = theirs.step(0.1 * x_theirs, t, x_theirs, generator=gens_theirs).prev_sample
        x_ours = run.step(out, i, x_ours, generator=gens_ours)
    assert_close(x_ours, x_theirs, "list of generators")


# --- runs are independent; multistep order is enforced ---------------------------------------


def test_runs_are_independent_and_scheduler_is_immutable():
    """Two interleaved DPM++ runs from one scheduler give the same latents as one run alone."""
    scheduler = load_scheduler({"_class_name": "DPMSolverMultistepScheduler", **SCALED}, SOURCE)
    config_before = scheduler.config
    run_a, run_b = scheduler.set_timesteps(10), scheduler.set_timesteps(10)
    alone = scheduler.set_timesteps(10)
    x_a = x_b = x_alone = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(alone.timesteps):
        x_a = run_a.step(fake_model(x_a, t), i, x_a)
        x_b = run_b.step(fake_model(x_b, t) * 0.5, i, x_b)
        x_alone = alone.step(fake_model(x_alone, t), i, x_alone)
    assert torch.equal(x_a, x_alone)
    assert not torch.equal(x_a, x_b)
    assert scheduler.config is config_before


@pytest.mark.parametrize("raw", [{"_class_name": "DPMSolverMultistepScheduler"}, SD15_PNDM], ids=["dpm", "pndm"])
def test_multistep_rejects_out_of_order_steps(raw):
    run = load_scheduler(raw, SOURCE).set_timesteps(10)
    x = torch.zeros(SHAPE)
    x = run.step(x, 2, x)
    with pytest.raises(ArgumentError, match="step_index"):
        run.step(x, 4, x)


def test_step_index_out_of_range_is_an_argument_error():
    run = load_scheduler(SDXL_EULER, SOURCE).set_timesteps(4)
    with pytest.raises(ArgumentError, match="step_index"):
        run.step(torch.zeros(SHAPE), 4, torch.zeros(SHAPE))


def test_mu_rules_for_flow_matching():
    with pytest.raises(ArgumentError, match="mu"):
        load_scheduler(FLUX_FLOW, SOURCE).set_timesteps(4)
    with pytest.raises(ArgumentError, match="mu"):
        load_scheduler(SD3_FLOW, SOURCE).set_timesteps(4, mu=1.0)
    with pytest.raises(ArgumentError, match="mu"):
        load_scheduler(SDXL_EULER, SOURCE).set_timesteps(4, mu=1.0)


def test_calculate_shift_matches_sd3_pipeline():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as theirs

    config = load_scheduler(FLUX_FLOW, SOURCE).config
    for seq_len in (256, 1024, 4096):
        assert calculate_shift(config, seq_len) == pytest.approx(theirs(seq_len, 256, 4096, 0.5, 1.15), abs=1e-12)


# --- (4) scheduler_by_name -------------------------------------------------------------------

NAME_OVERRIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++1m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 1, "use_karras_sigmas": False},
    ),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
BASES = {
    "sd15": SD15_PNDM,
    "sd21": SD21_DDIM,
    "sdxl": SDXL_EULER,
    # saved by diffusers with a defaulted spacing: from_config lets the new class pick its own
    "sd-defaults-marked": {**SD15_PNDM, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]},
}


def test_names_cover_the_brief():
    assert set(SCHEDULER_NAMES) == set(NAME_OVERRIDES)
    assert scheduler_names(flow_matching=True) == ("flow-euler",)
    assert "flow-euler" not in scheduler_names(flow_matching=False)


@pytest.mark.parametrize("base_id", list(BASES))
@pytest.mark.parametrize("name", [n for n in NAME_OVERRIDES if n != "flow-euler"])
def test_scheduler_by_name_matches_from_config(name, base_id):
    base = BASES[base_id]
    class_name, overrides = NAME_OVERRIDES[name]
    ours = scheduler_by_name(name, base_config=base, flow_matching=False)
    theirs = getattr(diffusers, class_name).from_config(base, **overrides)
    # every config field we keep has diffusers' value
    for field, value in vars(ours.config).items():
        if field in theirs.config:
            expected = theirs.config[field]
            expected = tuple(expected) if isinstance(expected, list) else expected
            assert value == expected, f"{name} from {base_id}: field {field}"
    # and the same schedule and latents
    run = ours.set_timesteps(12)
    theirs.set_timesteps(12)
    assert run.timesteps.dtype == theirs.timesteps.dtype
    assert_close(run.timesteps.double(), theirs.timesteps.double(), f"{name} timesteps")
    seed = 4 if class_name in STOCHASTIC else None
    fresh_theirs = getattr(diffusers, class_name).from_config(base, **overrides)
    x_ours, x_theirs = run_pair(ours, fresh_theirs, 12, None, seed=seed)
    assert_close(x_ours, x_theirs, f"{name} from {base_id}")


def test_flow_euler_by_name_keeps_shift():
    ours = scheduler_by_name("flow-euler", base_config=SD3_FLOW, flow_matching=True)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW)
    assert ours.config.shift == 3.0
    assert ours.is_flow_matching
    run = ours.set_timesteps(28)
    theirs.set_timesteps(28)
    assert_close(run.timesteps, theirs.timesteps, "flow-euler timesteps")


def test_scheduler_by_name_rejects_unknown_name():
    with pytest.raises(ArgumentError) as err:
        scheduler_by_name("heun", base_config=SD15_PNDM, flow_matching=False)
    message = str(err.value)
    assert "--scheduler" in message and "heun" in message
    for name in scheduler_names(flow_matching=False):
        assert name in message
    assert "flow-euler" not in message


@pytest.mark.parametrize(
    ("name", "base", "flow", "valid"),
    [
        ("flow-euler", SD15_PNDM, False, scheduler_names(False)),
        ("dpm++2m", SD3_FLOW, True, ("flow-euler",)),
        ("euler", SD3_FLOW, True, ("flow-euler",)),
    ],
)
def test_scheduler_by_name_rejects_flow_mismatch(name, base, flow, valid):
    with pytest.raises(ArgumentError) as err:
        scheduler_by_name(name, base_config=base, flow_matching=flow)
    message = str(err.value)
    assert "--scheduler" in message and name in message
    for valid_name in valid:
        assert valid_name in message


# --- (5) malformed and unsupported configs ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"_class_name": "DDIMScheduler", "beta_start": "abc"}, "beta_start"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": "yes"}, "use_karras_sigmas"),
        ({"_class_name": "DDPMScheduler", "prediction_type": "x0"}, "prediction_type"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": [3.0]}, "shift"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding"),
        ({"_class_name": "PNDMScheduler"}, "skip_prk_steps"),
        ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "variance_type"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
        ({"_class_name": "EulerDiscreteScheduler", "trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_bad_config_field_is_a_checkpoint_error_naming_it(raw, field):
    with pytest.raises(CheckpointError) as err:
        load_scheduler(raw, SOURCE)
    assert f"'{field}'" in str(err.value)
    assert str(SOURCE) in str(err.value)


def test_unknown_class_lists_supported_classes():
    with pytest.raises(CheckpointError) as err:
        load_scheduler({"_class_name": "LMSDiscreteScheduler"}, SOURCE)
    message = str(err.value)
    assert "LMSDiscreteScheduler" in message
    for class_name in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        assert class_name in message


def test_trained_betas_match_diffusers():
    betas = torch.linspace(0.0001, 0.02, 1000).tolist()
    raw = {"_class_name": "DDIMScheduler", "trained_betas": betas, "clip_sample": False}
    ours, theirs = run_both(raw, 10, None)
    assert_close(ours, theirs, "trained betas")


def test_no_reference_file_imports_diffusers():
    root = Path(__file__).resolve().parents[1] / "reference" / "schedulers"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import diffusers" not in text and "from diffusers" not in text, path.name


# --- few-step schedulers ---------------------------------------------------------------------


def test_lcm_refuses_more_steps_than_it_was_distilled_with():
    ours = load_scheduler({"_class_name": "LCMScheduler", "original_inference_steps": 8}, SOURCE)
    assert len(ours.set_timesteps(8).timesteps) == 8
    with pytest.raises(
        ArgumentError, match=r"num_inference_steps: 9 is more than the 8 steps this model was distilled"
    ):
        ours.set_timesteps(9)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_gamma_is_diffusers_eta(gamma):
    """gamma 0 is deterministic TCD, 1 fully stochastic; both as diffusers' step(eta=...)."""
    from difflower.reference.schedulers import TCDScheduler

    raw = {"_class_name": "TCDScheduler", **SCALED}
    ours = TCDScheduler(load_scheduler(raw, SOURCE).config, gamma=gamma)
    theirs = diffusers.TCDScheduler.from_config(raw)
    run = ours.set_timesteps(4)
    theirs.set_timesteps(4)
    x_ours = x_theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    gen_ours, gen_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i, t in enumerate(theirs.timesteps):
        x_ours = run.step(fake_model(x_ours, t), i, x_ours, generator=gen_ours)
        x_theirs = theirs.step(fake_model(x_theirs, t), t, x_theirs, eta=gamma, generator=gen_theirs).prev_sample
    assert_close(x_ours, x_theirs, f"tcd gamma={gamma}")
