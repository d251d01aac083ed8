"""The eager pipeline equals diffusers' pipelines: every family, task and several schedulers.

Each case runs diffusers' own pipeline class on the same tiny checkpoint, prompt and seed,
capturing its latents after every step, and compares them with our trajectory (final
latents within 1e-4) and the decoded images (within 1e-3).
"""

from __future__ import annotations

import dataclasses

import diffusers  # noqa: E402 - the oracle: missing it fails the suite, never skips it
import numpy as np
import PIL.Image
import pytest
import torch

from difflower.errors import ArgumentError
from difflower.reference.pipeline import load_pipeline
from difflower.reference.schedulers import EulerScheduler
from difflower.reference.tiny import make_tiny_checkpoint, tiny_spec

PROMPT = "a watercolor painting of a red castle"
STEPS = 4

PIPELINES = {
    ("sd", "txt2img"): "StableDiffusionPipeline",
    ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("sd3", "txt2img"): "StableDiffusion3Pipeline",
    ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint"): "StableDiffusion3InpaintPipeline",
}

# (our name or None for the checkpoint's own, diffusers class, overrides of its config)
SCHEDULERS = {
    "sd": [
        (None, None, {}),
        ("euler", "EulerDiscreteScheduler", {}),
        ("dpm++2m-karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("ddim", "DDIMScheduler", {}),
    ],
    "sdxl": [
        (None, None, {}),
        ("euler-a", "EulerAncestralDiscreteScheduler", {}),
        ("dpm++2m", "DPMSolverMultistepScheduler", {}),
    ],
    # SD3 is a flow-matching model: FlowMatchEuler is its scheduler; vary its shift settings.
    "sd3": [
        (None, None, {}),
        ("flow-euler", "FlowMatchEulerDiscreteScheduler", {"shift": 1.0}),
        ("flow-euler", "FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}),
    ],
}

CASES = [
    (family, task, i)
    for family in ("sd", "sdxl", "sd3")
    for task in ("txt2img", "img2img", "inpaint")
    for i in range(len(SCHEDULERS[family]))
]


def init_image(height: int = 64, width: int = 64) -> PIL.Image.Image:
    """A deterministic colourful test picture."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin((x + y) / 6.0)], axis=-1)
    return PIL.Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def mask_image(height: int = 64, width: int = 64) -> PIL.Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    mask[height // 4 : height // 2, : width // 4] = 255
    return PIL.Image.fromarray(mask)


def task_inputs(task: str) -> dict:
    if task == "img2img":
        return {"image": init_image()}
    if task == "inpaint":
        return {"image": init_image(), "mask_image": mask_image()}
    return {}


def run_diffusers(path, family, task, scheduler_case, generator, **kwargs):
    """diffusers' pipeline -> (final image np, latents after every step)."""
    _, class_name, overrides = scheduler_case
    pipe = getattr(diffusers, PIPELINES[(family, task)]).from_pretrained(path)
    if class_name is not None:
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def capture(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    out = pipe(generator=generator, callback_on_step_end=capture, output_type="np", **kwargs)
    return out.images, steps


def decode_with_shift(path, latents):
    """diffusers' SD3 VAE decode of final latents with the shift_factor its txt2img and img2img
    pipelines apply: diffusers 0.42.1's SD3 *inpainting* pipeline forgets to add it back."""
    vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae")
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def our_pipeline(path, family, scheduler_case):
    name, _, overrides = scheduler_case
    pipe = load_pipeline(path)
    if name is not None:
        pipe.set_scheduler(name)
        if overrides:
            config = dataclasses.replace(pipe.scheduler.config, **overrides)
            pipe.scheduler = type(pipe.scheduler)(config)
    return pipe


@pytest.mark.parametrize(("family", "task", "scheduler_index"), CASES)
def test_pipeline_matches_diffusers(tiny_dirs, family, task, scheduler_index):
    scheduler_case = SCHEDULERS[family][scheduler_index]
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, **task_inputs(task))
    expected_image, expected_steps = run_diffusers(
        tiny_dirs[family], family, task, scheduler_case, torch.Generator().manual_seed(7), **kwargs
    )
    pipe = our_pipeline(tiny_dirs[family], family, scheduler_case)
    result = pipe(
        generator=torch.Generator().manual_seed(7), output_type="np", return_trajectory=True, progress=False, **kwargs
    )
    assert len(result.trajectory) == len(expected_steps) > 0
    for ours, theirs in zip(result.trajectory, expected_steps, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if (family, task) == ("sd3", "inpaint"):
        expected_image = decode_with_shift(tiny_dirs[family], expected_steps[-1])
    assert result.images.shape == expected_image.shape
    np.testing.assert_allclose(result.images, expected_image, atol=1e-3, rtol=0)
    assert expected_image.std() > 0.01  # a real picture, not a constant


def test_batches_negatives_and_images_per_prompt(tiny_dirs):
    kwargs = dict(
        prompt=["a photo of a cat", "an oil painting of a dog"],
        negative_prompt=["blurry", "low quality"],
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=6.0,
    )
    expected, _ = run_diffusers(
        tiny_dirs["sd"], "sd", "txt2img", (None, None, {}), torch.Generator().manual_seed(1), **kwargs
    )
    result = load_pipeline(tiny_dirs["sd"])(
        generator=torch.Generator().manual_seed(1), output_type="np", progress=False, **kwargs
    )
    assert result.images.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(result.images, expected, atol=1e-3, rtol=0)


def test_generator_list_and_no_guidance(tiny_dirs):
    kwargs = dict(prompt="a robot", num_images_per_prompt=2, num_inference_steps=3, guidance_scale=1.0, strength=0.7)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    expected, _ = run_diffusers(
        tiny_dirs["sdxl"], "sdxl", "img2img", (None, None, {}), gens(), image=init_image(), **kwargs
    )
    result = load_pipeline(tiny_dirs["sdxl"])(
        generator=gens(), image=init_image(), output_type="np", progress=False, **kwargs
    )
    np.testing.assert_allclose(result.images, expected, atol=1e-3, rtol=0)


def test_sdxl_explicit_negative_prompt_and_micro_conditioning(tiny_dirs):
    kwargs = dict(
        prompt="a castle",
        negative_prompt="ugly",
        num_inference_steps=3,
        original_size=(128, 96),
        crops_coords_top_left=(8, 0),
        target_size=(64, 64),
    )
    expected, _ = run_diffusers(
        tiny_dirs["sdxl"], "sdxl", "txt2img", (None, None, {}), torch.Generator().manual_seed(2), **kwargs
    )
    result = load_pipeline(tiny_dirs["sdxl"])(
        generator=torch.Generator().manual_seed(2), output_type="np", progress=False, **kwargs
    )
    np.testing.assert_allclose(result.images, expected, atol=1e-3, rtol=0)


def test_sd3_without_t5(tiny_dirs):
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_dirs["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a forest at night", num_inference_steps=3, max_sequence_length=32)
    expected = pipe(generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images
    result = load_pipeline(tiny_dirs["sd3"])(
        generator=torch.Generator().manual_seed(5), output_type="np", skip_t5=True, progress=False, **kwargs
    )
    np.testing.assert_allclose(result.images, expected, atol=1e-3, rtol=0)


def test_img2img_keeps_the_input_size(tiny_dirs):
    image = init_image(72, 48)
    kwargs = dict(prompt="a portrait", num_inference_steps=4, strength=0.5)
    expected, _ = run_diffusers(
        tiny_dirs["sd"], "sd", "img2img", (None, None, {}), torch.Generator().manual_seed(0), image=image, **kwargs
    )
    result = load_pipeline(tiny_dirs["sd"])(
        generator=torch.Generator().manual_seed(0), image=image, output_type="np", progress=False, **kwargs
    )
    assert result.images.shape == (1, 72, 48, 3)
    np.testing.assert_allclose(result.images, expected, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def inpainting_unet_dir(tmp_path_factory):
    """A tiny SD checkpoint whose UNet takes 9 channels (latents, mask, masked-image latents)."""
    spec = tiny_spec("sd")
    spec = dataclasses.replace(spec, unet=dataclasses.replace(spec.unet, in_channels=9))
    return make_tiny_checkpoint(tmp_path_factory.mktemp("inpaint") / "ckpt", spec=spec)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_nine_channel_inpainting_unet(inpainting_unet_dir, strength):
    kwargs = dict(prompt="a flower", num_inference_steps=4, strength=strength, **task_inputs("inpaint"))
    expected, steps = run_diffusers(
        inpainting_unet_dir, "sd", "inpaint", (None, None, {}), torch.Generator().manual_seed(9), **kwargs
    )
    result = load_pipeline(inpainting_unet_dir)(
        generator=torch.Generator().manual_seed(9), output_type="np", return_trajectory=True, progress=False, **kwargs
    )
    torch.testing.assert_close(result.trajectory[-1], steps[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.images, expected, atol=1e-3, rtol=0)


def test_output_types_agree(tiny_dirs):
    pipe = load_pipeline(tiny_dirs["sd"])
    common = dict(prompt="a tree", num_inference_steps=2, progress=False)
    as_np = pipe(seed=3, output_type="np", **common).images
    as_pt = pipe(seed=3, output_type="pt", **common).images
    as_pil = pipe(seed=3, output_type="pil", **common).images
    latents = pipe(seed=3, output_type="latent", **common).images
    assert latents.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))


def test_progress_bar_and_silence(tiny_dirs, capsys):
    pipe = load_pipeline(tiny_dirs["sd"])
    assert capsys.readouterr().err == ""  # loading is quiet too
    pipe("a tree", num_inference_steps=2, seed=0, output_type="latent", progress=False)
    assert capsys.readouterr().err == ""
    pipe("a tree", num_inference_steps=2, seed=0, output_type="latent", progress=True)
    assert "sd txt2img" in capsys.readouterr().err


def test_scheduler_swap_keeps_the_checkpoint_schedule(tiny_dirs):
    pipe = load_pipeline(tiny_dirs["sd"], scheduler="euler")
    assert isinstance(pipe.scheduler, EulerScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1


# -- bad input: one clear error naming the argument ---------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe(tiny_dirs):
    return load_pipeline(tiny_dirs["sd"])


def test_negative_prompt_list_of_another_length(sd_pipe):
    with pytest.raises(ArgumentError, match="negative_prompt: has 1 entries but prompt has 2"):
        sd_pipe(["a", "b"], negative_prompt=["x"], num_inference_steps=1, progress=False)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_unit_interval(sd_pipe, strength):
    with pytest.raises(ArgumentError, match=r"argument strength: must be in \[0, 1\]"):
        sd_pipe("a", image=init_image(), strength=strength, num_inference_steps=1, progress=False)


def test_strength_too_small_for_the_steps(sd_pipe):
    with pytest.raises(ArgumentError, match="argument strength: 0.1 with 4 steps leaves no denoising step"):
        sd_pipe("a", image=init_image(), strength=0.1, num_inference_steps=4, progress=False)


def test_mask_of_another_size(sd_pipe):
    with pytest.raises(ArgumentError, match=r"argument mask_image: is \(32, 32\) \(h, w\) but image is \(64, 64\)"):
        sd_pipe("a", image=init_image(), mask_image=mask_image(32, 32), num_inference_steps=1, progress=False)


def test_mask_without_image(sd_pipe):
    with pytest.raises(ArgumentError, match="argument mask_image: needs an image"):
        sd_pipe("a", mask_image=mask_image(), num_inference_steps=1, progress=False)


def test_unknown_or_incompatible_scheduler(sd_pipe):
    with pytest.raises(ArgumentError, match=r"--scheduler.*euler"):
        sd_pipe.set_scheduler("warp-drive")
    with pytest.raises(ArgumentError, match=r"--scheduler"):
        sd_pipe.set_scheduler("flow-euler")  # flow matching on an epsilon-prediction model


@pytest.mark.parametrize(("name", "value"), [("height", 60), ("width", 100)])
def test_size_not_divisible_by_the_vae_factor(sd_pipe, name, value):
    with pytest.raises(ArgumentError, match=f"argument {name}: must be a positive multiple of 8"):
        sd_pipe("a", num_inference_steps=1, progress=False, **{name: value})


def test_sd3_size_must_fit_patches(tiny_dirs):
    pipe = load_pipeline(tiny_dirs["sd3"])
    with pytest.raises(ArgumentError, match="argument height: must be a positive multiple of 16"):
        pipe("a", height=72, num_inference_steps=1, progress=False)
