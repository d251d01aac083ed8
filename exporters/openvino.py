"""OpenVINO: every component converted from the reference module to IR, `<component>/openvino_model.xml/.bin`.

The layout optimum-intel reads. `openvino.convert_model` traces the same wrapper modules the
other backends export (example inputs from the specs), with symbolic dims left dynamic or,
with one `--static` bucket, reshaped to it at export. `--precision fp16` stores weights in
fp16 (OpenVINO computes in its inference precision, recorded per engine). Compression with
nncf (`--quantize`) is opt-in: see difflower.graph_passes.openvino_compression.

Parity is checked with the CPU plugin forced to f32 inference, so the check measures the
conversion (and the compression asked for), not a bf16 default of the machine's CPU.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from difflower.artifact.formats import ONNX_FILE
from difflower.artifact.formats import OPENVINO_FILE as XML
from difflower.artifact.specs import ComponentSpec
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.exporters.onnx import streamed_export
from difflower.graph_passes.calibration import CALIBRATED, QUANTIZED_DENOISERS, denoiser_calibration
from difflower.graph_passes.openvino_compression import QUANTIZE_MODES, compress_component, compression_applies
from difflower.reference.loading import ModelIndex
from difflower.reference.streaming import Skeleton

PRECISIONS = ("fp32", "fp16")


def _ov_type(dtype: str):
    import openvino as ov

    return {"int64": ov.Type.i64, "int32": ov.Type.i32, "float32": ov.Type.f32, "float16": ov.Type.f16}[dtype]


def convert(module: torch.nn.Module, inputs: dict[str, torch.Tensor], spec: ComponentSpec, static: bool):
    """openvino.convert_model of a wrapper module: named inputs (symbolic dims dynamic unless static),
    named outputs, as the spec says."""
    import openvino as ov

    declared = []
    for tensor in spec.inputs:
        if static:
            shape = ov.PartialShape(list(inputs[tensor.name].shape))
        else:
            shape = ov.PartialShape([d if isinstance(d, int) else -1 for d in tensor.shape])
        declared.append((shape, _ov_type(tensor.dtype)))  # by position: varargs (residuals) have no names
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python values taken from shapes (expected: shapes are config- or
        # input-derived, never tensor values).
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=tuple(inputs.values()), input=declared)
    for port, tensor in zip(model.inputs, spec.inputs, strict=True):
        port.get_tensor().set_names({tensor.name})
    for port, tensor in zip(model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({tensor.name})
    return model


def write_openvino_tokenizer(folder: Path) -> str:
    """The tokenizer in `folder` also as OpenVINO models (openvino_tokenizer.xml/.bin and
    openvino_detokenizer.xml/.bin), as optimum-intel lays a pipeline out and OpenVINO GenAI reads
    it; returns what was written, or why not (the openvino-tokenizers package is optional)."""
    import openvino as ov

    try:
        import openvino_tokenizers
    except ImportError:
        return "not written: pip install openvino-tokenizers (the openvino extra brings it)"
    if not folder.is_dir():
        return f"not written: {folder.name} not found"
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder, decoder = openvino_tokenizers.convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, str(folder / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(folder / "openvino_detokenizer.xml"))
    return f"{folder.name}/openvino_tokenizer.xml"


class OpenVINOExporter:
    """BackendExporter for OpenVINO IR, checked on the CPU plugin at f32."""

    name = "openvino"

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.precision not in PRECISIONS:
            raise ArgumentError("--precision", f"openvino stores weights as {' or '.join(PRECISIONS)}")
        if options.attention == "onnxruntime":
            raise ArgumentError("--attention", "onnxruntime's fused attention is an ONNX Runtime operator")
        options.refuse_unknown("openvino", CALIBRATED)
        quantize = options.refuse_quantize_mode("openvino", QUANTIZE_MODES)
        if quantize == "int8" and not any(c in ("unet", "transformer") for c in options.components or ("unet",)):
            raise ArgumentError("--quantize", "int8 (hybrid) quantizes the denoiser: include it in --components")
        if quantize == "int8" and options.stream_weights:  # its calibration runs the whole fp32 model
            raise ArgumentError(
                "--stream-weights", "is not combined with --quantize int8; use int8-weight or int4-weight"
            )

    def export_component(
        self,
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        spec: ComponentSpec,
        folder: Path,
        options: ExportOptions,
    ) -> ComponentExport:
        import openvino as ov

        model = convert(module, inputs, spec, static=options.plan.static)
        quantize = options.extra.get("quantize")
        passes = []
        if quantize is not None and compression_applies(quantize, spec.kind):
            dataset = None
            if quantize == "int8" and spec.kind in QUANTIZED_DENOISERS:
                dataset = denoiser_calibration(options, spec)
            model, result = compress_component(model, spec.kind, quantize, dataset)
            passes.append(result)
        ov.save_model(model, str(folder / XML), compress_to_fp16=options.precision == "fp16")
        notes: dict[str, Any] = {"quantize": quantize} if quantize else {}
        if spec.kind == "text_encoder":
            tokenizer = "tokenizer" + spec.name.removeprefix("text_encoder")  # text_encoder_2 -> tokenizer_2
            notes["openvino_tokenizer"] = write_openvino_tokenizer(folder.parent / tokenizer)
        return ComponentExport(passes=passes, notes=notes)

    def export_streamed(
        self, sk: Skeleton, inputs: dict[str, torch.Tensor], spec: ComponentSpec, folder: Path, options: ExportOptions
    ) -> ComponentExport:
        """`--stream-weights`: the streamed ONNX graph (weights in fp16 behind casts when the IR
        stores fp16 or compresses them, else fp32) read by OpenVINO, which maps its weights file
        rather than loading it, then compressed and saved as IR; the ONNX files are removed
        (the model is released first: it maps them)."""
        import openvino as ov

        quantize = options.extra.get("quantize")
        staging = folder / ".streamed-onnx"
        staging.mkdir()
        fp16 = options.precision == "fp16" or quantize is not None
        passes = [streamed_export(sk, inputs, spec, staging / ONNX_FILE, options.plan.static, fp16_storage=fp16)]
        # read_model maps the external weights and keeps the fp16 ones behind their Converts;
        # convert_model would fold those into fp32 constants in memory (2.7 GB for 1.4 GB of fp16)
        model = ov.Core().read_model(str(staging / ONNX_FILE))
        if quantize is not None and compression_applies(quantize, spec.kind):
            model, result = compress_component(model, spec.kind, quantize, None)
            passes.append(result)
        ov.save_model(model, str(folder / XML), compress_to_fp16=options.precision == "fp16")
        del model
        shutil.rmtree(staging)
        notes: dict[str, Any] = {"quantize": quantize} if quantize else {}
        return ComponentExport(passes=passes, notes={**notes, "streamed_weights": True})

    def versions(self) -> dict[str, str]:
        import nncf
        import openvino as ov

        return {"openvino": ov.get_version(), "nncf": nncf.__version__}


EXPORTER = OpenVINOExporter
