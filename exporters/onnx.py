"""ONNX export: every component of a checkpoint to `<component>/model.onnx`, checked against the reference.

Memory-bounded: components are exported one at a time, each loaded just before and freed just
after. A component whose weights pass the 2 GB protobuf limit gets its tensors in one
`model.onnx_data` file beside it. Export uses torch's TorchScript-based exporter
(`dynamo=False`): on this kind of model it matches eager to ~1e-6 and is ~25x faster than
the dynamo exporter (DESIGN.md's measurements).

After export each component runs once in ONNX Runtime on seeded inputs and is compared with
the reference module; a miss of the parity gate fails the whole export (nothing is renamed
into place) unless `allow_mismatch`, which records the numbers anyway.
"""

from __future__ import annotations

import gc
import shutil
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflower.atomic import atomic_directory
from difflower.errors import ArgumentError, DifflowerError
from difflower.exporters.specs import (
    ComponentSpec,
    ShapePlan,
    component_specs,
    concrete,
    example_inputs,
    load_export_module,
)
from difflower.graph_passes.attention_variant import apply_attention_variant
from difflower.graph_passes.base import PassResult
from difflower.manifest import Bucket, ComponentRecord, Manifest, source_record
from difflower.reference.loading import read_model_index, read_vae_config
from difflower.validate.gates import component_verdict
from difflower.validate.metrics import compare

ONNX_OPSET = 17
# protobuf cannot serialize a message above 2 GiB: bigger models keep their weights outside.
PROTOBUF_LIMIT = 2**31 - 1
# Files the runtime pipeline needs besides the exported graphs.
COPIED = ("model_index.json", "scheduler", "tokenizer", "tokenizer_2", "tokenizer_3")


class ExportParityError(DifflowerError):
    """An exported component missed its parity gate; nothing was written."""


def export_onnx(
    model: Path | str,
    out: Path | str,
    *,
    components: Sequence[str] | None = None,
    static: Sequence[Bucket | str] = (),
    precision: str = "fp32",
    attention: str = "sdpa",
    cfg: bool = True,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Export `model` (a diffusers-format folder) to an ONNX artifact folder at `out`.

    `static` buckets (BxHxW in pixels, images per prompt) fix the graph's shapes: one bucket
    gives fully static graphs, several give dynamic graphs limited to those buckets at run
    time. `cfg` says whether the denoiser runs negative and positive prompts as one batch
    (its static batch is then doubled). `attention` picks the attention variant of our own
    modules (see difflower.graph_passes.attention_variant): "onnxruntime" emits ONNX Runtime's
    fused MultiHeadAttention, faster on ORT but not readable by other ONNX consumers.
    """
    if precision != "fp32":
        raise ArgumentError(
            "--precision", f"ONNX export supports fp32 for now; fp16 needs the fp16 graph pass (asked {precision!r})"
        )
    index = read_model_index(model)
    plan = ShapePlan(tuple(b if isinstance(b, Bucket) else Bucket.parse(b) for b in static), cfg=cfg)
    specs = _select(component_specs(index), components)
    factor = read_vae_config(index.root / "vae").downscale_factor
    for bucket in plan.buckets:
        multiple = factor * (2 if index.family == "sd3" else 1)
        if bucket.height % multiple or bucket.width % multiple:
            raise ArgumentError("--static", f"{bucket}: height and width must be multiples of {multiple}")

    with atomic_directory(out, overwrite) as tmp:
        _copy_support_files(index.root, tmp)
        records: dict[str, ComponentRecord] = {}
        passes: list[dict[str, Any]] = []
        bar = tqdm(specs, disable=not progress, desc="export", unit="component")
        for spec in bar:
            bar.set_description(f"exporting {spec.name}")
            record, applied = _export_component(spec, index.root, tmp, plan, factor, precision, attention)
            records[spec.name] = record
            passes += [{"component": spec.name, **p.to_json()} for p in applied]
        bar.close()
        manifest = Manifest(
            family=index.family,
            backend="onnx",
            precision=precision,
            source=source_record(index.root),
            pipeline=_pipeline_facts(index),
            components=records,
            shapes=plan.to_json(),
            passes=passes,
            versions=_versions(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        manifest.write(tmp)
        missed = [r for r in records.values() if not r.parity.get("passed", False)]
        if missed and not allow_mismatch:
            names = ", ".join(f"{r.name} (max abs {r.parity['max_abs']:.3g}; gate {r.parity['gate']})" for r in missed)
            raise ExportParityError(
                f"export: parity gate missed by {names}; nothing was written. Pass --allow-mismatch to keep the "
                "artifact with these numbers recorded"
            )
    return manifest


def _select(specs: list[ComponentSpec], names: Sequence[str] | None) -> list[ComponentSpec]:
    if not names:
        return specs
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ArgumentError("--components", f"unknown {', '.join(unknown)}; this checkpoint has {', '.join(known)}")
    return [s for s in specs if s.name in names]


def _copy_support_files(root: Path, out: Path) -> None:
    for name in COPIED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, out / name)
        elif source.is_file():
            shutil.copy2(source, out / name)


def _export_component(
    spec: ComponentSpec, root: Path, out: Path, plan: ShapePlan, factor: int, precision: str, attention: str
) -> tuple[ComponentRecord, list[PassResult]]:
    """Export one component, check it in ONNX Runtime, free it; returns its record and the passes applied."""
    start = time.perf_counter()
    folder = out / spec.name
    folder.mkdir()
    module = load_export_module(spec, root)
    applied = []
    if spec.kind != "text_encoder" and attention != "sdpa":  # text encoders are transformers' own modules
        applied.append(apply_attention_variant(module, attention, where=spec.name))
    bucket = plan.buckets[0] if plan.buckets else _default_bucket(root, factor)
    dims = plan.dims(bucket, factor)
    inputs = example_inputs(spec, dims)
    dynamic = None if plan.static else _dynamic_axes(spec)
    path = folder / "model.onnx"
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > PROTOBUF_LIMIT

    # 1. the reference outputs first, so the module can be freed before anything else is loaded
    with torch.no_grad():
        expected = module(*inputs.values())
    _torch_export(module, inputs, spec, path, dynamic, external=large, contrib=attention == "onnxruntime")
    del module
    gc.collect()
    if large:
        _consolidate_external_data(path)
    seconds = time.perf_counter() - start

    # 2. component parity: the exported graph in ONNX Runtime vs the reference module
    session = _session(path, low_memory=large)
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    del session
    parity = _parity(spec, precision, expected, got)
    inputs_spec = [concrete(t, dims) if plan.static else t for t in spec.inputs]
    outputs_spec = [concrete(t, dims) if plan.static else t for t in spec.outputs]
    files = sorted(str(p.relative_to(out)) for p in folder.iterdir())
    gc.collect()
    record = ComponentRecord(
        name=spec.name,
        kind=spec.kind,
        files=files,
        inputs=inputs_spec,
        outputs=outputs_spec,
        parity=parity,
        export_seconds=round(seconds, 2),
        size_bytes=sum((out / f).stat().st_size for f in files),
        config={"class_name": spec.class_name, "source": spec.source, **spec.facts},
    )
    return record, applied


def _default_bucket(root: Path, factor: int) -> Bucket:
    """The checkpoint's native size at one image, for the parity check of a dynamic export."""
    from difflower.reference.config import read_json

    for name in ("unet", "transformer"):
        path = root / name / "config.json"
        if path.is_file():
            size = read_json(path).get("sample_size") or 64
            size = size[0] if isinstance(size, list) else size
            return Bucket(1, size * factor, size * factor)
    return Bucket(1, 512, 512)


def _dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    return {
        t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
        for t in (*spec.inputs, *spec.outputs)
    }


def _torch_export(
    module, inputs, spec: ComponentSpec, path: Path, dynamic, external: bool, contrib: bool = False
) -> None:
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


def _consolidate_external_data(path: Path) -> None:
    """Gather the per-tensor files torch wrote into one `model.onnx_data`, as optimum lays it out.

    Streams one tensor at a time: a 10 GB UNet never sits in memory twice.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    folder = path.parent
    model = onnx.load(str(path), load_external_data=False)
    data_path = folder / "model.onnx_data"
    sources: set[Path] = set()
    with open(data_path, "wb") as sink:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                source = folder / info.location
                sources.add(source)
                with open(source, "rb") as handle:
                    handle.seek(info.offset or 0)
                    data = handle.read(info.length) if info.length else handle.read()
            elif len(tensor.raw_data) >= 1024:  # tensors under 1 KB stay inline, as onnx's own helper does
                data = tensor.raw_data
            else:
                continue
            offset = sink.tell()
            sink.write(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(path))
    for source in sources - {data_path}:
        source.unlink()
    data_path.chmod(0o644)


def _session(path: Path, low_memory: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if low_memory:
        # Pre-packed GEMM weights are a second copy of every matrix; a multi-GB component
        # is checked without them (the arithmetic is the same).
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _parity(spec: ComponentSpec, precision: str, expected: tuple[torch.Tensor, ...], got: list) -> dict[str, Any]:
    outputs = {}
    for tensor, ref, out in zip(spec.outputs, expected, got, strict=True):
        metrics = compare(torch.from_numpy(out), ref)
        outputs[tensor.name] = {**metrics.to_json(), **component_verdict(precision, spec.kind, metrics).to_json()}
    worst = max(outputs.values(), key=lambda m: m["max_abs"])
    return {
        "engine": "onnxruntime-cpu",
        "max_abs": worst["max_abs"],
        "gate": worst["gate"],
        "passed": all(m["passed"] for m in outputs.values()),
        "outputs": outputs,
    }


def _pipeline_facts(index) -> dict[str, Any]:
    """The PipelineSpec of the source checkpoint, read from its configs."""
    from dataclasses import asdict

    from difflower.reference.pipeline import spec_from_configs

    return asdict(spec_from_configs(index))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    import difflower

    return {
        "difflower": difflower.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
