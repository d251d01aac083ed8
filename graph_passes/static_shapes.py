"""Artifact-level pass: fix every input dimension of an ONNX graph, then fold (`--static BxHxW`).

The graph is exported with symbolic dims; this pass writes the bucket's concrete dims on its
inputs and runs onnxslim (shape inference, constant folding, dead-node removal and its
pattern fusions), so the shape arithmetic the exporter emits (Shape -> Gather -> Unsqueeze -> Concat
-> Reshape chains) folds into constants. It reports the node counts before and after, and
fails loudly if the graph still computes shapes afterwards.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from difflower.graph_passes.base import PassDidNotFire, PassResult, quieter

SHAPE_OPS = ("Shape", "Size")
PROTOBUF_LIMIT = 2**31 - 1
SLIM_ROUNDS = 3  # onnxslim rounds at most, while shape ops are left


def _counts(nodes) -> Counter:
    return Counter(node.op_type for node in nodes)


def static_shapes(path: Path, shapes: Mapping[str, Sequence[int]]) -> PassResult:
    """Fix the inputs of the ONNX model at `path` to `shapes` (by input name), fold, save in place.

    A model with its weights in `model.onnx_data` keeps them there (rewritten). onnxslim works
    on one in-memory protobuf, which cannot pass 2 GB: such models are folded by onnxscript's
    optimizer instead, which reads external weights lazily.
    """
    import onnx

    external = (path.parent / "model.onnx_data").exists()
    graph = onnx.load(str(path), load_external_data=False).graph
    missing = [v.name for v in graph.input if v.name not in shapes]
    if missing:
        raise PassDidNotFire(f"static_shapes: no concrete shape for input(s) {', '.join(missing)} of {path}")
    fixed = sum(any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim) for v in graph.input)
    before = _counts(graph.node)
    del graph
    weights = path.parent / "model.onnx_data"
    if external and weights.stat().st_size >= PROTOBUF_LIMIT:
        after, optimizer = _fold_large(path, shapes)
    else:
        after, optimizer = _fold_with_onnxslim(path, shapes, external)
    left = {op: after[op] for op in SHAPE_OPS if after[op]}
    if left:
        raise PassDidNotFire(
            f"static_shapes: {path} still computes shapes after folding ({left}); export it without --static "
            "(dynamic shapes run everywhere) and report the model"
        )
    if sum(after.values()) >= sum(before.values()):
        raise PassDidNotFire(f"static_shapes: folding removed no node from {path} ({sum(before.values())} nodes)")
    return PassResult(
        "static_shapes",
        {
            "inputs fixed": fixed,
            "nodes removed": sum(before.values()) - sum(after.values()),
            "shape ops folded": sum(before[op] for op in SHAPE_OPS),
        },
        {
            "shapes": {name: list(dims) for name, dims in shapes.items()},
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "optimizer": optimizer,
        },
    )


def _fold_with_onnxslim(path: Path, shapes: Mapping[str, Sequence[int]], external: bool) -> tuple[Counter, str]:
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    for value in model.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name], strict=True):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    with quieter(logging.getLogger("onnxslim")):
        model = onnxslim.slim(model)
        # One round can stop short: the real-size CLIP text encoder at batch 1 keeps 19 Shape ops
        # (from its 9th layer on) after the first and none after the second.
        for _ in range(SLIM_ROUNDS - 1):
            if not any(_counts(model.graph.node)[op] for op in SHAPE_OPS):
                break
            model = onnxslim.slim(model)
    if external:
        (path.parent / "model.onnx_data").unlink()  # every tensor is in memory now
    onnx.save_model(model, str(path), save_as_external_data=external, location="model.onnx_data")
    return _counts(model.graph.node), f"onnxslim {onnxslim.__version__}"


def _fold_large(path: Path, shapes: Mapping[str, Sequence[int]]) -> tuple[Counter, str]:
    import onnx_ir as ir
    import onnxscript
    import onnxscript.optimizer

    model = ir.load(str(path))  # weights stay on disk until written
    for value in model.graph.inputs:
        value.shape = ir.Shape(list(shapes[value.name]))
    onnxscript.optimizer.optimize(model, num_iterations=4)
    counts = _counts(model.graph)
    staging = path.parent / ".static_shapes"
    staging.mkdir()
    ir.save(model, str(staging / path.name), external_data="model.onnx_data")
    del model
    for produced in staging.iterdir():
        produced.replace(path.parent / produced.name)
    staging.rmdir()
    return counts, f"onnxscript {onnxscript.__version__} optimizer (model over 2 GB)"
