"""TensorRT backend: what runs without a GPU (optimization profiles from buckets, engine cache
keys and reuse, the ONNX clean-up, argument checks and the clear errors), and the GPU path,
which skips here unless `tensorrt` and a CUDA device are present."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from difflower.artifact.manifest import Bucket, Manifest  # noqa: E402
from difflower.artifact.specs import component_specs  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.errors import ArgumentError  # noqa: E402
from difflower.exporters.tensorrt import (  # noqa: E402
    builder_flags,
    cached_engine,
    engine_cache_key,
    onnx_files,
    optimization_profiles,
)
from difflower.reference.loading import read_model_index  # noqa: E402
from difflower.reference.step_cache import CacheGraphs  # noqa: E402

HAS_GPU_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
GPU_REASON = "needs NVIDIA's tensorrt package and a CUDA GPU (this machine has " + (
    "no tensorrt)" if importlib.util.find_spec("tensorrt") is None else "no CUDA device)"
)


def _spec(root, name):
    return next(s for s in component_specs(read_model_index(root)) if s.name == name)


def test_profiles_span_the_buckets_with_the_cfg_doubling(tiny_dirs):
    unet = _spec(tiny_dirs["sd"], "unet")
    buckets = [Bucket(1, 64, 64), Bucket(2, 128, 96)]
    profiles = optimization_profiles(unet, buckets, cfg=True, vae_scale_factor=8)
    assert profiles["sample"] == {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 12]}
    assert profiles["timestep"] == {"min": [2], "opt": [2], "max": [4]}
    assert profiles["encoder_hidden_states"]["max"] == [4, 77, 32]
    no_cfg = optimization_profiles(unet, buckets, cfg=False, vae_scale_factor=8)
    assert no_cfg["sample"]["max"] == [2, 4, 16, 12]
    text = optimization_profiles(_spec(tiny_dirs["sd"], "text_encoder"), buckets, cfg=True, vae_scale_factor=8)
    assert text["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [2, 77]}
    decoder = optimization_profiles(_spec(tiny_dirs["sd"], "vae_decoder"), buckets[::-1], cfg=True, vae_scale_factor=8)
    assert decoder["latent_sample"]["opt"] == [2, 4, 16, 12]  # the first bucket given is the optimum
    with pytest.raises(ArgumentError, match="--static"):
        optimization_profiles(unet, [], cfg=True, vae_scale_factor=8)


def test_profiles_of_the_cache_graphs_follow_the_token_grid(tiny_dirs):
    """The first-block cache's graphs take (B, D, h, w) token grids, h = latent height / patch size."""
    specs = {
        s.name: s for s in component_specs(read_model_index(tiny_dirs["sd3"]), cache_graphs=CacheGraphs("first-block"))
    }
    buckets = [Bucket(1, 64, 64), Bucket(1, 128, 96)]
    tail = optimization_profiles(specs["transformer_tail"], buckets, cfg=True, vae_scale_factor=8)
    width = specs["transformer_tail"].inputs[0].shape[1]
    assert tail["first_block_hidden"] == {"min": [2, width, 4, 4], "opt": [2, width, 4, 4], "max": [2, width, 8, 6]}
    assert tail["tail_residual"] == tail["first_block_hidden"]
    first = optimization_profiles(specs["transformer_first"], buckets, cfg=True, vae_scale_factor=8)
    assert first["hidden_states"]["max"] == [2, 16, 16, 12]


def test_profiles_of_flux_graphs_follow_the_image_tokens(tmp_path):
    """Flux's graphs (the first-block cache's included) take packed tokens: their profiles span
    the buckets' image token counts (h/16 * w/16 at VAE factor 8), positions and T5 window fixed."""
    from difflower.reference.tiny import make_tiny_checkpoint

    index = read_model_index(make_tiny_checkpoint(tmp_path / "flux", "flux", seed=0))
    specs = {s.name: s for s in component_specs(index, cache_graphs=CacheGraphs("first-block"))}
    buckets = [Bucket(1, 64, 64), Bucket(2, 128, 96)]
    transformer = optimization_profiles(specs["transformer"], buckets, cfg=False, vae_scale_factor=8)
    assert transformer["hidden_states"] == {"min": [1, 16, 64], "opt": [1, 16, 64], "max": [2, 48, 64]}
    assert transformer["img_ids"] == {"min": [16, 3], "opt": [16, 3], "max": [48, 3]}
    assert transformer["guidance"] == {"min": [1], "opt": [1], "max": [2]}
    tail = optimization_profiles(specs["transformer_tail"], buckets, cfg=False, vae_scale_factor=8)
    width = specs["transformer_tail"].inputs[0].shape[2]
    assert tail["first_block_hidden"] == {"min": [1, 16, width], "opt": [1, 16, width], "max": [2, 48, width]}
    assert tail["tail_residual"] == tail["first_block_hidden"]
    assert [t.name for t in specs["transformer_tail"].inputs][2:] == ["pooled_projections", "timestep", "guidance"]


def test_engine_cache_key_changes_with_every_input(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph" * 100)
    (folder / "model.onnx_data").write_bytes(b"weights" * 100)
    profiles = {"sample": {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]}}
    facts = dict(tensorrt_version="10.9", gpu="NVIDIA H100", compute_capability="9.0", profiles=profiles,
                 precision="fp16", flags=["STRONGLY_TYPED"])  # fmt: skip
    key = engine_cache_key(onnx_files(folder), **facts)
    assert key == engine_cache_key(onnx_files(folder), **facts)
    changed = [
        {**facts, "tensorrt_version": "10.10"},
        {**facts, "gpu": "NVIDIA H200"},
        {**facts, "compute_capability": "8.9"},
        {**facts, "precision": "bf16"},
        {**facts, "flags": ["BF16"]},
        {**facts, "profiles": {"sample": {**profiles["sample"], "max": [4, 4, 8, 8]}}},
    ]
    assert len({key, *(engine_cache_key(onnx_files(folder), **c) for c in changed)}) == len(changed) + 1
    (folder / "model.onnx_data").write_bytes(b"weightz" * 100)  # one byte of the weights
    assert engine_cache_key(onnx_files(folder), **facts) != key


def test_engine_cache_builds_once_and_reuses(tmp_path):
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"serialized engine"

    data, hit = cached_engine("abc", build, tmp_path / "cache")
    assert (data, hit, len(builds)) == (b"serialized engine", False, 1)
    data, hit = cached_engine("abc", build, tmp_path / "cache")
    assert (data, hit, len(builds)) == (b"serialized engine", True, 1)
    cached_engine("abd", build, tmp_path / "cache")  # another key builds again
    assert len(builds) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["abc.plan", "abd.plan"]  # no partial files


def test_builder_flags_follow_precision_and_quantization():
    assert builder_flags("fp16", None) == ["STRONGLY_TYPED"]  # the fp16 ONNX carries its fp32 islands
    assert builder_flags("bf16", None) == ["BF16"]
    assert builder_flags("fp32", None) == []
    assert builder_flags("fp16", "fp8") == ["FP16", "FP8"]


def test_sanitize_folds_and_keeps_the_numbers(tiny_dirs, tmp_path):
    pytest.importorskip("polygraphy", reason="polygraphy (the tensorrt extra) is not installed")
    pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon (the tensorrt extra) is not installed")
    import shutil

    from difflower.graph_passes.tensorrt_sanitize import sanitize_for_tensorrt

    export(tiny_dirs["sd"], "onnx", tmp_path / "a", components=["unet"], static=["1x64x64"], progress=False)
    source = tmp_path / "a" / "unet" / "model.onnx"
    export(tiny_dirs["sd"], "onnx", tmp_path / "b", components=["unet"], progress=False)
    dynamic = tmp_path / "b" / "unet" / "model.onnx"
    shutil.copy(dynamic, tmp_path / "dynamic.onnx")
    result = sanitize_for_tensorrt(dynamic)
    assert result.settings["nodes_after"] < result.settings["nodes_before"]
    assert result.rewrites["nodes folded or removed"] > 0
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array([10.0, 500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    for path in (dynamic, source):
        cleaned = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        original = ort.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
        assert np.abs(cleaned - original.run(None, feeds)[0]).max() <= 1e-5


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"precision": "int8"}, "--precision"),
        ({"quantize": "int4"}, "--quantize"),
        ({"attention": "onnxruntime"}, "--attention"),
        ({"palettize": 4}, "--palettize"),
    ],
)
def test_tensorrt_argument_errors_name_the_flag(tiny_dirs, tmp_path, options, flag):
    with pytest.raises(ArgumentError, match=flag):
        export(tiny_dirs["sd"], "tensorrt", tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_GPU_TENSORRT, reason="this machine can build TensorRT engines")
def test_no_gpu_or_no_tensorrt_is_one_clear_error(tiny_dirs, tmp_path, onnx_artifact):
    with pytest.raises(ArgumentError, match="TensorRT|tensorrt") as err:
        export(tiny_dirs["sd"], "tensorrt", tmp_path / "out", progress=False)
    assert "GPU" in str(err.value) or "pip install" in str(err.value)
    assert not (tmp_path / "out").exists()
    from difflower.runtimes.tensorrt_engine import TensorRTEngine

    record = Manifest.read(onnx_artifact).components["unet"]
    with pytest.raises(ArgumentError, match="--device"):
        TensorRTEngine.open(record, onnx_artifact, Manifest.read(onnx_artifact), device="cpu")


@pytest.fixture
def onnx_artifact(tiny_dirs, tmp_path):
    out = tmp_path / "onnx"
    export(tiny_dirs["sd"], "onnx", out, components=["unet"], progress=False)
    return out


@pytest.mark.skipif(not HAS_GPU_TENSORRT, reason=GPU_REASON)
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_tensorrt_fp16_builds_generates_and_validates(tiny_dirs, tmp_path, family):
    from difflower.runtimes.pipeline import load_artifact
    from difflower.validate.parity import validate_artifact

    out = tmp_path / family
    cache = tmp_path / "cache"
    manifest = export(tiny_dirs[family], "tensorrt", out, precision="fp16", cache_dir=str(cache), progress=False)
    assert all(r.parity.passed for r in manifest.components.values())
    assert all(r.config["engine_cache_key"] for r in manifest.components.values())
    again = export(tiny_dirs[family], "tensorrt", tmp_path / "again", precision="fp16", cache_dir=str(cache))
    assert all(r.config["engine_cache_hit"] for r in again.components.values())
    pipe = load_artifact(out, device="cuda")
    image = pipe("a red castle", num_inference_steps=4, seed=0, output_type="np", progress=False).images
    assert np.isfinite(image).all()
    report = validate_artifact(out, tiny_dirs[family], steps=4, device="cuda")
    assert report.passed, report
