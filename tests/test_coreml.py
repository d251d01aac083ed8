"""Core ML backend on the tiny checkpoints: conversion, saved packages reloaded as specs,
attention variants against the reference in torch, palettization and int8 weights, and the
clear error for prediction off macOS. Prediction parity needs macOS and skips elsewhere."""

from __future__ import annotations

import platform

import pytest
import torch

ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed")

from difflower.cli import main  # noqa: E402
from difflower.errors import ArgumentError  # noqa: E402
from difflower.exporters import export  # noqa: E402
from difflower.exporters.coreml import FILE, coreml_name, lut_sizes  # noqa: E402
from difflower.exporters.specs import ShapePlan, component_specs, example_inputs, load_export_module  # noqa: E402
from difflower.manifest import Bucket, Manifest  # noqa: E402
from difflower.reference.attention import set_attention_backend  # noqa: E402
from difflower.reference.loading import read_model_index  # noqa: E402

MACOS = platform.system() == "Darwin"
ARRAY_TYPES = {"float32": "FLOAT32", "int64": "INT32"}  # Core ML has no int64 inputs: ids go in as int32


@pytest.fixture(scope="module")
def coreml_dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    return {family: root / family for family in ("sd", "sdxl", "sd3")}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_tiny_checkpoints_convert_and_reload_as_specs(tiny_dirs, coreml_dirs, family):
    out = coreml_dirs[family]
    manifest = export(tiny_dirs[family], "coreml", out, progress=False)
    assert manifest.precision == "fp16" and manifest.shapes["graph"] == "static"
    names = {s.name for s in component_specs(read_model_index(tiny_dirs[family]))}
    assert set(manifest.components) == names
    for record in manifest.components.values():
        spec = ct.utils.load_spec(str(out / record.name / FILE))
        inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
        outputs = {o.name for o in spec.description.output}
        assert list(inputs) == [t.name for t in record.inputs]
        assert outputs == {coreml_name(t.name) for t in record.outputs}  # hidden_states.1 -> hidden_states_1
        for tensor in record.inputs:
            array = inputs[tensor.name]
            assert list(array.shape) == list(tensor.shape)
            assert (
                ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
                == ARRAY_TYPES[tensor.dtype]
            )
        assert record.config["compute_precision"] == "fp16"
        assert record.config["minimum_deployment_target"] == "macOS14 / iOS17"
        assert record.config["torch_parity_max_abs"] <= 1e-5  # the traced module vs the reference
        assert sum(record.config["ops"].values()) > 10
        if not MACOS:
            assert record.parity["passed"] is None and "macOS" in record.parity["summary"]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("variant", ["split-einsum", "split-einsum-v2"])
def test_split_einsum_variants_match_the_reference_in_torch(tiny_dirs, family, variant):
    index = read_model_index(tiny_dirs[family])
    spec = next(s for s in component_specs(index) if s.kind in ("unet", "transformer"))
    model = load_export_module(spec, index.root)
    inputs = example_inputs(spec, ShapePlan((Bucket(1, 64, 64),)).dims(Bucket(1, 64, 64), 8))
    with torch.no_grad():
        expected = model(*inputs.values())[0]
        assert set_attention_backend(model, variant) > 0
        got = model(*inputs.values())[0]
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize(("mode", "values"), [("palettize-4", 16), ("int8-weight", 256)])
def test_compressed_weights_take_at_most_the_requested_values(tiny_dirs, tmp_path, mode, values):
    out = tmp_path / mode
    manifest = export(tiny_dirs["sd"], "coreml", out, components=["unet"], quantize=mode, progress=False)
    result = next(p for p in manifest.passes if p["name"] == "coreml_compression")
    assert result["settings"]["max_distinct_values_per_weight"] <= values
    assert sum(result["rewrites"].values()) > 10
    if mode.startswith("palettize"):
        sizes = lut_sizes(out / "unet" / FILE)
        assert sizes and set(sizes) == {values}


def test_split_einsum_export_records_the_pass(tiny_dirs, tmp_path):
    manifest = export(tiny_dirs["sd"], "coreml", tmp_path / "out", components=["unet"], attention="split-einsum-v2")
    result = next(p for p in manifest.passes if p["name"] == "attention")
    assert result["settings"]["variant"] == "split-einsum-v2" and result["rewrites"]["attention modules"] > 0
    assert manifest.components["unet"].config["torch_parity_max_abs"] <= 1e-5


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"precision": "bf16"}, "--precision"), ({"quantize": "palettize-3"}, "--quantize"),
     ({"attention": "onnxruntime"}, "--attention")],
)  # fmt: skip
def test_coreml_argument_errors_name_the_flag(tiny_dirs, tmp_path, options, flag):
    with pytest.raises(ArgumentError, match=flag):
        export(tiny_dirs["sd"], "coreml", tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(MACOS, reason="on macOS the artifact runs")
def test_prediction_off_macos_is_a_clear_error_and_info_lists_ops(tiny_dirs, coreml_dirs, capsys):
    from difflower.runtimes.pipeline import load_artifact

    out = coreml_dirs["sd"]
    if not (out / "difflower.json").exists():
        export(tiny_dirs["sd"], "coreml", out, progress=False)
    with pytest.raises(ArgumentError, match="Core ML prediction needs macOS"):
        load_artifact(out)
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity not measured" in printed and "ops: " in printed and "conv x" in printed


@pytest.mark.skipif(not MACOS, reason="Core ML prediction needs macOS")
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_macos_prediction_meets_the_fp16_gates(tiny_dirs, tmp_path, family):
    from difflower.validate.parity import validate_artifact

    manifest = export(tiny_dirs[family], "coreml", tmp_path / family, progress=False)
    assert all(r.parity["passed"] for r in manifest.components.values())
    report = validate_artifact(tmp_path / family, tiny_dirs[family], steps=4)
    assert report.passed, report
    assert Manifest.read(tmp_path / family).precision == "fp16"
