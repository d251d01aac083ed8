"""The export driver every backend shares.

A backend only says how to write one component and how to run what it wrote
(`BackendExporter`); the driver does the rest, identically for every backend:

1. read the checkpoint and plan the shapes (dynamic, or static buckets with the CFG doubling);
2. write into a temporary sibling folder, copying the files the runtime needs;
3. per component, one at a time: load the reference module, apply the module-level passes,
   run it on seeded inputs (the expected outputs), free it after the backend wrote its files,
   then run the backend's files on the same inputs and gate the difference;
4. write `difflower.json` and rename the folder into place, unless a gate was missed (then
   nothing is written, or everything with the numbers recorded under `allow_mismatch`).
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
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
from difflower.graph_passes.base import PassResult, measured
from difflower.graph_passes.calibration import DENOISERS
from difflower.graph_passes.fuse_qkv import fuse_qkv
from difflower.machine import machine_record
from difflower.manifest import Bucket, ComponentRecord, Manifest, not_an_artifact, record_files, source_record
from difflower.reference.loading import ModelIndex, read_model_index, read_vae_config, support_files
from difflower.validate.gates import component_verdict
from difflower.validate.metrics import compare

# Runs exported files: named inputs -> outputs in the spec's order.
ComponentRunner = Callable[[Mapping[str, torch.Tensor]], Sequence[np.ndarray | torch.Tensor]]


class ExportParityError(DifflowerError):
    """An exported component missed its parity gate; nothing was written."""


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export was asked for; backends read `extra` for their own settings."""

    components: tuple[str, ...] = ()
    buckets: tuple[Bucket, ...] = ()
    precision: str = "fp32"
    attention: str = "sdpa"
    fuse_qkv: bool = False  # the fuse_qkv module pass on the denoiser
    cfg: bool = True
    allow_mismatch: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    source_root: Path | None = None  # set by run_export: the checkpoint folder being exported

    @property
    def plan(self) -> ShapePlan:
        return ShapePlan(self.buckets, cfg=self.cfg)

    def refuse_unknown(self, backend: str, allowed: set[str] | frozenset[str] | tuple[str, ...]) -> None:
        """ArgumentError naming the first backend option that `backend` does not take."""
        unknown = sorted(set(self.extra) - set(allowed))
        if unknown:
            raise ArgumentError(f"--{unknown[0].replace('_', '-')}", f"is not an option of the {backend} backend")

    def refuse_quantize_mode(self, backend: str, modes: tuple[str, ...]) -> str | None:
        """The --quantize asked for, refused unless it is one of `modes`."""
        quantize = self.extra.get("quantize")
        if quantize is not None and quantize not in modes:
            raise ArgumentError("--quantize", f"{backend} offers {', '.join(modes)}; got {quantize!r}")
        return quantize

    @property
    def effective_precision(self) -> str:
        """What the gates judge: the storage precision, or the quantization asked for."""
        quantize = self.extra.get("quantize")
        if quantize:
            return "int4" if quantize.startswith("int4") else "int8"
        return self.precision


@dataclass
class ComponentExport:
    """What a backend reports for one component it wrote."""

    passes: list[PassResult] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


class BackendExporter(Protocol):
    """One backend's part of an export.

    A backend that can only build fixed shapes (a traced or compiled graph) may also set a class
    attribute `static_only = True`: with no --static it then gets the checkpoint's native size at
    one image (`default_bucket`) as its one static bucket, recorded as such in the manifest.
    """

    name: str  # the manifest's `backend`

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        """Raise ArgumentError naming the flag for anything this backend cannot do."""
        ...

    def export_component(
        self,
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        spec: ComponentSpec,
        folder: Path,
        options: ExportOptions,
    ) -> ComponentExport:
        """Write the component's files into `folder` (which exists and is empty)."""
        ...

    def runner(self, folder: Path, spec: ComponentSpec, options: ExportOptions) -> ComponentRunner | None:
        """Something that runs the files in `folder` on named inputs (for the parity check), or
        None where this machine cannot (the parity is then recorded as not measured, with the
        reason from the component's notes["unmeasured"])."""
        ...

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this backend used."""
        ...


def parse_buckets(static: Sequence[Bucket | str]) -> tuple[Bucket, ...]:
    return tuple(b if isinstance(b, Bucket) else Bucket.parse(b) for b in static)


def run_export(backend: BackendExporter, model: Path | str, out: Path | str, options: ExportOptions) -> Manifest:
    """Export checkpoint `model` to an artifact folder `out` with `backend` (see the module docstring)."""
    index = read_model_index(model)
    factor = read_vae_config(index.root / "vae").downscale_factor
    if not options.buckets and getattr(backend, "static_only", False):
        options = replace(options, buckets=(default_bucket(index.root, factor),))
    plan = options.plan
    every = component_specs(index)
    specs = _select(every, options.components)
    multiple = factor * (2 if index.family == "sd3" else 1)
    for bucket in plan.buckets:
        if bucket.height % multiple or bucket.width % multiple:
            raise ArgumentError("--static", f"{bucket}: height and width must be multiples of {multiple}")
    options = replace(options, source_root=index.root)
    backend.check_options(options, index)

    with atomic_directory(out, options.overwrite, replaceable=not_an_artifact, protected=(index.root,)) as tmp:
        _copy_support_files(index, tmp)
        records: dict[str, ComponentRecord] = {}
        passes: list[dict[str, Any]] = []
        bar = tqdm(specs, disable=not options.progress, desc="export", unit="component")
        for spec in bar:
            bar.set_description(f"exporting {spec.name} ({backend.name})")
            record, applied = _export_component(backend, spec, index.root, tmp, factor, options)
            records[spec.name] = record
            passes += [{"component": spec.name, **p.to_json()} for p in applied]
        bar.close()
        manifest = Manifest(
            family=index.family,
            backend=backend.name,
            precision=options.effective_precision,
            source=source_record(index.root),
            pipeline=_pipeline_facts(index),
            components=records,
            shapes=plan.to_json(),
            passes=passes,
            versions={**_common_versions(), **backend.versions()},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            files=record_files(tmp),
            pipeline_components=[s.name for s in every],
            machine=machine_record(),
        )
        manifest.write(tmp)
        missed = [r for r in records.values() if r.parity.get("passed") is False]
        if missed and not options.allow_mismatch:
            names = ", ".join(f"{r.name} ({r.parity['summary']}; gate {r.parity['gate']})" for r in missed)
            raise ExportParityError(
                f"export: parity gate missed by {names}; nothing was written. Pass --allow-mismatch to keep the "
                "artifact with these numbers recorded"
            )
    return manifest


def _select(specs: list[ComponentSpec], names: Sequence[str]) -> list[ComponentSpec]:
    if not names:
        return specs
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ArgumentError("--components", f"unknown {', '.join(unknown)}; this checkpoint has {', '.join(known)}")
    return [s for s in specs if s.name in names]


def _copy_support_files(index: ModelIndex, out: Path) -> None:
    """The files the runtime pipeline reads besides the exported components, and nothing else
    (a config's `auto_map` code, for one, stays behind)."""
    for relative in support_files(index):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(index.root / relative, out / relative)


def default_bucket(root: Path, factor: int) -> Bucket:
    """The checkpoint's native size at one image, for the parity check of a dynamic export."""
    from difflower.reference.config import read_json

    for name in ("unet", "transformer"):
        path = root / name / "config.json"
        if path.is_file():
            size = read_json(path).get("sample_size") or 64
            size = size[0] if isinstance(size, list) else size
            return Bucket(1, size * factor, size * factor)
    return Bucket(1, 512, 512)


def _export_component(
    backend: BackendExporter, spec: ComponentSpec, root: Path, out: Path, factor: int, options: ExportOptions
) -> tuple[ComponentRecord, list[PassResult]]:
    """Export one component and check it; the reference module lives only while needed."""
    plan = options.plan
    start = time.perf_counter()
    folder = out / spec.name
    folder.mkdir()
    module = load_export_module(spec, root)
    applied: list[PassResult] = []
    bucket = plan.buckets[0] if plan.buckets else default_bucket(root, factor)
    dims = plan.dims(bucket, factor)
    inputs = example_inputs(spec, dims)

    # 1. the reference outputs first, so the module can be freed before the backend's files are
    #    loaded; module passes then record their own parity against them
    with torch.no_grad():
        expected = module(*inputs.values())
    if spec.kind != "text_encoder" and options.attention != "sdpa":  # text encoders are transformers' modules
        result = apply_attention_variant(module, options.attention, where=spec.name)
        applied.append(measured(result, module, inputs, expected))
    if options.fuse_qkv and spec.kind in DENOISERS:
        result = fuse_qkv(module, where=spec.name)
        applied.append(measured(result, module, inputs, expected, key="max_abs_vs_unfused"))
    written = backend.export_component(module, inputs, spec, folder, options)
    applied += written.passes
    del module
    gc.collect()
    seconds = time.perf_counter() - start

    # 2. component parity: the backend's files vs the reference module, same inputs
    run = backend.runner(folder, spec, options)
    if run is None:  # this machine cannot run the backend's files (Core ML off macOS)
        parity = {
            "measured": False,
            "passed": None,
            "summary": written.notes.get("unmeasured", "not measured on this machine"),
            "gate": f"{options.effective_precision} gates, to be checked with `difflower validate` where it runs",
        }
    else:
        got = run(inputs)
        del run
        gc.collect()
        parity = component_parity(spec, options.effective_precision, expected, got)
    files = sorted(str(p.relative_to(out)) for p in folder.rglob("*") if p.is_file())
    record = ComponentRecord(
        name=spec.name,
        kind=spec.kind,
        files=files,
        inputs=[concrete(t, dims) if plan.static else t for t in spec.inputs],
        outputs=[concrete(t, dims) if plan.static else t for t in spec.outputs],
        parity=parity,
        export_seconds=round(seconds, 2),
        size_bytes=sum((out / f).stat().st_size for f in files),
        config={"class_name": spec.class_name, "source": spec.source, **spec.facts, **written.notes},
    )
    return record, applied


def component_parity(
    spec: ComponentSpec, precision: str, expected: Sequence[torch.Tensor], got: Sequence[np.ndarray | torch.Tensor]
) -> dict[str, Any]:
    """Per-output metrics and verdicts, with the worst output summarised."""
    outputs = {}
    for tensor, ref, out in zip(spec.outputs, expected, got, strict=True):
        actual = torch.from_numpy(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
        metrics = compare(actual.float(), ref)
        outputs[tensor.name] = {**metrics.to_json(), **component_verdict(precision, spec.kind, metrics).to_json()}
    worst = max(outputs.values(), key=lambda m: m["max_abs"])
    psnr = "inf" if worst["psnr"] is None else f"{worst['psnr']:.1f} dB"
    return {
        "max_abs": worst["max_abs"],
        "psnr": worst["psnr"],
        "summary": f"max abs {worst['max_abs']:.3g}, PSNR {psnr}",
        "gate": worst["gate"],
        "passed": all(m["passed"] for m in outputs.values()),
        "outputs": outputs,
    }


def _pipeline_facts(index: ModelIndex) -> dict[str, Any]:
    """The PipelineSpec of the source checkpoint, read from its configs."""
    from dataclasses import asdict

    from difflower.reference.spec import spec_from_configs

    return asdict(spec_from_configs(index))


def _common_versions() -> dict[str, str]:
    import transformers

    from difflower.version import __version__

    return {"difflower": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
