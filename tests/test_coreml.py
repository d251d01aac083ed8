"""Core ML backend on the tiny checkpoints: conversion, saved packages reloaded as specs,
attention variants and the Neural Engine layout against the reference in torch, the chunked
UNet, palettization and int8 weights, and the clear error for prediction off macOS. Prediction
parity needs macOS and skips elsewhere."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed")

from difflower.artifact.formats import COREML_FILE as FILE  # noqa: E402
from difflower.artifact.formats import coreml_name  # noqa: E402
from difflower.artifact.manifest import Bucket, Manifest  # noqa: E402
from difflower.artifact.specs import ShapePlan, component_specs, example_inputs, load_export_module  # noqa: E402
from difflower.cli import main  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.errors import ArgumentError  # noqa: E402
from difflower.exporters.coreml import lut_sizes  # noqa: E402
from difflower.graph_passes.ane_layout import apply_ane_layout  # noqa: E402
from difflower.graph_passes.base import PassDidNotFire  # noqa: E402
from difflower.reference.attention import set_attention_backend  # noqa: E402
from difflower.reference.loading import read_model_index  # noqa: E402

MACOS = platform.system() == "Darwin"
ARRAY_TYPES = {"float32": "FLOAT32", "int64": "INT32"}  # Core ML has no int64 inputs: ids go in as int32


@pytest.fixture(scope="module")
def coreml_dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    return {family: root / family for family in ("sd", "sdxl", "sd3")}


@pytest.mark.parametrize(
    "family", ["sd", pytest.param("sdxl", marks=pytest.mark.slow), pytest.param("sd3", marks=pytest.mark.slow)]
)
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
            assert record.parity.passed is None and "macOS" in record.parity.summary


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


@pytest.mark.parametrize(
    ("mode", "values"), [("palettize-4", 16), pytest.param("int8-weight", 256, marks=pytest.mark.slow)]
)
def test_compressed_weights_take_at_most_the_requested_values(tiny_dirs, tmp_path, mode, values):
    out = tmp_path / mode
    manifest = export(tiny_dirs["sd"], "coreml", out, components=["unet"], quantize=mode, progress=False)
    result = next(p for p in manifest.passes if p["name"] == "coreml_compression")
    assert result["settings"]["max_distinct_values_per_weight"] <= values
    assert sum(result["rewrites"].values()) > 10
    if mode.startswith("palettize"):
        sizes = lut_sizes(out / "unet" / FILE)
        assert sizes and set(sizes) == {values}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("variant", ["sdpa", "split-einsum-v2"])
def test_ane_layout_loads_the_same_weights_and_matches_the_reference(tiny_dirs, family, variant):
    index = read_model_index(tiny_dirs[family])
    spec = next(s for s in component_specs(index) if s.kind == "unet")
    model = load_export_module(spec, index.root)
    inputs = example_inputs(spec, ShapePlan((Bucket(1, 64, 64),)).dims(Bucket(1, 64, 64), 8))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*inputs.values())[0]
        set_attention_backend(model, variant)
        result = apply_ane_layout(model)
        got = model(*inputs.values())[0]
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # the checkpoint loads unchanged
    blocks = sum(len(m.transformer_blocks) for m in model.modules() if hasattr(m, "transformer_blocks"))
    assert result.rewrites["transformer blocks"] == blocks > 0
    assert result.rewrites["linears as 1x1 convolutions"] >= 10 * blocks  # q k v out x2, GEGLU, FF out
    assert (got - expected).abs().max() <= 1e-4


def test_ane_layout_needs_spatial_transformers(tiny_dirs):
    index = read_model_index(tiny_dirs["sd3"])
    spec = next(s for s in component_specs(index) if s.kind == "transformer")
    with pytest.raises(PassDidNotFire, match="no spatial transformer"):
        apply_ane_layout(load_export_module(spec, index.root))


def test_split_einsum_export_lays_the_unet_out_for_the_neural_engine(tiny_dirs, coreml_dirs, tmp_path):
    manifest = export(tiny_dirs["sd"], "coreml", tmp_path / "out", components=["unet"], attention="split-einsum-v2")
    passes = {p["name"]: p for p in manifest.passes}
    assert passes["attention"]["settings"]["variant"] == "split-einsum-v2"
    assert passes["attention"]["parity"]["max_abs_vs_reference"] <= 1e-4
    layout = passes["ane_layout"]
    assert layout["parity"]["max_abs_vs_reference"] <= 1e-4
    assert manifest.components["unet"].config["torch_parity_max_abs"] <= 1e-5
    # every Linear of the transformer blocks became a 1x1 conv in the ML program
    if not (coreml_dirs["sd"] / "difflower.json").exists():
        export(tiny_dirs["sd"], "coreml", coreml_dirs["sd"], progress=False)
    tokens = Manifest.read(coreml_dirs["sd"]).components["unet"].config["ops"]
    channels = manifest.components["unet"].config["ops"]
    moved = layout["rewrites"]["linears as 1x1 convolutions"]
    assert tokens["linear"] - channels["linear"] == moved
    assert channels["conv"] - tokens["conv"] == moved
    assert channels["einsum"] > 0 and "einsum" not in tokens


@pytest.mark.slow
def test_chunked_unet_is_two_packages_that_chain_to_the_whole(tiny_dirs, tmp_path, capsys):
    from difflower.graph_passes.chunk_unet import split_unet
    from difflower.runtimes.coreml_engine import ChunkedModel

    out = tmp_path / "chunked"
    manifest = export(tiny_dirs["sdxl"], "coreml", out, chunk_unet=True, progress=False)
    assert not any("chunks" in r.config for r in manifest.components.values() if r.name != "unet")
    record = manifest.components["unet"]
    chunks = record.config["chunks"]
    assert [c["name"] for c in chunks] == ["chunk1", "chunk2"]
    assert chunks[0]["inputs"] == [t.name for t in record.inputs] and chunks[1]["outputs"] == ["out_sample"]
    assert chunks[1]["stages"][-1] == "conv_out" and chunks[0]["stages"][0] == "conv_in"
    for chunk in chunks:
        package = ct.utils.load_spec(str(out / "unet" / chunk["file"]))
        assert [i.name for i in package.description.input] == chunk["inputs"]
        assert [o.name for o in package.description.output] == chunk["outputs"]
    result = next(p for p in manifest.passes if p["name"] == "chunk_unet")
    assert result["parity"]["max_abs_chained_vs_whole"] <= 1e-5
    assert result["rewrites"]["skip connections handed over"] == len(chunks[0]["outputs"]) - 2
    assert main(["info", str(out)]) == 0
    assert "chunk2: up_blocks.0..conv_out" in capsys.readouterr().out

    # the engine's chaining, with the torch halves standing in for the packages (prediction needs macOS)
    index = read_model_index(tiny_dirs["sdxl"])
    spec = next(s for s in component_specs(index) if s.kind == "unet")
    module = load_export_module(spec, index.root)
    inputs = example_inputs(spec, ShapePlan((Bucket(1, 64, 64),)).dims(Bucket(1, 64, 64), 8))
    with torch.no_grad():
        expected = module(*inputs.values())
        halves, _ = split_unet(module, inputs, expected, bytes_per_weight=2)

        def predictor(half):
            def predict(feeds):
                return dict(zip(half.outputs, half.module(*map(torch.as_tensor, feeds.values())), strict=True))

            return predict

        chained = ChunkedModel([(list(h.inputs), predictor(h)) for h in halves])
        got = chained.predict({k: v.numpy() for k, v in inputs.items()})["out_sample"]
    assert (got - expected[0]).abs().max() <= 1e-5


def test_real_size_sd15_unet_halves_are_under_1_gib_in_fp16():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_configs import real_spec

    from difflower.graph_passes.chunk_unet import PACKAGE_LIMIT, balanced_split
    from difflower.reference.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = UNet2DConditionModel(real_spec("sd15").unet)
    stop, first, second = balanced_split(unet, bytes_per_weight=2)
    assert first + second == 2 * sum(p.numel() for p in unet.parameters())
    assert max(first, second) < PACKAGE_LIMIT < first + second
    assert unet.stages()[stop - 1] == "mid_block"


@pytest.mark.parametrize(("family", "components"), [("sd3", None), ("sd", ["vae_decoder"])])
def test_chunk_unet_needs_a_unet_to_split(tiny_dirs, tmp_path, family, components):
    with pytest.raises(ArgumentError, match="--chunk-unet"):
        export(tiny_dirs[family], "coreml", tmp_path / "out", components=components, chunk_unet=True, progress=False)
    assert not (tmp_path / "out").exists()


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
    assert all(r.parity.passed for r in manifest.components.values())
    report = validate_artifact(tmp_path / family, tiny_dirs[family], steps=4)
    assert report.passed, report
    assert Manifest.read(tmp_path / family).precision == "fp16"


@pytest.mark.parametrize(
    "family,graphs,parts",
    [("sd", "deepcache", ["unet", "unet_shallow"]), ("sd3", "first-block", ["transformer_first", "transformer_tail"])],
)
def test_cache_graphs_convert_with_their_extra_inputs_and_outputs(tiny_dirs, tmp_path, family, graphs, parts):
    """--cache-graphs on Core ML: the step cache's graphs convert, their traced modules equal the
    reference, and the packages declare the cache tensors (prediction itself needs macOS)."""
    manifest = export(tiny_dirs[family], "coreml", tmp_path / "art", cache_graphs=graphs, components=parts,
                      progress=False)  # fmt: skip
    for name in parts:
        record = manifest.components[name]
        spec = ct.utils.load_spec(str(tmp_path / "art" / name / FILE))
        assert [i.name for i in spec.description.input] == [t.name for t in record.inputs]
        assert {o.name for o in spec.description.output} == {coreml_name(t.name) for t in record.outputs}
        assert record.config["torch_parity_max_abs"] <= 1e-5
    cache_tensors = {"deepcache_feature", "first_block_hidden", "first_block_residual"}
    declared = {t.name for n in parts for t in (*manifest.components[n].inputs, *manifest.components[n].outputs)}
    assert declared & cache_tensors


def test_flux_converts_with_its_cache_graphs(tmp_path):
    """A tiny FLUX.1-dev, every component and the first-block cache's graphs, at a static 64x64:
    each package declares the graph's tensors and its traced module equals the reference (prediction
    itself needs macOS)."""
    from difflower.reference.tiny import make_tiny_checkpoint

    flux = make_tiny_checkpoint(tmp_path / "flux", "flux", seed=0)
    manifest = export(flux, "coreml", tmp_path / "art", cache_graphs="first-block", static=["1x64x64"], progress=False)
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "transformer", "transformer_first",
                                        "transformer_tail", "vae_encoder", "vae_decoder"}  # fmt: skip
    for name, record in manifest.components.items():
        spec = ct.utils.load_spec(str(tmp_path / "art" / name / FILE))
        assert [i.name for i in spec.description.input] == [t.name for t in record.inputs], name
        assert {o.name for o in spec.description.output} == {coreml_name(t.name) for t in record.outputs}, name
        assert record.config["torch_parity_max_abs"] <= 1e-5, name
    transformer = manifest.components["transformer"]
    assert [t.name for t in transformer.inputs][-3:] == ["img_ids", "txt_ids", "guidance"]
    assert transformer.inputs[0].shape == (1, 16, 64)  # 64x64: an 8x8 latent of 16 channels in 2x2 patches
