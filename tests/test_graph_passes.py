"""Graph passes on the tiny checkpoints: fuse_qkv, static_shapes, fp16 with measured fp32
islands, and int8 for ONNX Runtime; each pass's structural effect and its numbers."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from difflower.artifact.manifest import Bucket, Manifest  # noqa: E402
from difflower.artifact.specs import ShapePlan, component_specs, example_inputs, load_export_module  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.errors import ArgumentError  # noqa: E402
from difflower.graph_passes.base import PassDidNotFire  # noqa: E402
from difflower.graph_passes.fp16 import FP16_MAX, convert_fp16, in_scope, select_islands  # noqa: E402
from difflower.graph_passes.fuse_qkv import fuse_qkv  # noqa: E402
from difflower.reference.attention import Attention  # noqa: E402
from difflower.reference.loading import read_model_index, read_safetensors, weight_files  # noqa: E402
from difflower.reference.transformer_sd3 import JointAttention  # noqa: E402
from difflower.validate.parity import validate_artifact  # noqa: E402

FAMILIES = ("sd", "sdxl", "sd3")
BUCKET = Bucket(1, 64, 64)


def _denoiser(root):
    index = read_model_index(root)
    spec = next(s for s in component_specs(index) if s.kind in ("unet", "transformer"))
    inputs = example_inputs(spec, ShapePlan((BUCKET,)).dims(BUCKET, 8))
    return spec, index, inputs


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _passes(manifest: Manifest, name: str, component: str) -> dict:
    return next(p for p in manifest.passes if p["name"] == name and p["component"] == component)


# --- fuse_qkv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_qkv_fuses_every_attention_and_loads_the_unchanged_checkpoint(tiny_dirs, family):
    spec, index, inputs = _denoiser(tiny_dirs[family])
    model = load_export_module(spec, index.root)
    with torch.no_grad():
        expected = model(*inputs.values())[0]
    attention = sum(isinstance(m, (Attention, JointAttention)) for m in model.modules())
    result = fuse_qkv(model)
    if family == "sd3":
        assert result.rewrites["joint image q|k|v"] == attention
        assert result.rewrites["joint context q|k|v"] == sum(hasattr(m, "add_q_proj") for m in model.modules())
    else:
        assert result.rewrites["self-attention q|k|v"] + result.rewrites["cross-attention k|v"] == attention
        assert result.rewrites["cross-attention k|v"] == attention // 2
    with torch.no_grad():
        fused = model(*inputs.values())[0]
    assert (fused - expected).abs().max() <= 1e-5

    # the unchanged diffusers checkpoint loads into a fused model: no missing, no unexpected keys
    inner = next(model.children())
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(index.root / spec.source):
        state.update(read_safetensors(path))
    with torch.no_grad():
        for param in inner.parameters():
            param.zero_()
    inner.load_state_dict(state, strict=True)
    with torch.no_grad():
        reloaded = model(*inputs.values())[0]
    assert (reloaded - expected).abs().max() <= 1e-5
    with pytest.raises(PassDidNotFire, match="already fused"):
        fuse_qkv(model)


def test_fuse_qkv_without_attention_fails_loudly():
    with pytest.raises(PassDidNotFire, match="no attention modules"):
        fuse_qkv(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_fused_export_has_fewer_matmuls_and_the_same_numbers(tiny_dirs, tmp_path, family):
    spec, _, inputs = _denoiser(tiny_dirs[family])
    plain = export(tiny_dirs[family], "onnx", tmp_path / "plain", components=[spec.name], progress=False)
    fused = export(tiny_dirs[family], "onnx", tmp_path / "fused", components=[spec.name], fuse_qkv=True, progress=False)
    record = _passes(fused, "fuse_qkv", spec.name)
    rewrites = record["rewrites"]
    # self-attention: 3 matmuls -> 1; cross-attention: k, v -> 1; joint: 3 -> 1 per stream
    saved = 2 * rewrites.get("self-attention q|k|v", 0) + rewrites.get("cross-attention k|v", 0)
    saved += 2 * rewrites.get("joint image q|k|v", 0) + 2 * rewrites.get("joint context q|k|v", 0)
    before = _ops(tmp_path / "plain" / spec.name / "model.onnx")["MatMul"]
    after = _ops(tmp_path / "fused" / spec.name / "model.onnx")["MatMul"]
    assert saved > 0 and before - after == saved
    assert record["parity"]["max_abs_vs_unfused"] <= 1e-5
    a = _run(tmp_path / "plain" / spec.name / "model.onnx", inputs)[0]
    b = _run(tmp_path / "fused" / spec.name / "model.onnx", inputs)[0]
    assert np.abs(a - b).max() <= 1e-5
    assert plain.components[spec.name].parity.passed and fused.components[spec.name].parity.passed


# --- static_shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", pytest.param("sdxl", marks=pytest.mark.slow), "sd3"])
def test_static_shapes_fold_the_shape_arithmetic(tiny_dirs, tmp_path, family):
    spec, _, inputs = _denoiser(tiny_dirs[family])
    components = [spec.name, "vae_decoder"]
    export(tiny_dirs[family], "onnx", tmp_path / "dynamic", components=components, progress=False)
    static = export(tiny_dirs[family], "onnx", tmp_path / "static", components=components, static=["1x64x64"])
    for name in components:
        dynamic_ops = _ops(tmp_path / "dynamic" / name / "model.onnx")
        static_ops = _ops(tmp_path / "static" / name / "model.onnx")
        assert dynamic_ops["Shape"] > 0 and static_ops["Shape"] == 0
        assert sum(static_ops.values()) < sum(dynamic_ops.values())
        record = _passes(static, "static_shapes", name)
        assert record["settings"]["nodes_before"] == sum(dynamic_ops.values())
        assert record["settings"]["nodes_after"] == sum(static_ops.values())
        assert static.components[name].parity.passed
    a = _run(tmp_path / "dynamic" / spec.name / "model.onnx", inputs)[0]
    b = _run(tmp_path / "static" / spec.name / "model.onnx", inputs)[0]
    assert np.abs(a - b).max() <= 1e-5


def test_static_shapes_and_fp16_keep_external_weights(tiny_dirs, tmp_path, monkeypatch):
    from difflower.exporters import onnx as onnx_exporter
    from difflower.graph_passes import static_shapes

    monkeypatch.setattr(onnx_exporter, "PROTOBUF_LIMIT", 0)  # every component counts as "over 2 GB"
    monkeypatch.setattr(static_shapes, "PROTOBUF_LIMIT", 0)  # and folds the way > 2 GB models fold
    manifest = export(
        tiny_dirs["sd"], "onnx", tmp_path / "out", components=["unet"], static=["1x64x64"], precision="fp16"
    )
    assert manifest.components["unet"].files == ["unet/config.json", "unet/model.onnx", "unet/model.onnx_data"]
    assert [p["name"] for p in manifest.passes] == ["static_shapes", "fp16"]
    assert "onnxscript" in manifest.passes[0]["settings"]["optimizer"]
    assert manifest.passes[0]["rewrites"]["shape ops folded"] > 0
    assert manifest.components["unet"].parity.passed


# --- fp16 with measured fp32 islands --------------------------------------------------------------


class _Hot(nn.Module):
    """A block whose middle layer writes values past fp16's range, normalised right after."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.inner[1].weight.mul_(1e6)

    def forward(self, x):
        return self.head(self.norm(self.inner(x)))


def test_island_selection_keeps_overflowing_modules_with_the_reason():
    model = _Hot().eval()
    islands = select_islands(model, {"x": torch.randn(2, 8)})
    names = {i.module: i for i in islands}
    # inner.1 writes > 65504 and the norm reads it: both fp32. "inner" writes the same tensor as
    # its kept child (no overflow of its own) and inner.0 / head never see large values.
    assert set(names) == {"inner.1", "norm"}
    assert names["inner.1"].max_abs > FP16_MAX
    assert "activations reach" in names["inner.1"].reason and "65504" in names["inner.1"].reason
    normal = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    assert select_islands(normal, {"x": torch.randn(2, 8)}) == []


def test_island_selection_never_keeps_a_pass_through():
    """An Identity or an eval Dropout between two layers reads and writes the overflowing tensor but
    computes nothing and has no ONNX node: the layers around it are the islands, never it."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.Dropout(0.1), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e6)
    names = {i.module for i in select_islands(model, {"x": torch.randn(2, 8)})}
    assert names == {"0", "3"}


def test_island_scopes_follow_the_exporter_naming():
    assert in_scope("/unet/down_blocks.0/resnets.1/conv1/Conv", "unet.down_blocks.0.resnets.1.conv1")
    assert in_scope("/unet/down_blocks.0/resnets.1/conv1/Conv", "unet.down_blocks.0")
    assert not in_scope("/unet/down_blocks.0/resnets.1/conv1/Conv", "unet.down_blocks.0.resnets.0")
    assert in_scope("/decoder/conv_out/Conv", "vae.decoder.conv_out")  # vae.decode, not vae.forward
    assert not in_scope("/encoder/conv_out/Conv", "vae.decoder.conv_out")
    assert in_scope("/inner/inner.1/inner.1.0/Gemm", "inner.1.0")  # nested Sequential


@pytest.fixture
def hot_vae_checkpoint(tiny_dirs, tmp_path):
    """The tiny SD checkpoint with a VAE decoder whose last conv writes values past fp16's range."""
    from safetensors.torch import save_file

    root = tmp_path / "hot"
    shutil.copytree(tiny_dirs["sd"], root)
    path = weight_files(root / "vae")[0]
    state = read_safetensors(path)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] * 3e6
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] * 3e6
    save_file(state, str(path))
    return root


def test_fp16_export_keeps_the_overflowing_decoder_layer_in_fp32(hot_vae_checkpoint, tmp_path):
    out = tmp_path / "fp16"
    manifest = export(hot_vae_checkpoint, "onnx", out, components=["vae_decoder"], precision="fp16", progress=False)
    record = _passes(manifest, "fp16", "vae_decoder")
    islands = {i["module"]: i for i in record["settings"]["islands"]}
    assert "vae.decoder.conv_out" in islands
    assert "activations reach" in islands["vae.decoder.conv_out"]["reason"]
    assert islands["vae.decoder.conv_out"]["nodes"] >= 1
    assert manifest.precision == "fp16" and manifest.components["vae_decoder"].parity.passed
    graph = onnx.load(str(out / "vae_decoder" / "model.onnx")).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    conv_out = next(n for n in graph.node if n.name.startswith("/decoder/conv_out/") and n.op_type == "Conv")
    assert weights[conv_out.input[1]] == onnx.TensorProto.FLOAT
    assert onnx.TensorProto.FLOAT16 in weights.values()

    # without the island the same graph goes wrong: the measurement is what keeps it right
    plain = tmp_path / "fp32"
    # (fp32's absolute gate is not meant for outputs of 6e6: the source graph is kept regardless)
    export(hot_vae_checkpoint, "onnx", plain, components=["vae_decoder"], allow_mismatch=True, progress=False)
    latents = {"latent_sample": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    reference = _run(plain / "vae_decoder" / "model.onnx", latents)[0]
    convert_fp16(plain / "vae_decoder" / "model.onnx", islands=[])
    unprotected = _run(plain / "vae_decoder" / "model.onnx", latents)[0]
    protected = _run(out / "vae_decoder" / "model.onnx", latents)[0]
    scale = np.abs(reference).max()
    assert scale > FP16_MAX
    assert np.isfinite(protected).all() and np.abs(protected - reference).max() / scale < 1e-2
    assert not np.isfinite(unprotected).all() or np.abs(unprotected - reference).max() / scale > 0.1


def test_fp16_converts_a_graph_with_external_data(tmp_path):
    """A graph whose weights sit in model.onnx_data (as every one past 2 GB does): its shapes are
    inferred from the file, since the converter's own inference serializes the whole model and
    fails past protobuf's 2 GB (a 2.7 GB Flux transformer did); the result runs, in fp16 storage."""
    import onnx

    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)  # fmt: skip
    assert (tmp_path / "model.onnx_data").stat().st_size > 0
    convert_fp16(path, islands=[])
    weights = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert set(weights.values()) == {onnx.TensorProto.FLOAT16}
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(path, {"x": x})[0] - expected).max() < 1e-2


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_fp16_artifact_meets_the_fp16_gates_end_to_end(tiny_dirs, tmp_path, family):
    manifest = export(tiny_dirs[family], "onnx", tmp_path / "fp16", precision="fp16", progress=False)
    assert manifest.precision == "fp16"
    assert all(r.parity.passed for r in manifest.components.values())
    report = validate_artifact(tmp_path / "fp16", tiny_dirs[family], steps=4)
    assert report.passed, report


# --- int8 for ONNX Runtime --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8-weight", "int8"])
def test_int8_artifacts_meet_the_int8_gates(tiny_dirs, tmp_path, mode):
    out = tmp_path / mode
    manifest = export(
        tiny_dirs["sd"], "onnx", out, quantize=mode, calibration_prompts=2, calibration_steps=3, progress=False
    )
    assert manifest.precision == "int8"
    record = _passes(manifest, "onnx_quantize", "unet")
    excluded = record["settings"]["excluded"]
    assert excluded["count"] == len(excluded["nodes"]) > 0
    assert "activation x activation MatMul (attention)" in excluded["why"]
    ops = _ops(out / "unet" / "model.onnx")
    if mode == "int8":
        assert record["rewrites"]["Conv (QDQ)"] > 0 and record["rewrites"]["MatMul (QDQ)"] > 0
        assert record["settings"]["calibration_samples"] > 0
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
        assert "first/last layer or time embedding of the denoiser" in excluded["why"]
    else:
        assert record["rewrites"]["MatMulInteger"] == ops["MatMulInteger"] > 0
    assert not any(p["component"].startswith("vae") for p in manifest.passes)  # the VAE stays fp32
    assert all(r.parity.passed for r in manifest.components.values())
    report = validate_artifact(out, tiny_dirs["sd"], steps=4)
    assert report.passed, report


def test_static_int8_quantizes_the_layers_the_dynamic_graph_does(tiny_dirs, tmp_path):
    """A static graph's projections are Gemms (onnxslim folds MatMul + Add), a dynamic graph's are
    MatMuls: static QDQ must quantize the same layers either way, none left in float unrecorded."""
    counts = {}
    for name, static in (("dynamic", []), ("static", ["1x64x64"])):
        manifest = export(tiny_dirs["sd"], "onnx", tmp_path / name, components=["unet"], static=static,
                          quantize="int8", calibration_prompts=2, calibration_steps=3, progress=False)  # fmt: skip
        counts[name] = _passes(manifest, "onnx_quantize", "unet")["rewrites"]
        assert manifest.components["unet"].parity.passed, name
    assert counts["static"].get("Gemm (QDQ)", 0) > 0
    linear = {name: c.get("MatMul (QDQ)", 0) + c.get("Gemm (QDQ)", 0) for name, c in counts.items()}
    assert linear["static"] == linear["dynamic"] > 0
    assert counts["static"]["Conv (QDQ)"] == counts["dynamic"]["Conv (QDQ)"]
    assert counts["static"]["kept in float"] == counts["dynamic"]["kept in float"]


def test_int8_calibration_gives_onnxruntimes_own_ranges(tiny_dirs, tmp_path):
    """The priority-ordered calibration session (a 24 GiB machine fits the real-size UNet with it)
    measures what onnxruntime's quantize_static would have measured itself."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, load_tensors_data

    from difflower.graph_passes.onnx_quantize import _calibrate, _Reader

    export(tiny_dirs["sd"], "onnx", tmp_path / "fp32", components=["unet"], progress=False)
    model = tmp_path / "fp32" / "unet" / "model.onnx"
    names = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
    generator = torch.Generator().manual_seed(0)
    shapes = {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    dataset = [{n: torch.randn(shapes[n], generator=generator).numpy() for n in names} for _ in range(3)]
    _calibrate(model, ("Conv", "MatMul"), dataset, tmp_path / "ranges.json", external=False)
    ours = load_tensors_data(tmp_path / "ranges.json")
    theirs = create_calibrator(model, ["Conv", "MatMul"], str(tmp_path / "aug.onnx"), CalibrationMethod.MinMax)
    theirs.collect_data(_Reader(dataset))
    theirs = theirs.compute_data()
    assert len(ours.data) == len(theirs.data) > 100
    for name, expected in theirs.data.items():
        np.testing.assert_array_equal(ours.data[name].range_value, expected.range_value, err_msg=name)


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"precision": "bf16"}, "--precision"),
        ({"quantize": "int4-weight"}, "--quantize"),
        ({"quantize": "int8", "precision": "fp16"}, "--quantize"),
        ({"palettize": 4}, "--palettize"),
    ],
)
def test_onnx_refuses_what_it_cannot_build(tiny_dirs, tmp_path, options, flag):
    with pytest.raises(ArgumentError, match=flag):
        export(tiny_dirs["sd"], "onnx", tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()
