"""Artifact-level pass: an fp16 ONNX graph with fp32 islands chosen by measurement (`--precision fp16`).

1. Measure (`select_islands`): run the reference module in fp32 on calibration inputs with a
   hook on every module. A module is kept in fp32 when
   - a tensor it reads or writes comes within `headroom`x of fp16's largest finite value
     (65504): in fp16 it would overflow to inf (the SDXL VAE decoder's known failure), or
   - for modules that hold weights: computing it from fp16-rounded inputs and weights, with the
     output rounded to fp16, moves its output by more than `max_error` of the output's range.
2. Map (`island_nodes`): the exporter names every node after the module scopes it came from
   (`/unet/down_blocks.0/resnets.1/conv1/Conv`), so a module's nodes are those under its scope.
3. Convert (`convert_fp16`): ONNX Runtime's float16 converter turns everything else to fp16 and
   inserts the casts at the island borders; the graph's inputs and outputs stay fp32.

Activations computed outside any module's outputs (inside a module's forward) are judged
through the module that contains them. On the CPU, ONNX Runtime runs fp16 ops it has no fp16
kernel for in fp32 behind inserted casts, so CPU parity of an fp16 graph shows its storage
rounding, not all of the compute error an fp16 GPU engine adds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from difflower.graph_passes.base import PassDidNotFire, PassResult

FP16_MAX = 65504.0
HEADROOM = 4.0  # activations above FP16_MAX / HEADROOM are kept in fp32
MAX_ERROR = 0.01  # fp16 rounding error, as a fraction of the module output's largest magnitude


@dataclass(frozen=True)
class Island:
    """A module kept in fp32 and why."""

    module: str  # its qualified name in the exported wrapper
    reason: str
    max_abs: float  # the largest magnitude it read or wrote
    fp16_error: float | None  # relative error under fp16 rounding (modules with weights)
    nodes: int = 0  # ONNX nodes kept in fp32 for it (filled by island_nodes)


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _max_abs(value) -> float:
    return max((float(t.detach().abs().max()) for t in _tensors(value) if t.numel()), default=0.0)


def _cast(value, dtype: torch.dtype):
    """`value`'s float tensors (also inside tuples and lists) as `dtype`."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _fp16_round(value):
    return _cast(_cast(value, torch.float16), torch.float32)


def _fp16_error(module: nn.Module, args: tuple, output) -> float | None:
    """Relative change of `module`'s output when inputs, weights and output are rounded to fp16."""
    if not isinstance(output, torch.Tensor) or not any(True for _ in module.parameters(recurse=False)):
        return None
    rounded = copy.deepcopy(module)
    rounded._forward_hooks.clear()  # the copy would otherwise measure itself, recursively
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.half().float())
        result = _fp16_round(rounded(*_fp16_round(args)))
    scale = float(output.abs().max())
    if not torch.isfinite(result).all():
        return float("inf")
    return float((result - output).abs().max()) / max(scale, 1e-30)


def select_islands(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    headroom: float = HEADROOM,
    max_error: float = MAX_ERROR,
) -> list[Island]:
    """The modules of `model` that must stay fp32, measured on `inputs` (see the module docstring).

    Leaf modules are judged on what they read and write; one that returns its input (Identity, a
    Dropout at eval, the feed-forwards' placeholders) computes nothing, has no ONNX nodes and is
    never kept. A module with children is kept whole when it reads an overflowing tensor (its own
    code may use it, e.g. a residual add) or writes one that none of its kept children wrote (the
    overflow happens in its own code). Only the outermost of nested islands is returned: its
    scope covers the inner ones.
    """
    limit = FP16_MAX / headroom
    found: dict[str, Island] = {}
    kept_outputs: list[torch.Tensor] = []  # what kept modules wrote (held, so ids stay unique)
    hooks = []

    def hook(name: str, leaf: bool):
        def record(module: nn.Module, args: tuple, output) -> None:
            if any(output is arg for arg in args):  # a pass-through (Identity, eval Dropout): no nodes
                return
            read, wrote = _max_abs(args), _max_abs(output)
            largest = max(read, wrote)
            error = _fp16_error(module, args, output) if leaf else None
            overflow = largest > limit or largest != largest
            if not leaf and overflow and read <= limit:  # only its output: is it a kept child's?
                overflow = not any(t is kept for t in _tensors(output) for kept in kept_outputs)
            reason = None
            if overflow:
                reason = f"activations reach {largest:.3g}, within {headroom:g}x of fp16's largest value 65504"
            elif error is not None and error > max_error:
                reason = f"fp16 rounding moves its output by {error:.2g} of its range (limit {max_error:g})"
            if reason and name not in found:
                found[name] = Island(name, reason, largest, error)
            if reason:
                kept_outputs.extend(_tensors(output))

        return record

    for name, module in model.named_modules():
        if name:  # the wrapper itself: its inputs and outputs stay fp32 anyway
            leaf = not any(True for _ in module.children())
            hooks.append(module.register_forward_hook(hook(name, leaf)))
    try:
        with torch.no_grad():
            model(*inputs.values())
    finally:
        for handle in hooks:
            handle.remove()
    outermost = [n for n in found if not any(n.startswith(other + ".") for other in found if other != n)]
    return [found[n] for n in sorted(outermost)]


def in_scope(node_name: str, module_name: str) -> bool:
    """Whether the exporter put node `node_name` under module `module_name`'s scope.

    Node names are `/seg/seg/.../Op`, one segment per module whose forward ran, each segment a
    dotted suffix of that module's qualified name (`down_blocks.0` for `unet.down_blocks.0`;
    modules reached without their forward, like `vae` in `vae.decoder`, have none). The
    segments must map, in order, onto the module's ancestors and end at the module itself.
    """
    parts = module_name.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    k = 0
    for segment in node_name.split("/")[1:-1]:
        while k < len(chain) and not (chain[k] == segment or chain[k].endswith("." + segment)):
            k += 1
        if k >= len(chain) - 1:
            return k == len(chain) - 1
        k += 1
    return False


def island_nodes(graph_nodes: Iterable, islands: list[Island]) -> tuple[list[str], list[Island]]:
    """Names of the ONNX nodes under the islands' scopes, and the islands with their node counts."""
    names: list[str] = []
    counts = {i.module: 0 for i in islands}
    for node in graph_nodes:
        for module in counts:
            if in_scope(node.name, module):
                names.append(node.name)
                counts[module] += 1
                break
    unmatched = [m for m, n in counts.items() if n == 0]
    if unmatched:
        raise PassDidNotFire(
            f"fp16: no ONNX node carries the scope of fp32 island(s) {', '.join(unmatched)}, so they cannot be "
            "kept in fp32; export with --precision fp32 and report the model"
        )
    return names, [Island(**{**asdict(i), "nodes": counts[i.module]}) for i in islands]


def _drop_round_trip_casts(model) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs: the converter routes an fp32 island's output
    through fp16 when it feeds a kept-fp32 graph output, which would overflow exactly the values
    the island exists to keep. The second Cast becomes an Identity of the fp32 value."""
    import onnx

    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    removed = 0
    for first in nodes:
        if cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        readers = consumers.get(first.output[0], [])
        if not readers or any(cast_to(r) != onnx.TensorProto.FLOAT for r in readers):
            continue
        for second in readers:
            second.op_type = "Identity"
            del second.attribute[:]
            second.input[0] = first.input[0]
            removed += 1
        model.graph.node.remove(first)
    return removed


def convert_fp16(path: Path, islands: list[Island], keep_io_types: bool = True) -> PassResult:
    """Convert the ONNX model at `path` to fp16 in place, keeping the islands' nodes in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    external = (path.parent / "model.onnx_data").exists()
    if external:  # past protobuf's 2 GB the converter's own shape inference cannot serialize the model:
        onnx.shape_inference.infer_shapes_path(str(path), str(path))  # infer from the file instead
    model = onnx.load(str(path))
    blocked, islands = island_nodes(model.graph.node, islands)
    total = len(model.graph.node)
    # max_finite_val: the converter clips weights to +-1e4 by default, silently; clip only at
    # fp16's real limit (weights beyond it make their module an island through the error test)
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        node_block_list=blocked,
        max_finite_val=FP16_MAX,
        disable_shape_infer=external,
    )
    round_trips = _drop_round_trip_casts(converted)
    halves = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)
    if halves == 0:
        raise PassDidNotFire(f"fp16: no weight of {path} was converted to fp16")
    casts = sum(n.op_type == "Cast" for n in converted.graph.node) - sum(n.op_type == "Cast" for n in model.graph.node)
    del model
    if external:
        for stale in (path, path.parent / "model.onnx_data"):
            stale.unlink()
    onnx.save_model(converted, str(path), save_as_external_data=external, location="model.onnx_data")
    return PassResult(
        "fp16",
        {"nodes in fp16": total - len(blocked), "nodes kept in fp32": len(blocked), "fp16 weight tensors": halves},
        {
            "islands": [asdict(i) for i in islands],
            "casts_added": casts,
            "round_trip_casts_removed": round_trips,
            "io": "fp32" if keep_io_types else "fp16",
            "headroom": HEADROOM,
            "max_error": MAX_ERROR,
            "converter": "onnxruntime.transformers.float16",
        },
    )


def half_module(module: nn.Module, islands: list[Island]) -> PassResult:
    """fp16 before tracing, for a graph that never exists in fp32 (a streamed export: its weights
    are cast as they are written). `module` becomes fp16 but for the islands, which stay fp32;
    every module with weights casts what it reads to its weights' dtype, so an island's fp32
    output (the values fp16 cannot hold) reaches the next fp32 island unrounded, and the first
    fp16 layer after it rounds it, as the converter's casts do at an island's border. The
    wrapper takes and returns fp32."""
    module.half()
    for island in islands:
        module.get_submodule(island.module).float()
    owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    for owner in owners:
        dtype = next(owner.parameters(recurse=False)).dtype
        owner.register_forward_pre_hook(lambda _m, args, dtype=dtype: _cast(args, dtype))
    module.register_forward_pre_hook(lambda _m, args: _cast(args, torch.float16))
    module.register_forward_hook(lambda _m, _args, output: _cast(output, torch.float32))
    halves = sum(p.dtype == torch.float16 for p in module.parameters())
    if halves == 0:
        raise PassDidNotFire("fp16: every weight is in an fp32 island; export in fp32")
    return PassResult(
        "fp16",
        {
            "fp16 weight tensors": halves,
            "fp32 weight tensors": sum(p.dtype == torch.float32 for p in module.parameters()),
        },
        {
            "islands": [asdict(i) for i in islands],
            "io": "fp32",
            "headroom": HEADROOM,
            "max_error": MAX_ERROR,
            "converter": "module dtypes before tracing (streamed weights)",
        },
    )
