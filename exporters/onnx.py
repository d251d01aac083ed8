"""ONNX: every component to `<component>/model.onnx`, run by ONNX Runtime.

Export uses torch's TorchScript-based exporter (`dynamo=False`): on these models it matches
eager to ~1e-6 and is ~25x faster than the dynamo exporter (DESIGN.md's measurements). A
component whose weights pass the 2 GB protobuf limit gets its tensors in one
`model.onnx_data` beside `model.onnx`, streamed one tensor at a time.
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import torch

from difflower.artifact.formats import ONNX_FILE, consolidate_external_data
from difflower.artifact.specs import ComponentSpec
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.graph_passes.base import PassDidNotFire, PassResult, quieter
from difflower.graph_passes.calibration import CALIBRATED, QUANTIZED_DENOISERS, denoiser_calibration
from difflower.graph_passes.fp16 import convert_fp16, half_module, select_islands
from difflower.graph_passes.onnx_quantize import ONNX_QUANTIZE_MODES, quantize_applies, quantize_onnx
from difflower.graph_passes.static_shapes import static_shapes
from difflower.reference.loading import ModelIndex
from difflower.reference.streaming import Skeleton, streamed_forward

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


STREAMED_OPSET = 18  # the dynamo exporter's lowest


def _lazy_weights(model, sk: Skeleton, dtypes: dict[str, torch.dtype]) -> int:
    """Give every initializer of the weightless graph `model` its tensor, read from the checkpoint
    (as `dtypes[name]`) when it is written: `ir.save` then holds a bounded number of tensors at
    once. A Transpose of a weight (how the dynamo exporter writes nn.Linear) is folded into its
    one reader's tensor, so the file holds the weights as the graph uses them. Returns the
    transposes folded."""
    import onnx_ir as ir

    ir_dtypes = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16}

    def lazy(key: str, dtype: torch.dtype, transposed: bool):
        def read():
            tensor = sk.tensors.read(key, dtype)
            return ir.tensor((tensor.t() if transposed else tensor).contiguous().numpy())

        return read

    transposed: set[str] = set()
    for node in list(model.graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get("perm")
        if (
            source is None
            or not source.is_initializer()
            or len(source.uses()) != 1
            or perm is None
            or list(perm.as_ints()) != [1, 0]
        ):
            continue
        node.outputs[0].replace_all_uses_with(source)
        model.graph.remove(node, safe=True)
        source.shape = ir.Shape(list(reversed(list(source.shape))))
        transposed.add(source.name)
    for name, value in model.graph.initializers.items():
        key = sk.key(name)
        dtype = dtypes[name]
        shape = sk.tensors.shapes[key][::-1] if name in transposed else sk.tensors.shapes[key]
        value.const_value = ir.LazyTensor(
            lazy(key, dtype, name in transposed), dtype=ir_dtypes[dtype], shape=ir.Shape(list(shape)), name=name
        )
    return len(transposed)


def _stored_as_fp16(model, names: list[str]) -> None:
    """Store fp32 initializers `names` in fp16, each read through a Cast to fp32: the graph still
    computes in fp32 (OpenVINO keeps such weights compressed and nncf compresses them further)."""
    import onnx_ir as ir

    for name in names:
        value = model.graph.initializers[name]
        readers = list(value.uses())
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{name}/to_fp32")
        cast.outputs[0].name = f"{name}/fp32"
        for reader in readers:
            reader.node.replace_input_with(reader.idx, cast.outputs[0])
        model.graph.insert_before(model.graph.node(0), cast)
        value.dtype = ir.DataType.FLOAT16


def _traced_inputs(inputs: dict[str, torch.Tensor], dynamic: dict | None) -> tuple[torch.Tensor, ...]:
    """Meta tensors of the inputs' shapes; torch.export fixes a dim it traced at size 1, so the
    symbolic ones are traced at 2 or more (the values are never computed)."""
    traced = []
    for name, tensor in inputs.items():
        symbolic = (dynamic or {}).get(name, {})
        shape = [max(2, size) if axis in symbolic else size for axis, size in enumerate(tensor.shape)]
        traced.append(torch.empty(shape, dtype=tensor.dtype, device="meta"))
    return tuple(traced)


def streamed_export(
    sk: Skeleton,
    inputs: dict[str, torch.Tensor],
    spec: ComponentSpec,
    path: Path,
    static: bool,
    fp16_storage: bool = False,
) -> PassResult:
    """Export the meta-device skeleton with torch's dynamo exporter (it traces without weights),
    with the spec's symbolic dims or, `static`, at the inputs' shapes; then write the graph with
    its weights streamed from the checkpoint into `model.onnx_data`. `fp16_storage` stores the
    fp32 weights of matrices in fp16 behind Casts (see `_stored_as_fp16`)."""
    import onnx_ir as ir
    import onnxscript
    import onnxscript.optimizer

    dtypes = {name: t.dtype for name, t in (*sk.module.named_parameters(), *sk.module.named_buffers())}
    dynamic = None if static else dynamic_axes(spec)
    with warnings.catch_warnings(), quieter(logging.getLogger("torch.onnx"), logging.ERROR):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            sk.module,
            _traced_inputs(inputs, dynamic),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic,
            opset_version=STREAMED_OPSET,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    model = program.model
    unknown = [n for n in model.graph.initializers if n not in dtypes]
    if unknown:  # a tensor made at trace time on the meta device would have no value to write
        raise PassDidNotFire(f"streamed export: initializers that are no weight: {', '.join(unknown[:3])}")
    compressed = []
    if fp16_storage:
        compressed = [
            n for n, v in model.graph.initializers.items() if dtypes[n] == torch.float32 and len(v.shape) == 2
        ]
        dtypes = {**dtypes, **dict.fromkeys(compressed, torch.float16)}
    folded = _lazy_weights(model, sk, dtypes)
    _stored_as_fp16(model, compressed)
    weights = len(model.graph.initializers)
    onnxscript.optimizer.optimize(model, num_iterations=2)  # folds shape arithmetic; weights stay lazy
    ir.save(model, str(path), external_data="model.onnx_data")
    return PassResult(
        "streamed_weights",
        {
            "weights streamed": weights,
            "weight transposes folded": folded,
            "weights stored fp16 for fp32": len(compressed),
        },
        {
            "exporter": f"torch.onnx dynamo (torch {torch.__version__}, onnxscript {onnxscript.__version__})",
            "source_bytes": sk.tensors.nbytes,
        },
    )


class OnnxExporter:
    """BackendExporter for ONNX graphs checked in ONNX Runtime on the CPU."""

    name = "onnx"

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.precision not in ("fp32", "fp16"):
            raise ArgumentError("--precision", f"onnx builds fp32 or fp16 graphs, not {options.precision!r}")
        options.refuse_unknown("onnx", CALIBRATED)
        quantize = options.refuse_quantize_mode("onnx", ONNX_QUANTIZE_MODES)
        if quantize is not None and options.stream_weights:  # calibration and the quantizer load the model
            raise ArgumentError("--stream-weights", "is not combined with --quantize on onnx; export without it")
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

    def export_streamed(
        self, sk: Skeleton, inputs: dict[str, torch.Tensor], spec: ComponentSpec, folder: Path, options
    ) -> ComponentExport:
        """`--stream-weights`: the component traced on the meta device, fp16 decided per module
        before tracing, its weights written tensor by tensor from the checkpoint."""
        passes = []
        if options.precision == "fp16":
            with streamed_forward(sk) as module:
                islands = select_islands(module, inputs)
            passes.append(half_module(sk.module, islands))
        passes.append(streamed_export(sk, inputs, spec, folder / ONNX_FILE, options.plan.static))
        return ComponentExport(passes=passes, notes={"external_data": True, "streamed_weights": True})

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


EXPORTER = OnnxExporter
