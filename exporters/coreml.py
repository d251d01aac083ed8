"""Core ML: every component to `<component>/model.mlpackage` (an ML program), converted by
coremltools from the traced reference modules.

- Static shapes (Core ML wants them): `--static BxHxW`, default the checkpoint's native size
  at one image; the denoiser's batch is doubled for classifier-free guidance.
- Compute precision fp16 by default. The fp16 island analysis of graph_passes.fp16 runs on the
  reference module; coremltools cannot map module scopes to its ops, so a component in which
  the analysis finds an island is converted in fp32 whole, and the manifest says which
  islands made it so.
- `--attention split-einsum|split-einsum-v2` (Apple's Neural Engine layouts) is a module pass
  on our own modules: same checkpoint, same function; its torch-side parity is recorded. On a
  UNet it brings the Neural Engine layout with it (graph_passes.ane_layout: the transformer
  blocks on (B, C, 1, S), every Linear a 1x1 convolution), as in Apple's ml-stable-diffusion.
- `--chunk-unet` (iOS): the UNet as two chained packages, `unet/chunk1/model.mlpackage` and
  `unet/chunk2/model.mlpackage`, split where their weights balance (graph_passes.chunk_unet);
  the manifest lists each chunk's inputs, outputs, stages and weight bytes, and the `coreml`
  engine chains them.
- `--quantize palettize-N` (N in 2, 4, 6, 8: k-means look-up tables) or `int8-weight`
  (linear symmetric) through coremltools.optimize.coreml.
- `minimum_deployment_target` is macOS 14 / iOS 17 (the first with ML program palettization
  and SDPA-free fp16 programs at these sizes), recorded in the manifest.

Core ML predicts on macOS only. Here the export converts, saves, reloads each package as a
spec (names, shapes, dtypes, op counts) and measures the traced module against the reference
in torch; the package's own parity is recorded as not measured, for `difflower validate` on a
Mac.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.artifact.formats import COREML_FILE as FILE
from difflower.artifact.formats import coreml_name
from difflower.artifact.specs import ComponentSpec
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.graph_passes.ane_layout import apply_ane_layout
from difflower.graph_passes.base import PassDidNotFire, PassResult, measured
from difflower.graph_passes.chunk_unet import split_unet
from difflower.graph_passes.fp16 import select_islands
from difflower.reference.loading import ModelIndex

COREML_QUANTIZE = ("palettize-2", "palettize-4", "palettize-6", "palettize-8", "int8-weight")
COREML_ATTENTION = ("sdpa", "math", "split-einsum", "split-einsum-v2")
WEIGHT_THRESHOLD = 512  # weights with fewer elements stay as they are (biases, norms)


def _numpy2_compat() -> None:
    """coremltools 9.0 casts 1-element arrays with int(); NumPy 2.x refuses. Give its torch
    frontend's `_cast` the scalar it expects (no-op when the frontend already copes)."""
    from coremltools.converters.mil.frontend.torch import ops

    if getattr(ops._cast, "_difflower", False):
        return
    original = ops._cast

    def cast(context, node, dtype, dtype_name):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.size == 1:
            from coremltools.converters.mil import Builder as mb

            context.add(mb.const(val=dtype(x.val.reshape(()).item()), name=node.name), node.name)
            return
        original(context, node, dtype, dtype_name)

    cast._difflower = True
    ops._cast = cast


def _target():
    import coremltools as ct

    return ct.target.macOS14


def mil_ops(path: Path) -> dict[str, int]:
    """Operation counts of a saved ML program's main function (from its spec, no prediction)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    counts: Counter = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                counts[op.type] += 1
    return dict(counts.most_common())


def lut_sizes(path: Path) -> list[int]:
    """Entries of each look-up table of a saved package's palettized weights (from its spec)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    sizes = []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                if op.type == "constexpr_lut_to_dense":
                    dims = op.attributes["lut"].type.tensorType.dimensions
                    sizes.append(int(np.prod([d.constant.size for d in dims])))
    return sizes


class CoreMLExporter:
    """BackendExporter for Core ML ML programs (conversion everywhere, prediction on macOS)."""

    name = "coreml"
    static_only = True
    default_precision = "fp16"

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.precision not in ("fp16", "fp32"):
            raise ArgumentError("--precision", f"coreml computes in fp16 or fp32, not {options.precision!r}")
        if options.attention not in COREML_ATTENTION:
            raise ArgumentError("--attention", f"coreml takes {', '.join(COREML_ATTENTION)}; got {options.attention!r}")
        options.refuse_unknown("coreml", {"quantize", "chunk_unet"})
        options.refuse_quantize_mode("coreml", COREML_QUANTIZE)
        if options.extra.get("chunk_unet"):
            if not (index.root / "unet").is_dir():
                raise ArgumentError("--chunk-unet", "splits a UNet; this checkpoint has none: drop the flag")
            if options.components and "unet" not in options.components:
                raise ArgumentError("--chunk-unet", "splits the unet: include it in --components")

    def export_component(
        self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], spec: ComponentSpec, folder: Path, options
    ) -> ComponentExport:
        _numpy2_compat()
        notes: dict[str, Any] = {"minimum_deployment_target": "macOS14 / iOS17"}
        passes: list[PassResult] = []
        precision = options.precision
        if precision == "fp16":
            islands = select_islands(module, inputs)
            if islands:
                precision = "fp32"
                notes["fp32_because_of_islands"] = [{"module": i.module, "reason": i.reason} for i in islands]
        notes["compute_precision"] = precision
        ane_layout = options.attention.startswith("split-einsum") and spec.kind == "unet"
        chunked = bool(options.extra.get("chunk_unet")) and spec.kind == "unet"
        if ane_layout or chunked:  # these passes record their parity against the module as it came
            with torch.no_grad():
                expected = module(*inputs.values())
        if ane_layout:
            passes.append(measured(apply_ane_layout(module, spec.name), module, inputs, expected))
        # (module, example inputs, output names, folder, the chunk's manifest entry)
        parts = [(module, inputs, [coreml_name(t.name) for t in spec.outputs], folder, {})]
        if chunked:
            chunks, result = split_unet(module, inputs, expected, 2 if precision == "fp16" else 4)
            passes.append(result)
            notes["chunks"] = [{**c.describe(), "file": f"{c.name}/{FILE}"} for c in chunks]
            parts = [
                (c.module, c.inputs, c.outputs, folder / c.name, n)
                for c, n in zip(chunks, notes["chunks"], strict=True)
            ]
        parity, ops = 0.0, Counter()
        for part, part_inputs, outputs, where, entry in parts:
            model, part_parity = _convert(part, part_inputs, outputs, precision)
            parity = max(parity, part_parity)
            quantize = options.extra.get("quantize")
            if quantize is not None:
                model, result = compress(model, quantize)
                passes.append(result)
            where.mkdir(exist_ok=True)
            model.save(str(where / FILE))
            part_ops = mil_ops(where / FILE)
            ops.update(part_ops)
            if entry:
                entry["ops"] = part_ops
        notes["torch_parity_max_abs"] = parity  # each traced module vs the module it traced
        notes["ops"] = dict(ops.most_common())
        return ComponentExport(passes=passes, notes=notes)

    def versions(self) -> dict[str, str]:
        import coremltools

        return {"coremltools": coremltools.__version__}


def _convert(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], precision: str):
    """`module` traced on `inputs` and converted to an ML program; and the traced module's
    largest difference from `module` on those inputs."""
    import coremltools as ct

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape-derived Python values (static here)
        expected = module(*inputs.values())
        traced = torch.jit.trace(module, tuple(inputs.values()), strict=False)
        got = traced(*inputs.values())
        parity = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
        model = ct.convert(
            traced,
            inputs=[ct.TensorType(name=n, shape=tuple(t.shape), dtype=t.numpy().dtype) for n, t in inputs.items()],
            outputs=[ct.TensorType(name=n) for n in outputs],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            minimum_deployment_target=_target(),
            skip_model_load=True,
        )
    return model, parity


def _distinct_values(op) -> int:
    """Distinct values a compressed weight can take: a palettized weight is lut[indices], so
    its values are among its look-up table's; an int8 weight among its 8-bit codes."""
    values = op.lut.val if op.op_type == "constexpr_lut_to_dense" else op.quantized_data.val
    return int(np.unique(values).size)


def compress(model, mode: str):
    """Palettize (k-means LUT of 2**N entries per weight) or int8-quantize `model`'s weights."""
    from coremltools.optimize import coreml as opt

    if mode.startswith("palettize-"):
        bits = int(mode.rsplit("-", 1)[1])
        config = opt.OptimizationConfig(
            global_config=opt.OpPalettizerConfig(mode="kmeans", nbits=bits, weight_threshold=WEIGHT_THRESHOLD)
        )
        compressed = opt.palettize_weights(model, config)
        settings = {"mode": mode, "lut_entries": 2**bits, "algorithm": "k-means"}
    else:
        config = opt.OptimizationConfig(
            global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=WEIGHT_THRESHOLD)
        )
        compressed = opt.linear_quantize_weights(model, config)
        settings = {"mode": mode, "weights": "int8 linear symmetric, per channel"}
    ops = [op for op in compressed._mil_program.functions["main"].operations if op.op_type.startswith("constexpr_")]
    if not ops:
        raise PassDidNotFire(f"coreml {mode}: no weight was compressed; export without --quantize")
    # what each compressed weight decompresses to: at most 2**N distinct values (256 for int8)
    settings["max_distinct_values_per_weight"] = max(_distinct_values(op) for op in ops)
    return compressed, PassResult("coreml_compression", dict(Counter(op.op_type for op in ops)), settings)


EXPORTER = CoreMLExporter
