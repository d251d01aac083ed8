"""Single-file checkpoints (reference.single_file, `difflower convert`) against diffusers' from_single_file.

The single files are written here from the tiny checkpoints in the authors' layouts (LDM for SD
1.x and 2.x, SGM for SDXL); diffusers' `from_single_file(config=...)` reading them back to the
tiny weights is what proves a file is laid out as the originals are, and our conversion must
give the same weights (max abs 0) and the same image.
"""

from __future__ import annotations

import hashlib
import json

import diffusers  # the oracle: missing it fails the suite, never skips it
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from difflower.cli import main
from difflower.reference import single_file as sf
from difflower.reference.loading import load_components
from difflower.reference.pipeline import load_pipeline

PIPELINES = {"sd1": diffusers.StableDiffusionPipeline, "sd2": diffusers.StableDiffusionPipeline,
             "sdxl": diffusers.StableDiffusionXLPipeline}  # fmt: skip


@pytest.fixture(scope="module")
def single_files(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    families = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}
    return {
        layout: sf.write_single_file(tiny_dirs[f], layout, root / f"{layout}.safetensors")
        for layout, f in families.items()
    }


def _states(components):
    return {n: m.state_dict() for n, m in components.items() if isinstance(m, torch.nn.Module)}


def _assert_converts_back(file, checkpoint, out, **size) -> np.ndarray:
    """`difflower convert FILE --config-from CHECKPOINT` gives every component's weights exactly
    and the same image; returns that image."""
    assert main(["convert", str(file), "--config-from", str(checkpoint), "--out", str(out)]) == 0
    original, converted = _states(load_components(checkpoint)[1]), _states(load_components(out)[1])
    assert converted.keys() == original.keys()
    for name, state in original.items():
        assert converted[name].keys() == state.keys()
        assert all(torch.equal(converted[name][k], v) for k, v in state.items()), name
    run = {"num_inference_steps": 2, "seed": 0, "output_type": "np", "progress": False, **size}
    ours, expected = load_pipeline(out)("a castle", **run).images, load_pipeline(checkpoint)("a castle", **run).images
    np.testing.assert_array_equal(ours, expected)
    return expected


@pytest.mark.parametrize("layout", ["sd1", "sd2", "sdxl"])
def test_a_single_file_converts_to_the_weights_diffusers_reads_from_it(tiny_dirs, single_files, tmp_path, layout):
    checkpoint = tiny_dirs[sf.LAYOUTS[layout][0]]
    original = _states(load_components(checkpoint)[1])
    # the oracle reads the file back to the original weights, so the file is laid out as the originals are
    theirs = PIPELINES[layout].from_single_file(
        str(single_files[layout]), config=str(checkpoint), local_files_only=True
    )
    for name, state in original.items():
        if (layout, name) == ("sdxl", "text_encoder_2"):
            # diffusers 0.42.1 under transformers 5.24 reads SDXL's OpenCLIP-bigG from a single file only in
            # part (22 of 37 tensors; text_projection stays on the meta device). The OpenCLIP layout itself
            # is proven by the sd2 case, which diffusers reads whole; ours is checked against the original.
            continue
        theirs_state = getattr(theirs, name).state_dict()
        assert all(torch.equal(theirs_state[k], v) for k, v in state.items()), name
    out = tmp_path / "converted"
    _assert_converts_back(single_files[layout], checkpoint, out)
    assert json.loads((out / sf.MARKER).read_text())["layout"] == layout


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_what_a_single_file_lacks_or_adds_is_one_line(tiny_dirs, single_files, tmp_path, capsys):
    base = ["convert", str(single_files["sd1"]), "--out", str(tmp_path / "out")]
    assert main(base) == 2
    assert "argument --config-from: a single file holds weights only" in _error(capsys)
    assert main([*base, "--config-from", str(tiny_dirs["sdxl"])]) == 2
    assert "is an sdxl checkpoint; this file is sd1: pass a sd one" in _error(capsys)
    tensors = load_file(single_files["sd1"])
    missing = {k: v for k, v in tensors.items() if k != "model.diffusion_model.out.2.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    argv = ["convert", str(tmp_path / "missing.safetensors"), "--config-from", str(tiny_dirs["sd"])]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "unet tensor 'conv_out.weight' needs 'model.diffusion_model.out.2.weight', which the file lacks" in _error(
        capsys
    )
    extra = {**tensors, "model.diffusion_model.input_blocks.99.0.in_layers.0.weight": torch.zeros(2)}
    save_file(extra, tmp_path / "extra.safetensors")
    argv = ["convert", str(tmp_path / "extra.safetensors"), "--config-from", str(tiny_dirs["sd"])]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "1 tensors have no place in the --config-from architecture (first: model.diffusion_model.input" in _error(
        capsys
    )
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, tmp_path / "flux.safetensors")
    argv = ["convert", str(tmp_path / "flux.safetensors"), "--config-from", str(tiny_dirs["sd"])]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "FLUX.1 blocks but no 'img_in.weight': a partial or unknown Flux file" in _error(capsys)
    assert main(["convert", str(tiny_dirs["sd"]), "--config-from", str(tiny_dirs["sd"]), "--out", "x"]) == 2
    assert "is a folder; convert takes a single .safetensors file" in _error(capsys)
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    assert main(["convert", str(tmp_path / "model.ckpt"), "--config-from", str(tiny_dirs["sd"]), "--out", "x"]) == 2
    assert ".safetensors single files only (a .ckpt is a pickle)" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_earlier_conversion_is_replaced_only_with_overwrite(tiny_dirs, single_files, tmp_path, capsys):
    out, mine = tmp_path / "out", tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    argv = ["convert", str(single_files["sd1"]), "--config-from", str(tiny_dirs["sd"])]
    assert main([*argv, "--out", str(mine), "--overwrite"]) == 2
    assert "not a folder difflower convert wrote" in _error(capsys) and (mine / "keep.txt").is_file()
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--out", str(out), "--prediction-type", "v_prediction", "--overwrite"]) == 0
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_config_from_takes_a_hub_repo_id(tiny_dirs, single_files, offline_hub, tmp_path):
    from test_hub import cache_repo

    cache_repo(offline_hub, "test-org/base-sd", tiny_dirs["sd"])
    argv = ["convert", str(single_files["sd1"]), "--config-from", "test-org/base-sd", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    converted = _states(load_components(tmp_path / "out")[1])
    original = _states(load_components(tiny_dirs["sd"])[1])
    assert all(torch.equal(converted["unet"][k], v) for k, v in original["unet"].items())


def test_a_single_file_given_to_any_command_is_converted_once(
    tiny_dirs, single_files, offline_hub, tmp_path, monkeypatch, capsys
):
    from test_hub import cache_repo

    cache_repo(offline_hub, "test-org/base-sd", tiny_dirs["sd"])
    monkeypatch.setitem(sf.BASES, "sd1", "test-org/base-sd")  # the layout's base repo, in the offline cache
    monkeypatch.setenv("DIFFLOWER_CACHE", str(tmp_path / "cache"))
    png = tmp_path / "x.png"
    argv = ["generate", str(single_files["sd1"]), "--prompt", "a castle", "--steps", "2", "-o", str(png)]
    assert main(argv) == 0
    [converted] = (tmp_path / "cache" / "single-file").iterdir()
    original = _states(load_components(tiny_dirs["sd"])[1])
    assert all(torch.equal(_states(load_components(converted)[1])["unet"][k], v) for k, v in original["unet"].items())

    def never(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(sf, "convert_single_file", never)  # the cache keyed by the file's sha256 serves now
    out = tmp_path / "art"
    assert (
        main(
            ["export", str(single_files["sd1"]), "--backend", "torchscript", "--components", "unet", "--out", str(out)]
        )
        == 0
    )
    source = json.loads((out / "difflower.json").read_text())["source"]
    digest = hashlib.sha256(single_files["sd1"].read_bytes()).hexdigest()
    assert source["single_file"]["sha256"] == digest and converted.name == digest[:32]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"from {single_files['sd1']} (single file, sha256 " in capsys.readouterr().out
    assert main(["generate", str(single_files["sd2"]), "--prompt", "a", "-o", str(png), "--overwrite"]) == 2
    assert "an sd2 single file: its configs (and SD 2.x's prediction type) cannot be told" in capsys.readouterr().err


# -- FLUX.1 files: Black Forest Labs' layout, the transformer alone ------------------------------


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from difflower.reference.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("flux") / "flux", "flux", seed=0)


@pytest.mark.parametrize("comfy", [False, True])
def test_a_flux_file_converts_to_the_checkpoints_weights(flux_dir, tmp_path, comfy):
    """A tiny FLUX.1-dev transformer written in BFL's layout (fused q|k|v, a single block's fused
    q|k|v|MLP, RMS `scale`s, the final modulation's halves exchanged; with `comfy` under ComfyUI's
    'model.diffusion_model.' prefix) converts back to the same weights, takes the other components
    from --config-from, and generates the same image. (diffusers' own reader hard-codes FLUX.1's
    width, 3072: the slow test below holds our layout to it at that width.)"""
    file = sf.write_single_file(flux_dir, "flux-dev", tmp_path / "flux1-dev.safetensors")
    if comfy:
        save_file({sf.UNET_PREFIX + k: v for k, v in load_file(file).items()}, str(file))
    assert "double_blocks.0.img_attn.qkv.weight" in {k.removeprefix(sf.UNET_PREFIX) for k in load_file(file)}
    out = tmp_path / "converted"
    _assert_converts_back(file, flux_dir, out, height=32, width=32)
    assert json.loads((out / sf.MARKER).read_text())["layout"] == "flux-dev"
    assert sf.detect_layout(set(load_file(file)), file) == "flux-dev"


def test_a_flux_file_given_to_a_command_takes_the_rest_from_its_base_repo(flux_dir, offline_hub, tmp_path, monkeypatch):
    """`generate FLUX1.safetensors`: the transformer from the file, the VAE and text encoders from
    the layout's base repo (FLUX.1-dev's, here a cached stand-in holding no transformer weights)."""
    import shutil

    from test_hub import cache_repo

    from difflower.hub import allow_patterns

    file = sf.write_single_file(flux_dir, "flux-dev", tmp_path / "flux1-dev.safetensors")
    base = tmp_path / "base"
    shutil.copytree(flux_dir, base, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
    shutil.copy(flux_dir / "vae" / "diffusion_pytorch_model.safetensors", base / "vae")
    cache_repo(offline_hub, "test-org/base-flux", base)
    monkeypatch.setitem(sf.BASES, "flux-dev", "test-org/base-flux")
    monkeypatch.setenv("DIFFLOWER_CACHE", str(tmp_path / "cache"))
    png = tmp_path / "x.png"
    argv = ["generate", str(file), "--prompt", "a castle", "--steps", "2", "--height", "32", "--width", "32"]
    assert main([*argv, "--seed", "0", "--threads", str(torch.get_num_threads()), "-o", str(png)]) == 0
    import PIL.Image

    expected = load_pipeline(flux_dir)("a castle", num_inference_steps=2, seed=0, height=32, width=32,
                                       progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(png)), np.asarray(expected))
    patterns = allow_patterns(["transformer", "vae"], skip=("transformer",))  # what a Flux file's base gives
    assert "vae/diffusion_pytorch_model.safetensors" in patterns
    assert not [p for p in patterns if p.startswith("transformer/") and "safetensors" in p]


def test_what_a_flux_file_lacks_or_adds_is_one_line(flux_dir, tiny_dirs, tmp_path, capsys):
    file = sf.write_single_file(flux_dir, "flux-dev", tmp_path / "flux1-dev.safetensors")
    state = load_file(file)
    schnell = tmp_path / "schnell.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("guidance_in.")}, str(schnell))
    extra = tmp_path / "extra.safetensors"
    save_file({**state, "vae.encoder.conv_in.weight": torch.zeros(1)}, str(extra))
    narrow = tmp_path / "narrow.safetensors"
    save_file({**state, "double_blocks.0.img_attn.qkv.weight": torch.zeros(30, 32)}, str(narrow))
    out = tmp_path / "out"
    cases = [
        (schnell, flux_dir, "transformer tensor 'time_text_embed.guidance_embedder.linear_1.weight' needs"),
        (extra, flux_dir, "1 tensors have no place in the --config-from architecture (first: vae.encoder.conv_in"),
        (narrow, flux_dir, "(double_blocks.0.img_attn.qkv.weight): (30, 32) does not split into [32, 32, 32]"),
        (file, tiny_dirs["sd3"], "argument --config-from:"),
        (file, flux_dir, "argument --prediction-type: FLUX.1 is a flow-matching model"),
    ]
    for path, config, expected in cases:
        extra = ["--prediction-type", "epsilon"] if "prediction" in expected else []
        assert main(["convert", str(path), "--config-from", str(config), "--out", str(out), *extra]) == 2
        assert expected in _error(capsys)
        assert not out.exists()
    assert sf.detect_layout(set(load_file(schnell)), schnell) == "flux-schnell"


def test_a_flux_file_at_real_width_reads_as_diffusers_reads_it(flux_dir, tmp_path):
    """At FLUX.1's real width (24 heads of 128, 3072 wide; one double- and one single-stream block,
    random bf16 weights): diffusers' from_single_file reads our BFL-layout file back to the original
    weights (max abs 0), so the layout is the published one, and our conversion gives them too."""
    import shutil

    checkpoint = tmp_path / "flux-real-width"
    shutil.copytree(flux_dir, checkpoint, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    model.to(torch.bfloat16).save_pretrained(checkpoint / "transformer")
    original = model.state_dict()
    file = sf.write_single_file(checkpoint, "flux-dev", tmp_path / "flux1-dev.safetensors")
    theirs = diffusers.FluxTransformer2DModel.from_single_file(
        str(file), config=str(checkpoint), subfolder="transformer", torch_dtype=torch.bfloat16, local_files_only=True
    ).state_dict()
    assert theirs.keys() == original.keys()
    assert all(torch.equal(theirs[k], v) for k, v in original.items())
    out = sf.convert_single_file(file, checkpoint, tmp_path / "converted")
    ours = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == original.keys()
    assert all(torch.equal(ours[k], v) for k, v in original.items())


# -- SD3 / SD3.5 files: Stability's layout (MMDiT + VAE, the text encoders where included) -------


def _tiny_sd3(out, **transformer):
    """A tiny SD3 whose CLIP projections are square, as the real ones are (diffusers' single-file
    CLIP loader assumes it)."""
    from dataclasses import replace

    from difflower.reference.tiny import make_tiny_checkpoint, tiny_spec

    spec = tiny_spec("sd3")
    clip = replace(spec.clips[0], projection_dim=32)
    config = replace(spec.transformer, pooled_projection_dim=64, **transformer)
    return make_tiny_checkpoint(out, "sd3", seed=0, spec=replace(spec, clips=(clip, clip), transformer=config))


@pytest.mark.parametrize(
    "layout, transformer",
    [("sd3", {}), ("sd35-medium", dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)))],  # MMDiT-X
)
def test_an_sd3_file_converts_to_the_weights_diffusers_reads_from_it(tmp_path, layout, transformer):
    checkpoint = _tiny_sd3(tmp_path / "tiny", **transformer)
    file = sf.write_single_file(checkpoint, "sd3", tmp_path / f"{layout}.safetensors")
    assert sf.detect_layout(set(load_file(file)), file) == layout
    original = _states(load_components(checkpoint)[1])
    theirs = diffusers.StableDiffusion3Pipeline.from_single_file(str(file), config=str(checkpoint),
                                                                 local_files_only=True)  # fmt: skip
    # The tiny CLIP-L and CLIP-G have the same shapes, and diffusers tells them apart in a file by shape
    # (it loads one's tensors into the other here; the real ones, 768 and 1280 wide, differ): the CLIPs'
    # layout (transformers' names under text_encoders.clip_l/clip_g.transformer.) is held to the original
    # weights by our round trip below, the MMDiT, the VAE and T5 to diffusers' reader here.
    for name in ("transformer", "vae", "text_encoder_3"):
        theirs_state = getattr(theirs, name).state_dict()
        tied = {"encoder.embed_tokens.weight"} if name == "text_encoder_3" else set()  # T5's, left to tying
        assert {k for k, v in theirs_state.items() if v.is_meta} <= tied, name
        assert all(torch.equal(theirs_state[k], v) for k, v in original[name].items() if k not in tied), name
    _assert_converts_back(file, checkpoint, tmp_path / "converted")
    # a file without text encoders (sd3_medium.safetensors): they come from --config-from
    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not k.startswith("text_encoders.")}, str(bare))
    _assert_converts_back(bare, checkpoint, tmp_path / "bare")
