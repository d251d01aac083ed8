"""Artifact-level pass: clean an ONNX graph for TensorRT's parser with NVIDIA's own tools.

What `polygraphy surgeon sanitize --fold-constants` does, as a library call: polygraphy folds
constant subgraphs (ONNX Runtime evaluates them; shape arithmetic on static dims included),
then onnx-graphsurgeon removes what became unused and sorts the nodes topologically. The graph
computes the same function; the PassResult says how many nodes went.
"""

from __future__ import annotations

from pathlib import Path

from difflower.graph_passes.base import PassResult


def sanitize_for_tensorrt(path: Path) -> PassResult:
    """Fold and clean the ONNX model at `path` in place (weights stay in `model.onnx_data` if there)."""
    import onnx
    import onnx_graphsurgeon as gs
    import polygraphy
    from polygraphy.backend.onnx import fold_constants

    external = (path.parent / "model.onnx_data").exists()
    model = onnx.load(str(path))
    before = len(model.graph.node)
    model = fold_constants(model, num_passes=3, error_ok=True, size_threshold=16 * 2**20)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    after = len(model.graph.node)
    if external:
        (path.parent / "model.onnx_data").unlink()
    onnx.save_model(model, str(path), save_as_external_data=external, location="model.onnx_data")
    return PassResult(
        "tensorrt_sanitize",
        {"nodes folded or removed": before - after},
        {
            "nodes_before": before,
            "nodes_after": after,
            "tools": f"polygraphy {polygraphy.__version__} fold_constants, onnx-graphsurgeon {gs.__version__}",
        },
    )
