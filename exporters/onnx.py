"""ONNX: every component to `<component>/model.onnx`, run by ONNX Runtime.

Export uses torch's TorchScript-based exporter (`dynamo=False`): on these models it matches
eager to ~1e-6 and is ~25x faster than the dynamo exporter (DESIGN.md's measurements). A
component whose weights pass the 2 GB protobuf limit gets its tensors in one
`model.onnx_data` beside `model.onnx`, streamed one tensor at a time.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import torch

from difflower.artifact.formats import ONNX_FILE, consolidate_external_data
from difflower.artifact.specs import ComponentSpec
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.graph_passes.calibration import CALIBRATED, QUANTIZED_DENOISERS, denoiser_calibration
from difflower.graph_passes.fp16 import convert_fp16, select_islands
from difflower.graph_passes.onnx_quantize import ONNX_QUANTIZE_MODES, quantize_applies, quantize_onnx
from difflower.graph_passes.static_shapes import static_shapes
from difflower.reference.loading import ModelIndex

ONNX_OPSET = 17
# protobuf cannot serialize a message above 2 GiB: bigger models keep their weights outside.
PROTOBUF_LIMIT = 2**31 - 1

__all__ = ["OnnxExporter"]


def dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    """Every symbolic dim of the spec's inputs and outputs, by tensor and axis."""
    return {
        t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
        for t in (*spec.inputs, *spec.outputs)
    }


def torch_export(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    spec: ComponentSpec,
    path: Path,
    dynamic: dict | None,
    external: bool,
    contrib: bool = False,
) -> None:
    """torch.onnx.export of a wrapper module with the spec's tensor names."""
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings about Python values
        # taken from shapes (expected: shapes are config- or input-derived, never tensor values).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
            external_data=external,
            custom_opsets={"com.microsoft": 1} if contrib else None,
        )


class OnnxExporter:
    """BackendExporter for ONNX graphs checked in ONNX Runtime on the CPU."""

    name = "onnx"

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.precision not in ("fp32", "fp16"):
            raise ArgumentError("--precision", f"onnx builds fp32 or fp16 graphs, not {options.precision!r}")
        options.refuse_unknown("onnx", CALIBRATED)
        quantize = options.refuse_quantize_mode("onnx", ONNX_QUANTIZE_MODES)
        if quantize is not None and options.precision != "fp32":
            raise ArgumentError("--quantize", "quantizes an fp32 graph: drop --precision fp16")
        if quantize is not None and options.attention == "onnxruntime":
            raise ArgumentError("--quantize", "the quantizer does not know ORT's fused attention: use --attention sdpa")

    def export_component(
        self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], spec: ComponentSpec, folder: Path, options
    ) -> ComponentExport:
        """Export with symbolic dims, then the graph passes: static shapes, fp16, quantization."""
        path = folder / ONNX_FILE
        large = sum(p.numel() * p.element_size() for p in module.parameters()) > PROTOBUF_LIMIT
        torch_export(
            module, inputs, spec, path, dynamic_axes(spec), external=large, contrib=options.attention == "onnxruntime"
        )
        if large:
            consolidate_external_data(path)
        passes = []
        if options.plan.static:
            passes.append(static_shapes(path, {name: list(t.shape) for name, t in inputs.items()}))
        if options.precision == "fp16":
            islands = select_islands(module, inputs)
            passes.append(convert_fp16(path, islands))
        quantize = options.extra.get("quantize")
        if quantize is not None and quantize_applies(quantize, spec.kind):
            dataset = None
            if quantize == "int8" and spec.kind in QUANTIZED_DENOISERS:
                dataset = denoiser_calibration(options, spec)
            # The reference's weights are not needed past this point; free them before the
            # quantizer and its calibration session load their own copies (SD1.5: 3.4 GB each).
            module.to("meta")
            gc.collect()
            passes.append(quantize_onnx(path, spec.kind, quantize, dataset))
        return ComponentExport(passes=passes, notes={"external_data": large})

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


EXPORTER = OnnxExporter
