"""Artifact-level pass: int8 ONNX graphs for ONNX Runtime (`--quantize int8-weight|int8`).

- `int8-weight`: dynamic quantization (onnxruntime.quantization.quantize_dynamic): int8
  per-channel weights of every MatMul with a weight, activations quantized at run time.
  Applies to the denoiser and the text encoders.
- `int8`: static QDQ quantization of the denoiser (quantize_static, MinMax, per-channel int8
  weights, uint8 activations) on Conv, MatMul and Gemm (a static graph's projections are Gemms,
  onnxslim folds MatMul + Add: static and dynamic graphs get the same layers quantized),
  calibrated on denoiser inputs recorded while the eager reference pipeline runs the
  repository's prompt set; the text encoders get int8 weights as above; the VAE stays fp32.
  The ranges are measured by onnxruntime's own MinMax calibrator in a session that runs nodes
  in priority order (`_calibrate`: the real-size SD1.5 UNet calibrates in 5 GiB instead of
  18), then quantize_static reads them from its cache.

Weights are quantized to 7 bits of their int8 range (`reduce_range`): on x86 CPUs without VNNI
(AVX2-only, and AVX-512 without VNNI) ONNX Runtime multiplies u8 activations by s8 weights with
`vpmaddubsw`, which adds two products into a saturating 16-bit sum; two 255 x 127 products
overflow it and the layer silently computes something else. 7-bit weights keep every pair in
range, so an artifact quantized on one machine meets its gates on any x86-64 CPU.

Layers left in float, and why, are recorded in the PassResult:
- MatMuls between two activations (attention scores and the values they weight): both sides
  vary per call and per token; int8 on both loses most of the softmax's resolution;
- the first and last layers of the denoiser (`conv_in`, `conv_out`, `proj_out` of the
  transformer) and its time/condition embedding, with each resnet's projection of it
  (`time_emb_proj`): small, and every error there reaches every later layer or the output
  directly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from difflower.artifact.formats import ONNX_DATA, consolidate_external_data
from difflower.graph_passes.base import PassDidNotFire, PassResult, quieter
from difflower.graph_passes.calibration import DENOISERS, QUANTIZED_DENOISERS

ONNX_QUANTIZE_MODES = ("int8-weight", "int8")
# Denoiser scopes kept in float (see the module docstring), by node-name fragment.
SENSITIVE_SCOPES = ("/conv_in/", "/conv_out/", "/proj_out/",
                    "/time_embedding/", "/time_emb_proj/", "/add_embedding/", "/time_text_embed/")  # fmt: skip


def quantize_applies(mode: str, kind: str) -> bool:
    """Which components a mode touches: the denoiser and text encoders (never the VAE)."""
    return kind in QUANTIZED_DENOISERS or kind == "text_encoder"


def _excluded(model, kind: str, op_types: tuple[str, ...]) -> dict[str, str]:
    """Nodes of `op_types` kept in float, with the reason for each."""
    weights = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    excluded: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        if node.op_type == "MatMul" and not any(i in weights or i in constants for i in node.input):
            excluded[node.name] = "activation x activation MatMul (attention)"
        elif kind in DENOISERS and any(scope in node.name for scope in SENSITIVE_SCOPES):
            excluded[node.name] = "first/last layer or time embedding of the denoiser"
    return excluded


def _quantized_counts(path: Path, op_types: tuple[str, ...]) -> dict[str, int]:
    """What the quantized graph computes in int8: integer ops, and QDQ-wrapped ops by type."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    counts = Counter(n.op_type for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger"))
    for node in model.graph.node:
        if node.op_type in op_types and len(node.input) > 1 and producer.get(node.input[1]) == "DequantizeLinear":
            counts[f"{node.op_type} (QDQ)"] += 1
    return dict(counts)


def _calibrate(
    path: Path, op_types: tuple[str, ...], dataset: list[dict[str, np.ndarray]], cache: Path, external: bool
):
    """onnxruntime's MinMax ranges of the tensors around `op_types`, written to `cache` (the
    calibration cache quantize_static reads instead of calibrating itself).

    quantize_static's own calibration session runs the augmented graph (every tensor also
    feeding a ReduceMin/ReduceMax output) in ONNX Runtime's default node order, which keeps most
    activations alive at once: 18 GiB for one real-size SD1.5 UNet call, against 5 GiB for the
    graph itself, and OOM on a 24 GiB machine. The same calibrator with a priority-based node
    order peaks at 5.3 GiB and gives the same ranges (a range does not depend on node order).
    """
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, save_tensors_data

    class Calibrater(MinMaxCalibrater):
        def create_inference_session(self):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            self.infer_session = ort.InferenceSession(
                self.augmented_model_path, sess_options=options, providers=self.execution_providers
            )

    augmented = cache.with_name("augmented.onnx")
    calibrater = Calibrater(path, list(op_types), str(augmented), use_external_data_format=external)
    calibrater.augment_graph()
    calibrater.model = None  # the augmented copy is on disk; the session reads it from there
    calibrater.create_inference_session()
    calibrater.collect_data(_Reader(dataset))
    save_tensors_data(calibrater.compute_data(), cache)


class _Reader:
    """onnxruntime's CalibrationDataReader over recorded denoiser inputs."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._samples = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._samples, None)


def quantize_onnx(path: Path, kind: str, mode: str, dataset: list[dict[str, np.ndarray]] | None = None) -> PassResult:
    """Quantize the ONNX model at `path` in place; returns what was quantized and what was not."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    external = (path.parent / ONNX_DATA).exists()
    static = mode == "int8" and kind in QUANTIZED_DENOISERS
    op_types = ("Conv", "MatMul", "Gemm") if static else ("MatMul",)
    model = onnx.load(str(path), load_external_data=False)
    excluded = _excluded(model, kind, op_types)
    del model
    if static and not dataset:
        raise PassDidNotFire(f"onnx int8: no calibration samples for the {kind}")
    staging = path.parent / ".quantize"
    staging.mkdir()
    target = staging / path.name
    settings: dict[str, Any] = {"mode": mode, "op_types": list(op_types), "library": "onnxruntime.quantization"}
    # onnxruntime's quantizer logs every node at INFO on the root logger, and a WARNING suggesting its
    # pre-processing (shape inference and graph optimisation; with --static, static_shapes did both)
    with quieter(logging.getLogger(), logging.ERROR):
        if static:
            with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=path.parent) as scratch:
                cache = Path(scratch) / "ranges.json"
                _calibrate(path, op_types, dataset, cache, external)
                quantize_static(
                    path,
                    target,
                    None,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types),
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(excluded),
                    use_external_data_format=external,
                    reduce_range=True,  # see the module docstring: no 16-bit saturation on AVX2
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                    calibration_cache_path=cache,
                )
            settings.update(
                format="QDQ",
                weights="int8 symmetric per channel, 7-bit range (reduce_range)",
                activations="uint8 asymmetric per tensor, MinMax",
                calibration_samples=len(dataset),
            )
        else:
            quantize_dynamic(
                path,
                target,
                op_types_to_quantize=list(op_types),
                per_channel=True,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(excluded),
                use_external_data_format=external,
                reduce_range=True,  # see the module docstring: no 16-bit saturation on AVX2
            )
            settings.update(format="dynamic (MatMulInteger)", weights="int8 per channel, 7-bit range (reduce_range)")
    if external:  # onnxruntime names its own data file: gather it into model.onnx_data
        consolidate_external_data(target)
    for produced in staging.iterdir():
        produced.replace(path.parent / produced.name)
    shutil.rmtree(staging)
    counts = _quantized_counts(path, op_types)
    if not counts:
        raise PassDidNotFire(f"onnx {mode}: nothing in the {kind} was quantized; export without --quantize")
    reasons = Counter(excluded.values())
    settings["excluded"] = {"count": len(excluded), "why": dict(reasons), "nodes": sorted(excluded)}
    return PassResult("onnx_quantize", {**counts, "kept in float": len(excluded)}, settings)
