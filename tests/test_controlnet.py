"""ControlNet: the reference module, the loop (scales, guess mode, guidance windows, several
ControlNets; txt2img, img2img, inpainting) and the exported artifacts, against diffusers' own
ControlNetModel and ControlNet pipelines on tiny checkpoints."""

from __future__ import annotations

import json
import sys

import diffusers  # the oracle: missing it fails the suite, never skips it
import numpy as np
import PIL.Image
import pytest
import torch
from parity_helpers import assert_run_matches, diffusers_run, ours_run, sample_image, sample_mask
from parity_helpers import assert_same_as_diffusers as assert_same

from difflower.cli import main
from difflower.driver import export
from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.control import edge_pattern
from difflower.reference.controlnet import ControlNetConfig
from difflower.reference.loading import load_controlnet, load_unet
from difflower.reference.pipeline import load_pipeline
from difflower.reference.tiny import make_tiny_checkpoint, make_tiny_controlnet
from difflower.runtimes.pipeline import load_artifact
from difflower.validate.parity import validate_artifact

PROMPT = "a lighthouse on a cliff"
PIPELINES = {
    ("sd", "txt2img"): diffusers.StableDiffusionControlNetPipeline,
    ("sd", "img2img"): diffusers.StableDiffusionControlNetImg2ImgPipeline,
    ("sd", "inpaint"): diffusers.StableDiffusionControlNetInpaintPipeline,
    ("sdxl", "txt2img"): diffusers.StableDiffusionXLControlNetPipeline,
    ("sdxl", "img2img"): diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
    ("sdxl", "inpaint"): diffusers.StableDiffusionXLControlNetInpaintPipeline,
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny SD and SDXL checkpoints, each with two ControlNets (random, non-zero residuals)."""
    root = tmp_path_factory.mktemp("controlnet")
    out = {}
    for family in ("sd", "sdxl"):
        checkpoint = make_tiny_checkpoint(root / family, family, seed=1)
        out[family] = checkpoint
        out[f"{family}-cn"] = make_tiny_controlnet(root / f"{family}-cn", checkpoint, seed=4)
        out[f"{family}-cn2"] = make_tiny_controlnet(root / f"{family}-cn2", checkpoint, seed=5)
    return out


def _theirs(dirs, family: str, task: str, nets: int = 1):
    controlnets = [diffusers.ControlNetModel.from_pretrained(dirs[f"{family}-cn{k or ''}"]) for k in ("", 2)[:nets]]
    cls = PIPELINES[(family, task)]
    extra = {"safety_checker": None} if family == "sd" else {}
    return cls.from_pretrained(dirs[family], controlnet=controlnets[0] if nets == 1 else controlnets, **extra)


def _ours(dirs, family: str, nets: int = 1):
    return load_pipeline(dirs[family], controlnets=[dirs[f"{family}-cn{k or ''}"] for k in ("", 2)[:nets]])


def _edges(h: int = 64, w: int = 64, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((h, w)) > 0.8).astype(np.uint8) * 255).convert("RGB")


# -- the module ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80},
        {"controlnet_conditioning_channel_order": "bgr", "global_pool_conditions": True, "use_linear_projection": True},
    ],
    ids=["sd", "sdxl", "bgr-pooled"],
)
@pytest.mark.parametrize("scale,guess", [(1.0, False), (0.7, False), (0.8, True)])
def test_controlnet_module_matches_diffusers(tmp_path, options, scale, guess):
    """Same state-dict keys and the same residuals as diffusers' ControlNetModel."""
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=2,
        **options,
    )
    theirs = diffusers.ControlNetModel(**config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)  # the zero convs too: the residuals must not be zero
    theirs.save_pretrained(tmp_path)
    ours = load_controlnet(tmp_path, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, ehs, cond = (
        torch.randn(2, 4, 16, 16, generator=gen),
        torch.randn(2, 7, 32, generator=gen),
        torch.rand(2, 3, 32, 32),
    )
    added = (
        {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)} if "addition_embed_type" in options else None
    )
    with torch.no_grad():
        down_e, mid_e = theirs(x, 500, ehs, cond, scale, guess_mode=guess, added_cond_kwargs=added, return_dict=False)
        down_a, mid_a = ours(x, 500, ehs, cond, scale, guess, added_cond_kwargs=added, return_dict=False)
    assert len(down_a) == len(down_e) == ControlNetConfig(**config).residual_count == 6
    for a, e in zip([*down_a, mid_a], [*down_e, mid_e], strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_unet_takes_residuals_as_diffusers_does(dirs):
    """down_block_additional_residuals / mid_block_additional_residual added where diffusers adds them."""
    theirs = diffusers.UNet2DConditionModel.from_pretrained(dirs["sd"], subfolder="unet")
    ours = load_unet(dirs["sd"] / "unet", torch.float32)
    gen = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    shapes = [(32, 8, 8)] * 3 + [(32, 4, 4)] + [(64, 4, 4)] * 2  # conv_in, 2 resnets, downsample; 2 resnets
    down = [torch.randn(2, *s, generator=gen) for s in shapes]
    mid = torch.randn(2, 64, 4, 4, generator=gen)
    with torch.no_grad():
        expected = theirs(x, 300, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid)[0]
        actual = ours(x, 300, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid)[0]
        plain = ours(x, 300, ehs)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (actual - plain).abs().max() > 1e-3  # the residuals change the prediction


# -- the loop against diffusers' pipelines -----------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_txt2img_one_controlnet_matches_diffusers(dirs, family):
    """Their `image` is our `control_image`; latents after every step and the image."""
    control = _edges()
    images, latents = diffusers_run(
        _theirs(dirs, family, "txt2img"), PROMPT, 3, image=control, generator=torch.Generator().manual_seed(0)
    )
    ours = ours_run(_ours(dirs, family), PROMPT, 3, control_image=control, generator=torch.Generator().manual_seed(0))
    assert_same(ours, images, latents)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("guess", [False, True])
def test_two_controlnets_with_windows_and_scales_match_diffusers(dirs, family, guess):
    """MultiControlNet: per-net scales and guidance windows, residuals summed; guess mode runs
    the ControlNets on the conditional half only and gives the unconditional half none."""
    controls = [_edges(seed=1), _edges(seed=2)]
    options = dict(
        controlnet_conditioning_scale=[0.7, 1.3],
        control_guidance_start=[0.0, 0.4],
        control_guidance_end=[0.6, 1.0],
        guess_mode=guess,
    )
    images, latents = diffusers_run(
        _theirs(dirs, family, "txt2img", nets=2),
        PROMPT,
        5,
        image=controls,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    pipe = _ours(dirs, family, nets=2)
    calls = []
    controlnet = pipe.calls.controlnet
    pipe.calls.controlnet = lambda name, *rest: calls.append((name, rest[0].shape[0])) or controlnet(name, *rest)
    ours = ours_run(pipe, PROMPT, 5, control_image=controls, generator=torch.Generator().manual_seed(3), **options)
    assert_same(ours, images, latents)
    # each ControlNet runs only inside its window (the rest adds zeros in diffusers), on B in guess mode
    batch = 1 if guess else 2
    assert [c for c in calls if c[0] == "controlnet"] == [("controlnet", batch)] * 3  # steps 0-2 of 5 (end 0.6)
    assert [c for c in calls if c[0] == "controlnet_1"] == [("controlnet_1", batch)] * 3  # steps 2-4 (start 0.4)


def test_batch_and_control_image_of_another_size_match_diffusers(dirs):
    """Two prompts x two images each from one control image, resized (not refused) to the asked size."""
    control = _edges(80, 96)
    prompts = [PROMPT, "a red barn"]
    kwargs = dict(num_images_per_prompt=2, height=64, width=64, generator=torch.Generator().manual_seed(4))
    images, latents = diffusers_run(_theirs(dirs, "sd", "txt2img"), prompts, 2, image=control, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(4)
    ours = ours_run(_ours(dirs, "sd"), prompts, 2, control_image=control, **kwargs)
    assert ours.images.shape == (4, 64, 64, 3)
    assert_same(ours, images, latents)


def test_default_size_is_the_control_images(dirs):
    """diffusers' ControlNet txt2img makes the control image's size (rounded down to the VAE factor)."""
    control = _edges(40, 56)
    images, latents = diffusers_run(
        _theirs(dirs, "sd", "txt2img"), PROMPT, 2, image=control, generator=torch.Generator().manual_seed(0)
    )
    ours = ours_run(_ours(dirs, "sd"), PROMPT, 2, control_image=control, generator=torch.Generator().manual_seed(0))
    assert ours.images.shape == (1, 40, 56, 3)
    assert_same(ours, images, latents)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpainting_with_a_controlnet_match_diffusers(dirs, family, task):
    """The ControlNet img2img and inpainting pipelines, with their own defaults (strength, and the
    conditioning scale: 0.8 for img2img, 0.5 for SD inpainting)."""
    control, init = _edges(), sample_image()
    inputs = {"mask_image": sample_mask()} if task == "inpaint" else {}
    images, latents = diffusers_run(
        _theirs(dirs, family, task),
        PROMPT,
        4,
        image=init,
        control_image=control,
        generator=torch.Generator().manual_seed(6),
        **inputs,
    )
    ours = ours_run(
        _ours(dirs, family),
        PROMPT,
        4,
        image=init,
        control_image=control,
        generator=torch.Generator().manual_seed(6),
        **inputs,
    )
    assert_same(ours, images, latents)


# -- refusals ------------------------------------------------------------------------------------


def test_a_controlnet_that_does_not_fit_is_refused_naming_both(dirs):
    with pytest.raises(CheckpointError) as err:
        load_pipeline(dirs["sd"], controlnets=[dirs["sdxl-cn"]])
    message = str(err.value)
    assert str(dirs["sdxl-cn"]) in message and str(dirs["sd"]) in message
    assert "the UNet's" in message


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({}, "control_image"),
        ({"control_image": [_edges()]}, "control_image"),  # one list item for two ControlNets
        (
            {"control_image": [_edges(), _edges()], "controlnet_conditioning_scale": [1.0]},
            "controlnet_conditioning_scale",
        ),
        (
            {"control_image": [_edges(), _edges()], "control_guidance_start": 0.8, "control_guidance_end": 0.2},
            "control_guidance_end",
        ),
    ],
)
def test_bad_control_arguments_are_one_line_naming_the_argument(dirs, kwargs, argument):
    pipe = _ours(dirs, "sd", nets=2)
    with pytest.raises(ArgumentError) as err:
        pipe(PROMPT, num_inference_steps=2, progress=False, **kwargs)
    assert err.value.name == argument


def test_control_arguments_without_a_controlnet_are_refused(dirs):
    pipe = load_pipeline(dirs["sd"])
    with pytest.raises(ArgumentError, match="no ControlNet") as err:
        pipe(PROMPT, num_inference_steps=2, control_image=_edges(), progress=False)
    assert err.value.name == "control_image"


# -- artifacts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_two(dirs, tmp_path_factory):
    """SD with two ControlNets on ONNX Runtime, dynamic shapes."""
    out = tmp_path_factory.mktemp("cn-onnx") / "art"
    export(dirs["sd"], "onnx", out, controlnet=[dirs["sd-cn"], dirs["sd-cn2"]], progress=False)
    return out


@pytest.mark.parametrize("guess", [False, True])
def test_onnx_artifact_with_two_controlnets_matches_the_reference(dirs, onnx_two, guess):
    manifest = json.loads((onnx_two / "difflower.json").read_text())
    assert {"controlnet", "controlnet_1"} <= set(manifest["components"])
    assert manifest["pipeline"]["controlnets"] == 2
    assert [c["path"] for c in manifest["source"]["controlnets"]] == [str(dirs["sd-cn"]), str(dirs["sd-cn2"])]
    unet_inputs = [t["name"] for t in manifest["components"]["unet"]["inputs"]]
    assert unet_inputs[-2:] == ["down_block_res_sample_5", "mid_block_res_sample"]
    artifact = load_artifact(onnx_two)
    assert_run_matches(
        _ours(dirs, "sd", nets=2),
        artifact,
        prompt=PROMPT,
        num_inference_steps=3,
        control_image=[_edges(seed=1), _edges(seed=2)],
        controlnet_conditioning_scale=[0.5, 1.2],
        control_guidance_end=[1.0, 0.5],
        guess_mode=guess,
        progress=False,
    )


def test_validate_feeds_the_controlnets_and_passes(dirs, onnx_two):
    report = validate_artifact(onnx_two, dirs["sd"], steps=2)
    assert report.passed
    assert set(report.components) >= {"controlnet", "controlnet_1"}
    assert report.image["passed"]


# TorchScript repeats what OpenVINO's case checks of the static residual inputs: make test-slow
@pytest.mark.parametrize("backend", ["openvino", pytest.param("torchscript", marks=pytest.mark.slow)])
def test_static_sdxl_controlnet_artifacts_match_the_reference(dirs, tmp_path, backend):
    """A static bucket: the residual inputs and the ControlNet's outputs at concrete halved sizes."""
    out = tmp_path / backend
    manifest = export(dirs["sdxl"], backend, out, controlnet=[dirs["sdxl-cn"]], static=["1x64x64"], progress=False)
    shapes = {t.name: t.shape for t in manifest.components["unet"].inputs}
    assert shapes["down_block_res_sample_0"] == (2, 32, 8, 8) and shapes["mid_block_res_sample"] == (2, 64, 2, 2)
    for guess in (False, True):
        assert_run_matches(
            _ours(dirs, "sdxl"),
            load_artifact(out),
            prompt=PROMPT,
            num_inference_steps=3,
            height=64,
            width=64,
            control_image=edge_pattern(64, 64),
            guess_mode=guess,
            progress=False,
        )


# -- the command line ------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_tiny_export_info_and_generate_with_a_controlnet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _cli(capsys, "tiny", "sd")[0] == 0
    code, out, err = _cli(capsys, "tiny", "cn", "--controlnet-for", "sd")
    assert code == 0 and "tiny ControlNet" in out, err
    edge_pattern(64, 64).save("edges.png")
    common = ["--control-image", "edges.png", "--prompt", "x", "--steps", "2", "--seed", "3"]
    code, _, err = _cli(capsys, "generate", "sd", "--controlnet", "cn", *common, "-o", "eager.png")
    assert code == 0, err
    code, out, err = _cli(capsys, "export", "sd", "--backend", "onnx", "--controlnet", "cn", "--out", "art")
    assert code == 0 and "controlnet" in out, err
    code, out, _ = _cli(capsys, "info", "art")
    assert f"ControlNet 0: {tmp_path / 'cn'}" in out
    code, _, err = _cli(capsys, "generate", "art", *common, "-o", "art.png")
    assert code == 0, err
    a = np.asarray(PIL.Image.open("art.png"), dtype=np.int16)
    e = np.asarray(PIL.Image.open("eager.png"), dtype=np.int16)
    assert np.abs(a - e).max() <= 1  # the same picture (8-bit rounding at most)

    # one line naming the flag, exit 2, nothing written
    bad = [
        (["generate", "art", "--prompt", "x", "-o", "none.png"], "argument --control-image"),
        (
            ["generate", "art", *common, "--control-start", "0.9", "--control-end", "0.1", "-o", "none.png"],
            "argument --control-end",
        ),
        (["generate", "art", "--controlnet", "cn", *common, "-o", "none.png"], "argument --controlnet"),
        (["export", "sd", "--backend", "onnx", "--controlnet", "sd", "--out", "bad"], "not a ControlNet folder"),
    ]
    for args, expected in bad:
        code, _, err = _cli(capsys, *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "bad").exists()


# AOTInductor's compile is the slowest of them (49 s) and test_aoti covers the backend: make test-slow
@pytest.mark.parametrize("backend", [pytest.param("aoti", marks=pytest.mark.slow), "coreml"])
def test_unet_and_controlnet_export_to_the_other_backends(dirs, tmp_path, backend):
    """AOTInductor compiles both with the residual inputs and meets the export gates here; Core ML
    converts them (its prediction, and so its parity, needs macOS)."""
    manifest = export(
        dirs["sd"],
        backend,
        tmp_path / backend,
        controlnet=[dirs["sd-cn"]],
        static=["1x64x64"],
        components=["unet", "controlnet"],
        progress=False,
    )
    unet_inputs = [t.name for t in manifest.components["unet"].inputs]
    assert "mid_block_res_sample" in unet_inputs and "down_block_res_sample_5" in unet_inputs
    assert [t.name for t in manifest.components["controlnet"].outputs][-1] == "mid_block_res_sample"
    parities = [r.parity.passed for r in manifest.components.values()]
    if backend == "aoti" or sys.platform == "darwin":
        assert parities == [True, True]
    else:
        assert parities == [None, None]  # Core ML prediction: measured on a Mac, not here


def test_a_controlnet_from_the_hub_cache(dirs, offline_hub, tmp_path):
    """A repo id resolves through huggingface_hub's cache (offline here) to the same ControlNet,
    and an export records its repo and commit."""
    from test_hub import COMMIT, cache_repo

    cache_repo(offline_hub, "test-org/tiny-controlnet", dirs["sd-cn"])
    control = _edges()
    run = dict(control_image=control, generator=torch.Generator().manual_seed(0))
    from_hub = ours_run(load_pipeline(dirs["sd"], controlnets=["test-org/tiny-controlnet"]), PROMPT, 2, **run)
    run["generator"] = torch.Generator().manual_seed(0)
    local = ours_run(_ours(dirs, "sd"), PROMPT, 2, **run)
    assert np.array_equal(from_hub.images, local.images)
    manifest = export(
        dirs["sd"],
        "onnx",
        tmp_path / "art",
        controlnet=["test-org/tiny-controlnet"],
        components=["controlnet"],
        progress=False,
    )
    record = manifest.source["controlnets"][0]
    assert record["hub"]["repo_id"] == "test-org/tiny-controlnet" and record["hub"]["commit"] == COMMIT


def test_int8_calibration_runs_the_controlnets(dirs, tmp_path):
    """Static int8 calibrates the UNet on the inputs it sees in a controlled run (residuals
    included); the ControlNet stays in float; validate holds the artifact to the int8 gates."""
    out = tmp_path / "int8"
    manifest = export(
        dirs["sd"],
        "onnx",
        out,
        controlnet=[dirs["sd-cn"]],
        static=["1x64x64"],
        quantize="int8",
        calibration_prompts=1,
        calibration_steps=2,
        components=["text_encoder", "unet", "controlnet", "vae_decoder"],
        progress=False,
    )
    assert manifest.precision == "int8"
    assert all(r.parity.passed for r in manifest.components.values())
    assert manifest.components["controlnet"].parity.max_abs < 1e-4  # float: not quantized
    assert validate_artifact(out, dirs["sd"], steps=2).passed
