"""A pipeline call's arguments are checked once, before any model runs: every number that
cannot be honoured is refused in one line naming the argument, and nothing is silently ignored."""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import pytest

from difflower.errors import ArgumentError
from difflower.reference.memory import check_memory, estimate
from difflower.reference.pipeline import load_pipeline
from difflower.reference.request import build_request


class _NoModelCalls:
    """Stands in for the models: any call fails the test (the refusal must come first)."""

    def __init__(self, calls):
        self._calls = calls

    def has_component(self, name):
        return self._calls.has_component(name)

    def prepare_run(self, request):
        self._calls.prepare_run(request)

    def __getattr__(self, name):
        raise AssertionError(f"{name} was called before the request was refused")


@pytest.fixture(scope="module")
def pipes(tiny_dirs):
    return {family: load_pipeline(tiny_dirs[family]) for family in ("sd", "sdxl", "sd3")}


@pytest.fixture()
def guarded(pipes):
    """The sd pipeline with its models out of reach."""
    pipe = pipes["sd"]
    real = pipe.calls
    pipe.calls = _NoModelCalls(real)
    yield pipe
    pipe.calls = real


@pytest.mark.parametrize("scheduler", [None, "euler", "dpm++2m", "ddim", "ddpm", "euler-a"])
def test_more_steps_than_training_timesteps_are_refused(guarded, scheduler):
    """PNDM used to run 10001 steps all at t=1; diffusers refuses this for DDIM and DDPM."""
    original = guarded.scheduler
    if scheduler:
        guarded.set_scheduler(scheduler)
    try:
        with pytest.raises(ArgumentError, match=r"num_inference_steps: 10000 is more than the 1000 timesteps"):
            guarded("a cat", num_inference_steps=10000, progress=False)
    finally:
        guarded.scheduler = original


def test_flow_matching_takes_any_step_count(pipes):
    run = pipes["sd3"].scheduler.set_timesteps(1500, mu=None)
    assert len(run.timesteps) == 1500


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("argument", ["guidance_scale", "strength"])
def test_non_finite_numbers_are_refused(guarded, argument, value):
    kwargs = {argument: value}
    if argument == "strength":
        kwargs["image"] = PIL.Image.new("RGB", (64, 64))
    with pytest.raises(ArgumentError, match=rf"{argument}: must be a finite number"):
        guarded("a cat", num_inference_steps=2, progress=False, **kwargs)


def test_strength_without_an_image_is_refused(guarded):
    with pytest.raises(ArgumentError, match=r"strength: applies to img2img and inpainting"):
        guarded("a cat", num_inference_steps=2, strength=0.5, progress=False)


def test_an_image_smaller_than_the_model_needs_names_its_size(guarded):
    with pytest.raises(ArgumentError, match=r"image: is 2x2 pixels; this model needs at least 8x8"):
        guarded("a cat", image=PIL.Image.new("RGB", (2, 2)), progress=False)


def test_an_option_of_another_family_is_refused_by_name(guarded):
    with pytest.raises(ArgumentError, match=r"prompt_3: is not an option of a sd pipeline"):
        guarded("a cat", prompt_3="a dog", progress=False)


def test_a_size_that_cannot_fit_in_memory_is_refused_before_any_work(guarded):
    with pytest.raises(ArgumentError, match=r"height: 1x100000x100000 .* needs about .* for the VAE decoder"):
        guarded("a cat", height=100000, width=100000, progress=False)


def test_the_memory_estimate_scales_with_pixels_and_guidance(pipes):
    spec = pipes["sd"].spec
    small = build_request(spec, False, prompt="a", height=512, width=512)
    large = build_request(spec, False, prompt="a", height=1024, width=1024)
    no_cfg = build_request(spec, False, prompt="a", height=512, width=512, guidance_scale=1.0)
    assert estimate(spec, large).vae_decoder == 4 * estimate(spec, small).vae_decoder
    assert estimate(spec, small).denoiser == 2 * estimate(spec, no_cfg).denoiser
    # measured: the tiny VAE decoder peaked 1.82 GiB over its weights at 2048x2048; the bound must cover it
    at_2048 = build_request(spec, False, prompt="a", height=2048, width=2048)
    assert estimate(spec, at_2048).vae_decoder >= 1.82 * 2**30
    with pytest.raises(ArgumentError, match=r"1x2048x2048 .* and 1\.0 GiB is available"):
        check_memory(spec, at_2048, available=2**30)


def test_a_size_far_past_the_native_one_warns_that_it_will_be_slow(pipes, caplog):
    spec = pipes["sd"].spec
    request = build_request(spec, False, prompt="a", height=512, width=512)
    with caplog.at_level(logging.WARNING):
        check_memory(spec, request, available=2**40)
    assert "64x the 64x64 pixels this model was made for" in caplog.text


def test_a_prompt_longer_than_the_encoder_reads_is_cut_with_a_warning(pipes, caplog):
    words = " ".join(["castle"] * 80) + " and a final dragon"
    with caplog.at_level(logging.WARNING):
        out = pipes["sd"](words, num_inference_steps=1, seed=0, output_type="np", progress=False)
    assert "truncated because the text encoder reads at most 77 tokens" in caplog.text
    assert "a final dragon" in caplog.text
    assert np.isfinite(out.images).all()
