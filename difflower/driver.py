"""The export driver: one backend's files, checked through the engine that will run them.

`export` is every stage in order, for every backend the same:

1. plan (`exporters.common.plan_export`): read the checkpoint, settle the shapes, check every
   option, before anything is written;
2. write into a hidden temporary folder (`difflower.atomic`): the files the pipeline reads,
   then per component the backend's files (`exporters.common.write_component`);
3. measure each component's parity through the runtime engine `generate` opens for it
   (`validate.parity.exported_component_parity`): what export checks is what runs;
4. write `difflower.json` and rename the folder into place, unless a gate was missed (then
   nothing is written, or everything with the numbers recorded under `allow_mismatch`).

It sits above runtimes and validate, so the stages below it never import upwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from difflower.artifact.manifest import Manifest, not_an_artifact, record_files
from difflower.atomic import atomic_directory
from difflower.exporters import get_exporter
from difflower.exporters.common import (
    BackendExporter,
    ExportOptions,
    ExportParityError,
    copy_support_files,
    parse_buckets,
    plan_export,
    write_component,
)
from difflower.reference.lora import read_loras
from difflower.reference.single_file import resolve_model
from difflower.reference.step_cache import parse_cache_graphs
from difflower.validate.parity import exported_component_parity


def export(
    model: str | Path,
    backend: str,
    out: str | Path,
    *,
    components: Sequence[str] | None = None,
    static: Sequence[Any] = (),
    precision: str | None = None,
    attention: str = "sdpa",
    fuse_qkv: bool = False,
    cfg: bool = True,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    exporter: BackendExporter | None = None,
    lora: Sequence[str | Path | tuple[str | Path, float]] = (),
    controlnet: Sequence[str | Path] = (),
    cache_graphs: str | None = None,
    lora_slots: int | None = None,
    stream_weights: bool = False,
    **backend_options: Any,
) -> Manifest:
    """Export checkpoint `model` (a folder, or a Hub repo id `org/name[@revision]`) to `backend` at
    `out`; returns the Manifest written.

    `precision` defaults to the backend's own default (fp32; fp16 for coreml).
    `backend_options` are the backend's own settings (e.g. `quantize` for openvino); a backend
    refuses the ones it does not know. `exporter` replaces the backend's exporter object (tests
    give Neuron a CPU stand-in compiler). `lora` fuses LoRA files (`FILE`, `FILE:SCALE` or
    (file, scale)) into the denoiser and text encoders before export; the manifest records them.
    `controlnet` (folders or Hub repo ids) exports each ControlNet as a component, and the UNet
    with their residuals as inputs. `cache_graphs` adds the graphs a step cache needs:
    "deepcache[:branch=K]" (the UNet also returns DeepCache's feature and `unet_shallow` takes it)
    or "first-block" (the transformer also returns its tail residual; `transformer_first` and
    `transformer_tail` are the parts a reusing step runs). `lora_slots` (ONNX) keeps a LoRA of up
    to that rank per attention projection of the denoiser as graph inputs: `difflower.load(ART,
    lora=...)` then runs any LoRA without re-export. `stream_weights` (ONNX, OpenVINO; Flux, SD3
    at static shapes) traces the transformer on the meta device and writes its weights one tensor
    at a time from the checkpoint: its export holds one layer's weights, not the model.
    """
    exporter = exporter or get_exporter(backend)
    options = ExportOptions(
        components=tuple(components or ()),
        buckets=parse_buckets(static),
        precision=precision or getattr(exporter, "default_precision", "fp32"),
        attention=attention,
        fuse_qkv=fuse_qkv,
        cfg=cfg,
        allow_mismatch=allow_mismatch,
        overwrite=overwrite,
        progress=progress,
        extra={k: v for k, v in backend_options.items() if v is not None},
        loras=read_loras(lora),
        controlnets=tuple(str(c) for c in controlnet),
        cache_graphs=parse_cache_graphs(cache_graphs),
        lora_slots=lora_slots,
        stream_weights=stream_weights,
    )
    folder, origin = resolve_model(model)
    plan = plan_export(exporter, folder, options)
    device = str(plan.options.extra.get("device", "cpu"))

    with atomic_directory(out, overwrite, replaceable=not_an_artifact, protected=(plan.index.root,)) as tmp:
        copy_support_files(plan.index, tmp)
        manifest = plan.draft_manifest()
        manifest.source.update(origin or {})  # the Hub repo and commit, or the single file and its sha256
        bar = tqdm(plan.specs, disable=not progress, desc="export", unit="component")
        for spec in bar:
            bar.set_description(f"exporting {spec.name} ({exporter.name})")
            written = write_component(plan, spec, tmp)
            manifest.components[spec.name] = written.record
            manifest.passes += [{"component": spec.name, **p.to_json()} for p in written.passes]
            bar.set_description(f"checking {spec.name} ({exporter.name})")
            written.record.parity = exported_component_parity(
                manifest, tmp, written.record, written.inputs, written.expected, device=device
            )
        bar.close()
        manifest.files = record_files(tmp)
        manifest.write(tmp)
        missed = [r for r in manifest.components.values() if r.parity.passed is False]
        if missed and not allow_mismatch:
            names = ", ".join(f"{r.name} ({r.parity.summary}; gate {r.parity.gate})" for r in missed)
            raise ExportParityError(
                f"export: parity gate missed by {names}; nothing was written. Pass --allow-mismatch to keep the "
                "artifact with these numbers recorded"
            )
    return manifest
