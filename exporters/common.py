"""What every backend's export shares: the options, the plan, and writing one component.

A backend only says how to write one component (`BackendExporter`); this module does the rest
of the writing, identically for every backend:

1. `plan_export`: read the checkpoint, fix the shapes (dynamic, static buckets with the CFG
   doubling, or a static-only backend's one default bucket) and check every option, before
   anything is written;
2. `write_component`, per component: load the reference module, run it on seeded inputs (the
   expected outputs), apply the module-level passes, let the backend write its files, free the
   module, and describe the files in a ComponentRecord.

Checking what was written (through the runtime engine that `generate` uses) and the folder that
is renamed into place only when everything is written are the export driver's
(`difflower.driver`): it sits above runtimes and validate, which this stage may not import.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from difflower.artifact.manifest import (
    Bucket,
    ComponentRecord,
    Manifest,
    controlnet_records,
    lora_records,
    source_record,
)
from difflower.artifact.precision import Precision, StoragePrecision, parse_storage_precision, quantized_precision
from difflower.artifact.specs import (
    STREAMABLE,
    ComponentSpec,
    ShapePlan,
    component_specs,
    concrete,
    example_inputs,
    export_skeleton,
    load_export_module,
)
from difflower.errors import ArgumentError, DifflowerError
from difflower.graph_passes.attention_variant import apply_attention_variant
from difflower.graph_passes.base import PassResult, measured
from difflower.graph_passes.calibration import DENOISERS
from difflower.graph_passes.fuse_qkv import fuse_qkv
from difflower.graph_passes.lora_slots import SLOTTED, with_lora_slots
from difflower.machine import machine_record
from difflower.reference.loading import (
    ControlNetSource,
    ModelIndex,
    read_flux_config,
    read_model_index,
    read_sd3_config,
    resolve_controlnet,
    support_files,
)
from difflower.reference.lora import Lora, check_components
from difflower.reference.spec import PipelineSpec, spec_from_configs
from difflower.reference.step_cache import CacheGraphs
from difflower.reference.streaming import streamed_forward
from difflower.version import __version__


class ExportParityError(DifflowerError):
    """An exported component missed its parity gate; nothing was written."""


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export was asked for; backends read `extra` for their own settings."""

    components: tuple[str, ...] = ()
    buckets: tuple[Bucket, ...] = ()
    precision: StoragePrecision = "fp32"
    attention: str = "sdpa"
    fuse_qkv: bool = False  # the fuse_qkv module pass on the denoiser
    cfg: bool = True
    t5_sequence_length: int = 256  # the T5 window the shapes are planned for (SD3's default; Flux: 512)
    allow_mismatch: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    loras: tuple[Lora, ...] = ()  # fused into the denoiser and text encoders before export
    controlnets: tuple[str, ...] = ()  # ControlNet folders or Hub repo ids exported beside the UNet
    cache_graphs: CacheGraphs | None = None  # --cache-graphs: the extra graphs a step cache needs
    lora_slots: int | None = None  # --lora-slots RANK: the denoiser's LoRA matrices as inputs (ONNX)
    stream_weights: bool = False  # --stream-weights: the transformer traced without weights, written from the files
    source_root: Path | None = None  # set by plan_export: the checkpoint folder being exported

    def __post_init__(self) -> None:
        parse_storage_precision(self.precision)

    @property
    def plan(self) -> ShapePlan:
        return ShapePlan(self.buckets, cfg=self.cfg, t5_sequence_length=self.t5_sequence_length)

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
    def effective_precision(self) -> Precision:
        """What the gates judge: the storage precision, or the quantization asked for."""
        quantize = self.extra.get("quantize")
        return quantized_precision(quantize) if quantize else self.precision


@dataclass
class ComponentExport:
    """What a backend reports for one component it wrote."""

    passes: list[PassResult] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


class BackendExporter(Protocol):
    """One backend's part of an export.

    A backend that can only build fixed shapes (a traced or compiled graph) may also set a class
    attribute `static_only = True`: with no --static it then gets the checkpoint's native size at
    one image as its one static bucket, recorded as such in the manifest. A backend that can write
    a component from a meta-device skeleton (`reference.streaming.Skeleton`) has a method
    `export_streamed(skeleton, inputs, spec, folder, options)` and takes --stream-weights.
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

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this backend used."""
        ...


def parse_buckets(static: Any) -> tuple[Bucket, ...]:
    return tuple(b if isinstance(b, Bucket) else Bucket.parse(b) for b in static)


@dataclass(frozen=True)
class ExportPlan:
    """An export checked before anything is written: what, at which shapes, from where."""

    backend: BackendExporter
    index: ModelIndex
    pipeline: PipelineSpec
    options: ExportOptions  # with the buckets settled and the source root set
    specs: list[ComponentSpec]  # the components to export
    every: list[ComponentSpec]  # the components of the whole pipeline
    controlnets: tuple[ControlNetSource, ...] = ()

    @property
    def parity_bucket(self) -> Bucket:
        return self.options.plan.parity_bucket(self.pipeline.native_size)

    def draft_manifest(self) -> Manifest:
        """The manifest before any component is written (engines read it while parity is measured)."""
        return Manifest(
            family=self.index.family,
            backend=self.backend.name,
            precision=self.options.effective_precision,
            source={
                **source_record(self.index.root),
                **({"loras": lora_records(self.options.loras)} if self.options.loras else {}),
                **({"controlnets": controlnet_records(self.controlnets)} if self.controlnets else {}),
            },
            pipeline=asdict(self.pipeline),
            components={},
            shapes=self.options.plan.to_json(),
            versions={**_common_versions(), **self.backend.versions()},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            pipeline_components=[s.name for s in self.every],
            machine=machine_record(),
        )


TRANSFORMER_LABELS = {"sd3": "SD3", "flux": "Flux"}


def _slotted(
    backend: BackendExporter, options: ExportOptions, every: list[ComponentSpec], root: Path
) -> list[ComponentSpec]:
    """The denoiser's spec with its LoRA slot inputs; what slots cannot be combined with, refused."""
    rank = options.lora_slots
    if getattr(backend, "name", None) != "onnx":
        raise ArgumentError("--lora-slots", "LoRA slots are ONNX Runtime inputs: export with --backend onnx")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1024:
        raise ArgumentError("--lora-slots", f"takes the slots' rank, an integer in [1, 1024], got {rank!r}")
    clash = [
        flag
        for flag, on in (
            ("--fuse-qkv", options.fuse_qkv),
            ("--cache-graphs", options.cache_graphs is not None),
            ("--controlnet", bool(options.controlnets)),
            ("--precision fp16", options.precision != "fp32"),
            ("--quantize", bool(options.extra.get("quantize"))),
        )
        if on
    ]
    if clash:
        raise ArgumentError("--lora-slots", f"is not combined with {', '.join(clash)} yet; export without it")
    return [with_lora_slots(s, root, rank) if s.kind in SLOTTED else s for s in every]


def plan_export(backend: BackendExporter, model: Path | str, options: ExportOptions) -> ExportPlan:
    """Read checkpoint `model`, settle the shapes and check every option for `backend`."""
    index = read_model_index(model)
    pipeline = spec_from_configs(index)
    if index.family == "flux":  # distilled guidance: no doubled batch; FluxPipeline's T5 window
        options = replace(options, cfg=False, t5_sequence_length=512)
    controlnets = tuple(resolve_controlnet(source, index) for source in options.controlnets)
    if controlnets:
        pipeline = replace(
            pipeline,
            controlnets=len(controlnets),
            controlnet_pools_conditions=controlnets[0].config.global_pool_conditions,
        )
    if not options.buckets and getattr(backend, "static_only", False):
        native = pipeline.native_size
        options = replace(options, buckets=(Bucket(1, native, native),))
    for bucket in options.buckets:
        multiple = pipeline.size_multiple
        if bucket.height % multiple or bucket.width % multiple:
            raise ArgumentError("--static", f"{bucket}: height and width must be multiples of {multiple}")
    graphs = options.cache_graphs
    if graphs is not None and graphs.kind == "deepcache":
        if pipeline.is_transformer:
            label = TRANSFORMER_LABELS[index.family]
            raise ArgumentError("--cache-graphs", f"deepcache splits a UNet; {label} is a transformer: use first-block")
        if controlnets:
            raise ArgumentError("--cache-graphs", "deepcache with ControlNets is not supported yet; drop one of them")
    if graphs is not None and graphs.kind == "first-block":
        if not pipeline.is_transformer:
            raise ArgumentError("--cache-graphs", "first-block caches a transformer's blocks; for a UNet use deepcache")
        read = read_flux_config if index.family == "flux" else read_sd3_config
        if read(index.root / "transformer").blocks_after_first < 1:
            raise ArgumentError("--cache-graphs", "first-block needs a transformer of two blocks or more")
    try:
        every = component_specs(index, controlnets, graphs)
    except ValueError as err:
        raise ArgumentError("--cache-graphs", str(err)) from None
    if options.lora_slots is not None:
        every = _slotted(backend, options, every, index.root)
    if options.stream_weights:
        _check_streamed(backend, options, every)
    check_components(options.loras, set(index.components))
    options = replace(options, source_root=index.root)
    backend.check_options(options, index)
    return ExportPlan(backend, index, pipeline, options, _select(every, options.components), every, controlnets)


def _check_streamed(backend: BackendExporter, options: ExportOptions, every: list[ComponentSpec]) -> None:
    """What --stream-weights cannot do, refused before anything is written."""
    if not hasattr(backend, "export_streamed"):
        raise ArgumentError(
            "--stream-weights", f"{backend.name} cannot write streamed weights yet; use onnx or openvino"
        )
    if not any(s.class_name in STREAMABLE for s in _select(every, options.components)):
        raise ArgumentError(
            "--stream-weights", "streams a Flux or SD3 transformer's weights; no component exported here has one"
        )
    if not options.plan.static and any(s.class_name == "SD3Transformer2DModel" for s in every):
        # a dynamo-traced SD3 graph's symbolic centre crop of its position table took one column
        # too many at 32x48 (traced at 64x64); at static shapes the crop is traced concrete
        raise ArgumentError("--stream-weights", "SD3 streams at fixed shapes: add --static BxHxW")
    clash = [
        flag
        for flag, on in (
            ("--fuse-qkv", options.fuse_qkv),
            ("--lora", bool(options.loras)),
            ("--lora-slots", options.lora_slots is not None),
            (f"--attention {options.attention}", options.attention != "sdpa"),
        )
        if on
    ]
    if clash:
        raise ArgumentError("--stream-weights", f"is not combined with {', '.join(clash)} yet; export without it")


def _select(specs: list[ComponentSpec], names: tuple[str, ...]) -> list[ComponentSpec]:
    if not names:
        return specs
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ArgumentError("--components", f"unknown {', '.join(unknown)}; this checkpoint has {', '.join(known)}")
    return [s for s in specs if s.name in names]


def copy_support_files(index: ModelIndex, out: Path) -> None:
    """The files the runtime pipeline reads besides the exported components, and nothing else
    (a config's `auto_map` code, for one, stays behind)."""
    for relative in support_files(index):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(index.root / relative, out / relative)


@dataclass
class WrittenComponent:
    """One component on disk, with the inputs and reference outputs its parity is measured on."""

    record: ComponentRecord  # its parity is filled in by the export driver
    passes: list[PassResult]
    inputs: dict[str, torch.Tensor]
    expected: tuple[torch.Tensor, ...]


def write_component(plan: ExportPlan, spec: ComponentSpec, out: Path) -> WrittenComponent:
    """Export one component into `out / spec.name`; the reference module lives only while needed."""
    options, backend = plan.options, plan.backend
    start = time.perf_counter()
    folder = out / spec.name
    folder.mkdir()
    dims = options.plan.dims(plan.parity_bucket, plan.pipeline.vae_scale_factor)
    inputs = example_inputs(spec, dims)
    if options.stream_weights and spec.class_name in STREAMABLE:
        written, expected = _write_streamed(plan, spec, inputs, folder)
        return _written(plan, spec, out, dims, start, written, written.passes, inputs, expected)
    module = load_export_module(spec, plan.index.root, options.loras)

    # 1. the reference outputs first, so the module can be freed before the backend's files are
    #    loaded; module passes then record their own parity against them
    with torch.no_grad():
        expected = tuple(module(*inputs.values()))
    applied: list[PassResult] = []
    if spec.kind != "text_encoder" and options.attention != "sdpa":  # text encoders are transformers' modules
        result = apply_attention_variant(module, options.attention, where=spec.name)
        applied.append(measured(result, module, inputs, expected))
    if options.fuse_qkv and spec.kind in DENOISERS:
        result = fuse_qkv(module, where=spec.name)
        applied.append(measured(result, module, inputs, expected, key="max_abs_vs_unfused"))

    # 2. the backend's files, and the model's config beside them, as optimum lays components out
    #    (optimum's and optimum-intel's pipelines and OpenVINO GenAI read <component>/config.json)
    written = backend.export_component(module, inputs, spec, folder, options)
    applied += written.passes
    del module
    gc.collect()
    return _written(plan, spec, out, dims, start, written, applied, inputs, expected)


def _write_streamed(
    plan: ExportPlan, spec: ComponentSpec, inputs: dict[str, torch.Tensor], folder: Path
) -> tuple[ComponentExport, tuple[torch.Tensor, ...]]:
    """`--stream-weights`: the reference outputs from a forward that reads one layer's weights at
    a time, then the backend's files from the weightless skeleton."""
    sk = export_skeleton(spec, plan.index.root)
    with streamed_forward(sk) as module, torch.no_grad():
        expected = tuple(module(*inputs.values()))
    return plan.backend.export_streamed(sk, inputs, spec, folder, plan.options), expected  # type: ignore[attr-defined]


def _written(
    plan: ExportPlan,
    spec: ComponentSpec,
    out: Path,
    dims: dict[str, int],
    start: float,
    written: ComponentExport,
    applied: list[PassResult],
    inputs: dict[str, torch.Tensor],
    expected: tuple[torch.Tensor, ...],
) -> WrittenComponent:
    """The component's record once its files are in `folder`, with optimum's config.json beside them."""
    options, folder = plan.options, out / spec.name
    shutil.copyfile(plan.index.root / spec.source / "config.json", folder / "config.json")  # absolute: a ControlNet
    files = sorted(str(p.relative_to(out)) for p in folder.rglob("*") if p.is_file())
    record = ComponentRecord(
        name=spec.name,
        kind=spec.kind,
        files=files,
        inputs=[concrete(t, dims) if options.plan.static else t for t in spec.inputs],
        outputs=[concrete(t, dims) if options.plan.static else t for t in spec.outputs],
        export_seconds=round(time.perf_counter() - start, 2),
        size_bytes=sum((out / f).stat().st_size for f in files),
        config={"class_name": spec.class_name, "source": spec.source, **spec.facts, **written.notes},
    )
    return WrittenComponent(record, applied, inputs, expected)


def _common_versions() -> dict[str, str]:
    import transformers

    return {"difflower": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
