"""Few-step models: LCM and TCD sampling, guidance-distilled UNets (`time_cond_proj_dim`), and
turbo-style use without guidance, against diffusers' own pipelines on tiny checkpoints."""

from __future__ import annotations

import dataclasses

import diffusers  # the oracle: missing it fails the suite, never skips it
import pytest
import torch
from parity_helpers import assert_run_matches, diffusers_run, ours_run
from parity_helpers import assert_same_as_diffusers as _assert_same

from difflower.driver import export
from difflower.errors import ArgumentError
from difflower.reference.pipeline import load_pipeline
from difflower.reference.tiny import make_tiny_checkpoint, tiny_spec
from difflower.runtimes.pipeline import load_artifact

PROMPT = "a watercolor painting of a red castle"
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_scaling": 10.0,
}


@pytest.fixture(scope="module")
def lcm_dirs(tmp_path_factory):
    """Guidance-distilled tiny checkpoints: SD as LatentConsistencyModelPipeline, SDXL as LCM-SDXL."""
    root = tmp_path_factory.mktemp("lcm")
    out = {}
    for family, pipeline in (("sd", "LatentConsistencyModelPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        base = tiny_spec(family)
        spec = dataclasses.replace(
            base,
            pipeline_class=pipeline,
            scheduler=LCM_SCHEDULER,
            unet=dataclasses.replace(base.unet, time_cond_proj_dim=16),
        )
        out[family] = make_tiny_checkpoint(root / family, family, seed=3, spec=spec)
    return out


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_pipeline_matches_diffusers(lcm_dirs, steps):
    """The w embedding, no CFG batch doubling, the boundary condition and the per-step noise."""
    theirs = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_dirs["sd"], safety_checker=None)
    images, latents = diffusers_run(theirs, PROMPT, steps, generator=torch.Generator().manual_seed(5))
    pipe = load_pipeline(lcm_dirs["sd"])
    calls = []
    denoiser = pipe.calls.denoiser
    pipe.calls.denoiser = lambda s, t, c, r=None: calls.append(s.shape[0]) or denoiser(s, t, c, r)
    ours = ours_run(pipe, PROMPT, steps, generator=torch.Generator().manual_seed(5))
    _assert_same(ours, images, latents)
    assert calls == [1] * steps  # one denoiser call of batch 1 per step: guidance is an input, not a batch


def test_lcm_pipeline_defaults_are_its_own(lcm_dirs):
    """LatentConsistencyModelPipeline's defaults: 4 steps, guidance 8.5 (SD's are 50 and 7.5)."""
    pipe = load_pipeline(lcm_dirs["sd"])
    out = pipe(PROMPT, seed=0, output_type="latent", return_trajectory=True, progress=False)
    assert len(out.trajectory) == 4


def test_tcd_on_a_guidance_distilled_unet_matches_diffusers(lcm_dirs):
    """diffusers' Stable Diffusion pipeline with TCDScheduler and eta 0.3 (TCD's gamma)."""
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(lcm_dirs["sd"], safety_checker=None)
    theirs.scheduler = diffusers.TCDScheduler.from_config(theirs.scheduler.config)
    images, latents = diffusers_run(theirs, PROMPT, 4, generator=torch.Generator().manual_seed(2), eta=0.3)
    pipe = load_pipeline(lcm_dirs["sd"], scheduler="tcd")
    _assert_same(
        ours_run(pipe, PROMPT, 4, generator=torch.Generator().manual_seed(2), guidance_scale=7.5), images, latents
    )


def test_lcm_sdxl_matches_diffusers(lcm_dirs):
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(lcm_dirs["sdxl"])
    images, latents = diffusers_run(theirs, PROMPT, 4, generator=torch.Generator().manual_seed(9), guidance_scale=6.0)
    pipe = load_pipeline(lcm_dirs["sdxl"])
    _assert_same(
        ours_run(pipe, PROMPT, 4, generator=torch.Generator().manual_seed(9), guidance_scale=6.0), images, latents
    )


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_few_step_schedulers_by_name_on_a_plain_model_match_diffusers(tiny_dirs, scheduler):
    """LCM/TCD sampling of an ordinary SD checkpoint (an LCM-LoRA setting) with CFG on."""
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dirs["sd"], safety_checker=None)
    cls = {"lcm": diffusers.LCMScheduler, "tcd": diffusers.TCDScheduler}[scheduler]
    theirs.scheduler = cls.from_config(theirs.scheduler.config)
    extra = {"eta": 0.3} if scheduler == "tcd" else {}
    images, latents = diffusers_run(
        theirs, PROMPT, 4, generator=torch.Generator().manual_seed(4), guidance_scale=2.0, **extra
    )
    pipe = load_pipeline(tiny_dirs["sd"], scheduler=scheduler)
    _assert_same(
        ours_run(pipe, PROMPT, 4, generator=torch.Generator().manual_seed(4), guidance_scale=2.0), images, latents
    )


def test_lcm_refuses_more_steps_than_distilled(lcm_dirs):
    pipe = load_pipeline(lcm_dirs["sd"])
    with pytest.raises(
        ArgumentError, match=r"num_inference_steps: 51 is more than the 50 steps this model was distilled"
    ):
        pipe(PROMPT, num_inference_steps=51, progress=False)


def test_a_guidance_distilled_unet_exports_with_its_guidance_input(lcm_dirs, tmp_path):
    """The w embedding is a denoiser input (`timestep_cond`), the denoiser batch is not doubled,
    and the artifact runs the LCM loop at the fp32 gates."""
    out = tmp_path / "lcm-onnx"
    manifest = export(lcm_dirs["sd"], "onnx", out, progress=False)
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet.inputs[3].shape == ("denoiser_batch", 16) and unet.parity.passed
    assert_run_matches(load_pipeline(lcm_dirs["sd"]), load_artifact(out), prompt=PROMPT, num_inference_steps=4)


def test_turbo_style_runs_without_guidance_on_a_batch_one_denoiser(tiny_dirs, tmp_path):
    """guidance 0: one denoiser call per step; an artifact exported --no-cfg has a batch-1 denoiser,
    and one exported with CFG doubling refuses guidance off rather than run at half efficiency."""
    single = tmp_path / "no-cfg"
    export(tiny_dirs["sd"], "onnx", single, static=["1x64x64"], cfg=False, components=None, progress=False)
    pipe = load_artifact(single)
    assert pipe.manifest.components["unet"].inputs[0].shape[0] == 1
    assert_run_matches(load_pipeline(tiny_dirs["sd"]), pipe, prompt=PROMPT, num_inference_steps=2, guidance_scale=0.0)
    doubled = tmp_path / "cfg"
    export(tiny_dirs["sd"], "onnx", doubled, static=["1x64x64"], components=None, progress=False)
    with pytest.raises(ArgumentError, match=r"guidance_scale: this artifact's denoiser batch was built with"):
        load_artifact(doubled)(PROMPT, num_inference_steps=2, guidance_scale=0.0, progress=False)
