"""Engine `openvino`: an IR component compiled by OpenVINO on CPU, GPU, NPU or AUTO.

Options (`difflower.load(..., engine options)` or `--engine-option KEY=VALUE`):
- `cache_dir`: OpenVINO's compiled-model cache; a second load of the same artifact skips
  compilation (the engine reports `loaded_from_cache`);
- `performance_hint`: `latency` (default) or `throughput`;
- `static`: (batch, height, width) to reshape a dynamic artifact at load, the largest single
  speed-up on OpenVINO CPU; the engine then refuses other sizes, and a static artifact refuses
  any reshape to another size;
- `inference_precision`: `f32` (default on CPU and AUTO), `bf16`, `f16`, or `default` (the
  plugin's own choice).

Every artifact computes in f32 on the CPU unless asked otherwise: the plugin's default is bf16
on CPUs with bf16 units (AVX512-BF16, AMX), which would give other numbers on other machines
and let `generate` compute what the export's parity check did not.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from difflower.artifact.formats import OPENVINO_FILE as XML
from difflower.artifact.manifest import Bucket, ComponentRecord, Manifest
from difflower.artifact.specs import ShapePlan, concrete
from difflower.errors import ArgumentError, CheckpointError
from difflower.runtimes.engine import Array, Engine, refuse_options, to_numpy

DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
INFERENCE_PRECISIONS = ("f32", "bf16", "f16", "default")


@dataclass(frozen=True)
class OpenVINOOptions:
    """The openvino engine's own settings (see the module docstring)."""

    cache_dir: str | None = None
    performance_hint: str = "latency"
    static: Bucket | None = None
    inference_precision: str = "f32"

    @staticmethod
    def parse(options: dict[str, Any]) -> OpenVINOOptions:
        refuse_options("openvino", options, allowed=("cache_dir", "performance_hint", "static", "inference_precision"))
        parsed = OpenVINOOptions(
            cache_dir=options.get("cache_dir"),
            performance_hint=str(options.get("performance_hint", "latency")),
            static=parse_static(options.get("static")),
            inference_precision=str(options.get("inference_precision", "f32")),
        )
        if parsed.performance_hint not in HINTS:
            raise ArgumentError("performance_hint", f"must be {' or '.join(HINTS)}, got {parsed.performance_hint!r}")
        if parsed.inference_precision not in INFERENCE_PRECISIONS:
            known = ", ".join(INFERENCE_PRECISIONS)
            raise ArgumentError("inference_precision", f"must be one of {known}, got {parsed.inference_precision!r}")
        return parsed


def parse_static(value: Any) -> Bucket | None:
    """(b, h, w), "BxHxW" or a Bucket -> Bucket."""
    if value is None or isinstance(value, Bucket):
        return value
    if isinstance(value, str):
        return Bucket.parse(value, "static")
    try:
        batch, height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ArgumentError("static", f"expected (batch, height, width), got {value!r}") from None
    return Bucket(batch, height, width)


class OpenVINOEngine(Engine):
    """One component's IR, compiled on an OpenVINO device."""

    backend = "openvino"

    def __init__(
        self,
        record: ComponentRecord,
        folder: Path,
        manifest: Manifest,
        device: str = "cpu",
        threads: int | None = None,
        options: OpenVINOOptions = OpenVINOOptions(),
    ):
        import openvino as ov

        super().__init__(record)
        self.path = Path(folder) / record.name / XML
        if not self.path.is_file():
            raise CheckpointError(self.path, "not found; the artifact is incomplete, re-export it")
        if device.lower() not in DEVICES:
            raise ArgumentError("--device", f"openvino runs on {', '.join(DEVICES)}; got {device!r}")
        core = ov.Core()
        if options.cache_dir:
            Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(options.cache_dir)})
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as err:
            raise CheckpointError(
                self.path, f"OpenVINO cannot read it ({str(err).splitlines()[0][:200]}); re-export the artifact"
            ) from None
        self.bucket = options.static
        if self.bucket is not None:
            self.record = self._reshaped_record(manifest, self.bucket)
            model.reshape({t.name: list(t.shape) for t in self.record.inputs})
        config: dict[str, Any] = {"PERFORMANCE_HINT": HINTS[options.performance_hint]}
        if options.inference_precision != "default" and device.lower() in ("cpu", "auto"):
            config["INFERENCE_PRECISION_HINT"] = options.inference_precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        start = time.perf_counter()
        self.compiled = core.compile_model(model, DEVICES[device.lower()], config)
        self.compile_seconds = time.perf_counter() - start
        self.loaded_from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE")) if options.cache_dir else False
        # what the plugin settled on (`default` leaves it to the plugin: bf16 on CPUs with bf16 units)
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.compute_precision = {ov.Type.bf16: "bf16", ov.Type.f16: "fp16"}.get(used)
        self._outputs = [(t.name, self.compiled.output(t.name)) for t in self.record.outputs]

    @classmethod
    def open(
        cls, record: ComponentRecord, folder: Path, manifest: Manifest, device: str = "cpu", threads=None, **options
    ) -> OpenVINOEngine:
        return cls(record, folder, manifest, device=device, threads=threads, options=OpenVINOOptions.parse(options))

    def _reshaped_record(self, manifest: Manifest, bucket: Bucket) -> ComponentRecord:
        """The record with every symbolic dim fixed for `bucket` (refusing to re-size a static artifact)."""
        if manifest.buckets and bucket not in manifest.buckets:
            built = ", ".join(str(b) for b in manifest.buckets)
            raise ArgumentError(
                "static", f"this artifact was built static for {built}; it cannot be reshaped to {bucket}"
            )
        dims = ShapePlan.of_manifest(manifest.shapes).dims(bucket, manifest.pipeline["vae_scale_factor"])
        return replace(
            self.record,
            inputs=[concrete(t, dims) for t in self.record.inputs],
            outputs=[concrete(t, dims) for t in self.record.outputs],
        )

    def run(self, inputs: Mapping[str, Array]) -> dict[str, np.ndarray]:
        dtypes = {t.name: t.dtype for t in self.inputs}
        result = self.compiled({name: to_numpy(value, dtypes[name]) for name, value in inputs.items()})
        return {name: result[port] for name, port in self._outputs}


ENGINE = OpenVINOEngine
