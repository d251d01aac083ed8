"""Step caching in the one loop: DeepCache on UNets against the `DeepCache` package's own helper
(DeepCacheSDHelper, wrapping diffusers' UNet blocks) on the same tiny checkpoints."""

from __future__ import annotations

import diffusers  # the oracle: missing it fails the suite, never skips it
import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper  # the published implementation, as the oracle
from parity_helpers import assert_run_matches, diffusers_run, ours_run
from parity_helpers import assert_same_as_diffusers as assert_same

from difflower.cli import main
from difflower.driver import export
from difflower.errors import ArgumentError
from difflower.reference.pipeline import load_pipeline
from difflower.reference.step_cache import DeepCache, parse_cache
from difflower.runtimes.pipeline import load_artifact
from difflower.validate.parity import validate_artifact

PROMPT = "a lighthouse on a cliff"
PIPELINES = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}


def _theirs(tiny_dirs, family: str, interval: int, branch: int):
    extra = {"safety_checker": None} if family == "sd" else {}
    pipe = PIPELINES[family].from_pretrained(tiny_dirs[family], **extra)
    # DeepCache counts steps by the timestep's first index: schedulers with unique timesteps only
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return pipe


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 1), (3, 2), (2, 3)])
def test_deepcache_matches_the_deepcache_package(tiny_dirs, family, interval, branch):
    """Every step's latents and the image equal DeepCache's helper on diffusers' pipeline: the
    same refresh steps, the same shallow path, the same cached feature."""
    images, latents = diffusers_run(
        _theirs(tiny_dirs, family, interval, branch), PROMPT, 7, generator=torch.Generator().manual_seed(0)
    )
    pipe = load_pipeline(tiny_dirs[family], scheduler="euler")
    ours = ours_run(pipe, PROMPT, 7, cache=f"deepcache:interval={interval},branch={branch}",
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert ours.full_steps == [i % interval == 0 for i in range(7)]
    assert_same(ours, images, latents)
    plain = ours_run(pipe, PROMPT, 7, generator=torch.Generator().manual_seed(0))
    assert np.abs(plain.images - ours.images).max() > 1e-4  # the cached steps really were shallow


def test_parse_cache_and_its_errors():
    assert parse_cache("deepcache") == DeepCache(3, 0)
    assert parse_cache("deepcache:interval=5,branch=2") == DeepCache(5, 2)
    for bad in ("firstblock", "deepcache:interval=0", "deepcache:every=3", "deepcache:interval=x"):
        with pytest.raises(ArgumentError) as err:
            parse_cache(bad)
        assert err.value.name == "cache"


def test_a_branch_the_unet_lacks_is_one_line(tiny_dirs, tmp_path, capsys):
    """The eager reference refuses it before any work, naming --cache (no traceback)."""
    out = tmp_path / "x.png"
    assert (
        main(["generate", str(tiny_dirs["sd"]), "--prompt", "x", "--cache", "deepcache:branch=99", "-o", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "argument --cache: DeepCache branch must be in [0, 6)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_deepcache_on_sd3_is_refused(tiny_dirs):
    with pytest.raises(ArgumentError, match="transformer"):
        load_pipeline(tiny_dirs["sd3"])(PROMPT, num_inference_steps=2, cache="deepcache", progress=False)


# -- artifacts: the graphs DeepCache needs, on every backend that runs here ----------------------


@pytest.mark.parametrize(
    "family,backend,branch,static",
    [("sd", "onnx", 0, []), ("sdxl", "openvino", 4, ["1x64x64"]), ("sd", "torchscript", 5, [])],
)
def test_cached_runs_on_artifacts_equal_the_reference(tiny_dirs, tmp_path, family, backend, branch, static):
    """--cache-graphs: the UNet also returns the feature and unet_shallow takes it; a cached run
    on the artifact makes the reference's decisions, latents within the fp32 gates."""
    out = tmp_path / backend
    manifest = export(tiny_dirs[family], backend, out, cache_graphs=f"deepcache:branch={branch}", static=static,
                      progress=False)  # fmt: skip
    assert [t.name for t in manifest.components["unet"].outputs] == ["out_sample", "deepcache_feature"]
    assert manifest.components["unet_shallow"].inputs[-1].name == "deepcache_feature"
    assert all(r.parity.passed for r in manifest.components.values())
    policy = f"deepcache:interval=3,branch={branch}"
    a, e = assert_run_matches(load_pipeline(tiny_dirs[family]), load_artifact(out), prompt=PROMPT,
                              num_inference_steps=7, cache=policy, progress=False)  # fmt: skip
    assert a.full_steps == e.full_steps and sum(a.full_steps) < len(a.full_steps)
    plain = load_artifact(out)(PROMPT, num_inference_steps=7, seed=11, output_type="np", progress=False)
    assert np.abs(plain.images - a.images).max() > 1e-4  # the plain run ignores the extra output


def test_validate_reports_the_decisions(tiny_dirs, tmp_path, capsys):
    export(tiny_dirs["sd"], "onnx", tmp_path / "art", cache_graphs="deepcache", progress=False)
    report = validate_artifact(tmp_path / "art", tiny_dirs["sd"], steps=5, cache="deepcache:interval=2")
    assert report.passed and report.cache["passed"]
    assert report.cache["full_steps"] == report.cache["reference_full_steps"] == [True, False, True, False, True, False]
    assert main(["generate", str(tmp_path / "art"), "--prompt", "x", "--steps", "5", "--cache", "deepcache:interval=2",
                 "-o", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert "3 of them with the whole UNet (deepcache:interval=2)" in capsys.readouterr().out


def test_cache_errors_name_the_flag(tiny_dirs, sd_onnx, tmp_path, capsys):
    plain = load_artifact(sd_onnx)
    with pytest.raises(ArgumentError, match="--cache-graphs deepcache") as err:
        plain(PROMPT, num_inference_steps=2, cache="deepcache", progress=False)
    assert err.value.name == "cache"
    only = ["unet", "unet_shallow"]
    export(tiny_dirs["sd"], "onnx", tmp_path / "b1", cache_graphs="deepcache:branch=1", components=only, progress=False)
    sd, x = str(tiny_dirs["sd"]), str(tmp_path / "x")
    cases = [
        (["export", sd, "--backend", "onnx", "--cache-graphs", "deepcache:interval=3", "--out", x],
         "argument --cache-graphs: takes deepcache[:branch=K]"),
        (["export", str(tiny_dirs["sd3"]), "--backend", "onnx", "--cache-graphs", "deepcache", "--out", x],
         "argument --cache-graphs: deepcache splits a UNet"),
        (["export", sd, "--backend", "onnx", "--cache-graphs", "deepcache:branch=9", "--out", x],
         "argument --cache-graphs: DeepCache branch must be in [0, 6)"),
        (["generate", str(tmp_path / "b1"), "--prompt", "x", "--cache", "deepcache:branch=0", "-o", x + ".png"],
         "argument --cache: this artifact's DeepCache graphs split at branch 1"),
    ]  # fmt: skip
    for args, expected in cases:
        assert main(args) == 2
        err_text = capsys.readouterr().err
        assert expected in err_text and len(err_text.strip().splitlines()) == 1, err_text
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.png").exists()
