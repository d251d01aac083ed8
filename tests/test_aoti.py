"""AOTInductor packages (`--backend aoti`) and compiled eager (`compile=True`).

Each package is compiled by Inductor (C++ on the CPU), a minute or so per tiny component on two
cores: the default run compiles the tiny SD UNet (one static bucket) and checks it through the
engine, the gates, the version and device checks and the sha256 check; the whole pipeline of
every family, the multi-bucket graph and the fused-QKV composition run with `make test-slow`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from difflower.artifact.manifest import Manifest
from difflower.cli import main
from difflower.driver import export
from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.pipeline import load_pipeline
from difflower.runtimes.pipeline import load_artifact, make_engines
from difflower.validate.parity import validate_artifact


@pytest.fixture(scope="module")
def aoti_unet(tiny_dirs, tmp_path_factory):
    """The tiny SD UNet as an AOTInductor package, at the native size with CFG (2x4x8x8)."""
    out = tmp_path_factory.mktemp("aoti") / "unet"
    export(tiny_dirs["sd"], "aoti", out, components=["unet"], progress=False)
    return out


def test_the_package_meets_the_fp32_gates_through_the_engine(tiny_dirs, aoti_unet):
    manifest = Manifest.read(aoti_unet)
    record = manifest.components["unet"]
    assert record.files == ["unet/config.json", "unet/model.pt2"]
    assert record.parity.passed and record.parity.max_abs <= 1e-4 and record.parity.settings["engine"] == "aoti"
    assert record.config["compiled_on"] == "cpu" and record.config["torch"] == torch.__version__
    assert record.config["compile_seconds"] > 0 and record.config["peak_rss_gib_after_compile"] > 0
    assert [t.shape for t in record.inputs] == [(2, 4, 8, 8), (2,), (2, 77, 32)]  # static: one bucket
    report = validate_artifact(aoti_unet, tiny_dirs["sd"], steps=2)  # a partial artifact: component parity
    assert report.passed and report.components["unet"].max_abs <= 1e-4


def test_a_package_runs_only_with_its_torch_and_its_device(aoti_unet, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(aoti_unet, art)
    raw = json.loads((art / "difflower.json").read_text())
    raw["components"]["unet"]["config"]["torch"] = "2.99.0"
    (art / "difflower.json").write_text(json.dumps(raw))
    with pytest.raises(ArgumentError, match=r"compiled by torch 2\.99\.0; this is torch .* re-export"):
        make_engines(Manifest.read(art), art)
    with pytest.raises(ArgumentError, match=r"compiled for cpu; a package runs where it was compiled for"):
        make_engines(Manifest.read(aoti_unet), aoti_unet, device="cuda")


def test_a_loader_that_crashes_is_one_line_not_a_dead_process(aoti_unet, monkeypatch):
    """torch 2.11's loader segfaulted opening CUDA packages on the lent H200: the engine opens a
    package in a child first, so a crash there is a CheckpointError here (a CUDA-only check,
    driven here on the CPU package)."""
    from difflower.runtimes import aoti_engine

    package = aoti_unet / "unet" / "model.pt2"
    monkeypatch.setattr(aoti_engine, "_loader_checked", set())
    monkeypatch.setattr(aoti_engine, "LOAD_CHECK", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(CheckpointError, match=r"model\.pt2: torch .*'s AOTInductor loader crashed \(SIGSEGV\)"):
        aoti_engine.check_loader(package, "cpu")
    monkeypatch.undo()
    monkeypatch.setattr(aoti_engine, "_loader_checked", set())
    aoti_engine.check_loader(package, "cpu")  # the real check: the package opens in the child
    assert aoti_engine._loader_checked == {(torch.__version__, "cpu")}


def test_an_fp16_package_keeps_a_force_upcast_vae_in_fp32():
    from types import SimpleNamespace

    from difflower.exporters.aoti import compute_precision
    from difflower.reference.autoencoder_kl import VAEConfig

    upcast, plain = VAEConfig(force_upcast=True), VAEConfig(force_upcast=False)
    assert compute_precision(SimpleNamespace(kind="vae_decoder"), "fp16", upcast) == "fp32"
    assert compute_precision(SimpleNamespace(kind="vae_encoder"), "fp16", plain) == "fp16"
    assert compute_precision(SimpleNamespace(kind="vae_decoder"), "bf16", upcast) == "bf16"
    assert compute_precision(SimpleNamespace(kind="unet"), "fp16", upcast) == "fp16"


def test_a_changed_package_is_not_loaded(aoti_unet, tmp_path):
    """A package holds a shared library: it is opened only when it is the one the export wrote."""
    art = tmp_path / "art"
    shutil.copytree(aoti_unet, art)
    package = art / "unet" / "model.pt2"
    package.write_bytes(package.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"model\.pt2: differs from what was exported"):
        make_engines(Manifest.read(art), art)


def test_fp16_on_the_cpu_and_onnxruntimes_attention_are_refused_before_work(tiny_dirs, tmp_path, capsys):
    base = ["export", str(tiny_dirs["sd"]), "--backend", "aoti", "--out", str(tmp_path / "x")]
    assert main([*base, "--precision", "fp16"]) == 2
    assert "fp16 kernels are for the GPU; on the CPU use bf16" in capsys.readouterr().err
    assert main([*base, "--attention", "onnxruntime"]) == 2
    assert "aoti takes sdpa or math" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compiled_eager_meets_the_fp32_gates(tiny_dirs):
    """Regional compilation: the repeated blocks under torch.compile, the rest eager."""
    eager = load_pipeline(tiny_dirs["sd"])
    compiled = load_pipeline(tiny_dirs["sd"], compile=True)
    compiled_blocks = [m for m in compiled.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled_blocks) >= 4
    kwargs = dict(num_inference_steps=2, output_type="np", return_trajectory=True, progress=False)
    a = compiled("a red castle", generator=torch.Generator().manual_seed(1), **kwargs)
    e = eager("a red castle", generator=torch.Generator().manual_seed(1), **kwargs)
    torch.testing.assert_close(a.trajectory[-1], e.trajectory[-1], atol=1e-4, rtol=1e-2)
    assert abs(a.images - e.images).max() <= 1e-3


def test_compile_is_for_checkpoints(aoti_unet, capsys, tmp_path):
    assert main(["generate", str(aoti_unet), "--prompt", "a", "--compile", "-o", str(tmp_path / "x.png")]) == 2
    assert "an artifact is compiled at export (aoti)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_every_family_validates_end_to_end(tiny_dirs, tmp_path, family):
    out = tmp_path / family
    manifest = export(tiny_dirs[family], "aoti", out, progress=False)
    assert all(r.parity.passed for r in manifest.components.values())
    report = validate_artifact(out, tiny_dirs[family], steps=3)
    assert report.passed, report.to_json()


@pytest.mark.slow
def test_several_buckets_share_one_dynamic_graph_and_compose_with_fused_qkv(tiny_dirs, tmp_path):
    out = tmp_path / "buckets"
    manifest = export(
        tiny_dirs["sd"], "aoti", out, components=["unet"], static=["1x64x64", "1x64x96"], fuse_qkv=True, progress=False
    )
    record = manifest.components["unet"]
    assert record.parity.passed and "latent_width" in record.config["dynamic_dims"]
    assert any(p["name"] == "fuse_qkv" for p in manifest.passes)
    engine = make_engines(manifest, out)["unet"]
    for width in (8, 12):
        inputs = {
            "sample": torch.randn(2, 4, 8, width),
            "timestep": torch.full((2,), 500.0),
            "encoder_hidden_states": torch.randn(2, 77, 32),
        }
        assert engine(inputs)["out_sample"].shape == (2, 4, 8, width)
    pipe = load_artifact(out)
    assert pipe.manifest.buckets[1].width == 96


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this torch sees none")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_packages_meet_their_gates_on_the_gpu(tiny_dirs, tmp_path, precision):
    out = tmp_path / precision
    manifest = export(tiny_dirs["sd"], "aoti", out, device="cuda", precision=precision, progress=False)
    assert all(r.config["compiled_on"] == "cuda" and r.parity.passed for r in manifest.components.values())
    assert validate_artifact(out, tiny_dirs["sd"], steps=2, device="cuda").passed
    with pytest.raises(ArgumentError, match=r"compiled for cuda; a package runs where it was compiled for"):
        make_engines(manifest, out, device="cpu")


@pytest.mark.slow
def test_first_block_cache_graphs_run_the_references_cached_steps(tiny_dirs, tmp_path):
    """--cache-graphs first-block as AOTInductor packages: a cached run makes the reference's decisions."""
    out = tmp_path / "sd3"
    manifest = export(tiny_dirs["sd3"], "aoti", out, cache_graphs="first-block", progress=False)
    assert all(r.parity.passed for r in manifest.components.values())
    report = validate_artifact(out, tiny_dirs["sd3"], steps=5, cache="first-block:interval=2")
    assert report.passed and report.cache["passed"] and report.cache["full_steps"].count(False) == 2
