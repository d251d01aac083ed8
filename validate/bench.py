"""`difflower bench`: one benchmark protocol for the eager reference and every artifact.

For each target, in one process: load time (cold, then again warm or from the backend's
cache), per-component latency (each text encoder, one denoiser call, the VAE decoder) as the
median and spread of R runs after warm-up, interleaved across targets so all see the same
machine state, end-to-end latency of an N-step txt2img run, resident memory after loading,
size on disk, and parity (export-time component parity, and the end-to-end run's final
latents and image against the eager reference's, same seed). The report states the machine,
its instruction sets, the library versions, shapes and precision.

`interleaved` is the one timing harness: the scripts under `benchmarks/` use it too.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from difflower.artifact.manifest import ComponentRecord, Manifest, recorded_controlnets
from difflower.artifact.specs import ShapePlan, component_specs, example_inputs, spec_for_record, wrap_module
from difflower.errors import ArgumentError
from difflower.machine import machine_record
from difflower.reference.control import edge_pattern
from difflower.reference.loading import read_model_index, resolve_controlnet
from difflower.reference.pipeline import load_pipeline
from difflower.reference.single_file import resolve_model
from difflower.runtimes.pipeline import load_artifact
from difflower.runtimes.torch_engine import TorchEngine
from difflower.validate.gates import image_verdict, trajectory_verdict
from difflower.validate.metrics import compare

K = TypeVar("K")
PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf", "coremltools", "tensorrt", "difflower")


# -- the timing harness ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs of one thing: the median and the spread."""

    median_s: float
    min_s: float
    max_s: float
    runs: int
    samples: tuple[float, ...] = ()

    @staticmethod
    def of(samples: list[float]) -> Timing:
        return Timing(statistics.median(samples), min(samples), max(samples), len(samples), tuple(samples))

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s, "runs": self.runs}


def interleaved(runners: dict[K, Callable[[], object]], runs: int, warmup: int = 1) -> dict[K, Timing]:
    """Time each runner `runs` times after `warmup` calls, interleaved (A B C A B C ...) so every
    runner sees the same machine state; returns each one's Timing."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    samples: dict[K, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(values) for name, values in samples.items()}


def timed(run: Callable[[], object]) -> float:
    """Seconds one call of `run` takes."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def machine_info() -> dict[str, Any]:
    """CPU model, cores and instruction sets, memory, GPU if any, and the library versions."""
    info: dict[str, Any] = machine_record()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["versions"] = {p: v for p in PACKAGES if (v := _version(p)) is not None}
    return info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _rss_gib() -> float:
    """Current resident set size (peak RSS never goes down, so it cannot attribute per target)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _size_on_disk(folder: Path, weights_only: bool) -> int:
    files = (p for p in folder.rglob("*") if p.is_file())
    if weights_only:  # a checkpoint: its weight files
        files = (p for p in files if p.suffix == ".safetensors")
    return sum(p.stat().st_size for p in files)


# -- the report ------------------------------------------------------------------------------------


@dataclass
class TargetResult:
    """Everything measured for one target: the eager reference or an artifact."""

    path: str
    kind: str  # "reference" or the artifact's backend
    load_s: dict[str, float] = field(default_factory=dict)  # cold, warm
    rss_after_load_gib: float = 0.0
    size_bytes: int = 0
    components: dict[str, Timing] = field(default_factory=dict)
    components_vs_eager: dict[str, float] = field(default_factory=dict)
    end_to_end_s: float | None = None
    end_to_end_vs_eager: float | None = None
    not_run: str | None = None  # why the end-to-end run was skipped (a partial artifact)
    denoiser_calls: int | None = None
    precision: str | None = None
    export_parity: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)  # final_latents, image: metrics and verdicts

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["components"] = {name: t.to_json() for name, t in self.components.items()}
        return out


@dataclass
class BenchReport:
    """The whole benchmark: machine, settings and each target's results."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    targets: dict[str, TargetResult]
    peak_rss_gib: float

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "targets": {name: t.to_json() for name, t in self.targets.items()},
            "peak_rss_gib": self.peak_rss_gib,
        }


@dataclass
class _Target:
    """A target while it is benchmarked: its pipeline and component engines."""

    name: str
    path: Path
    manifest: Manifest | None  # None for the eager reference
    result: TargetResult
    pipe: Any = None
    engines: dict[str, Any] = field(default_factory=dict)


def _reference_engines(pipe: Any, path: Path, controlnets: list[Path]) -> dict[str, Any]:
    """The eager pipeline's own modules behind the engine interface (no second copy of the weights)."""
    engines = {}
    index = read_model_index(path)
    for spec in component_specs(index, [resolve_controlnet(c, index) for c in controlnets]):
        if spec.kind == "vae_encoder":
            continue  # txt2img does not encode images
        key = {"vae_decoder": "vae", "controlnet": spec.name}.get(spec.kind, spec.source)
        model = pipe.calls.components[key]
        config = {"class_name": spec.class_name, "source": spec.source, **spec.facts}
        record = ComponentRecord(spec.name, spec.kind, [], list(spec.inputs), list(spec.outputs), config=config)
        engines[spec.name] = TorchEngine(record, wrap_module(spec, model))
    return engines


def _load(target: _Target, engine_options: dict[str, Any], controlnets: list[Path]) -> None:
    """Load `target` (timed by the caller) as a pipeline plus its component engines; the eager
    reference gets the artifacts' ControlNets."""
    if target.manifest is None:
        target.pipe = load_pipeline(target.path, controlnets=controlnets)
        target.engines = _reference_engines(target.pipe, target.path, controlnets)
    else:
        target.pipe = load_artifact(target.path, **engine_options)
        target.engines = {n: e for n, e in target.pipe.engines.items() if n != "vae_encoder"}


def bench(
    artifacts: list[Path | str],
    reference: Path | str | None = None,
    *,
    steps: int = 4,
    runs: int = 3,
    warmup: int = 1,
    prompt: str = "a watercolor painting of a lighthouse at sunset",
    seed: int = 0,
    progress: bool = False,
) -> BenchReport:
    """Benchmark `artifacts` (and the eager `reference`) under one protocol."""
    if runs < 1 or warmup < 0:
        raise ArgumentError("--runs", f"needs at least 1 timed run and 0 or more warm-ups, got {runs} and {warmup}")
    targets = []
    if reference is not None:
        folder, _ = resolve_model(reference)
        targets.append(_Target("eager", folder, None, TargetResult(str(reference), "reference")))
    for path in artifacts:
        manifest = Manifest.read(path)
        targets.append(_Target(Path(path).name, Path(path), manifest, TargetResult(str(path), manifest.backend)))
    if not targets:
        raise ArgumentError("ARTIFACT", "give at least one artifact or --reference")

    # 1. load each target twice: cold, then warm (OpenVINO from its model cache, others from the OS cache)
    cache_dir = tempfile.mkdtemp(prefix="difflower-bench-cache-")
    with_control = [t.manifest for t in targets if t.manifest is not None and t.manifest.source.get("controlnets")]
    controlnets = recorded_controlnets(with_control[0]) if with_control else []
    for target in targets:
        options = {"cache_dir": cache_dir} if target.result.kind == "openvino" else {}
        cold = timed(partial(_load, target, options, controlnets))
        target.pipe, target.engines = None, {}
        gc.collect()
        warm = timed(partial(_load, target, options, controlnets))
        target.result.load_s = {"cold": cold, "warm": warm}
        target.result.rss_after_load_gib = round(_rss_gib(), 2)
        target.result.size_bytes = _size_on_disk(target.path, weights_only=target.manifest is None)

    # 2. shapes: the first static artifact's bucket, else the checkpoint's native size at one image
    spec = targets[0].pipe.spec
    buckets = [b for t in targets if t.manifest is not None for b in t.manifest.buckets]
    bucket = ShapePlan(tuple(buckets[:1])).parity_bucket(spec.native_size)
    dims = ShapePlan().dims(bucket, spec.vae_scale_factor)

    # 3. per-component latency, interleaved across targets
    inputs: dict[str, dict[str, torch.Tensor]] = {}
    runners: dict[tuple[str, str], Callable[[], object]] = {}
    for target in targets:
        for name, engine in target.engines.items():
            inputs.setdefault(name, example_inputs(spec_for_record(engine.record), dims, seed=seed))
            runners[(target.name, name)] = partial(engine, inputs[name])
    for (target_name, component), timing in interleaved(runners, runs, warmup).items():
        next(t for t in targets if t.name == target_name).result.components[component] = timing

    # 4. end to end, same prompt and seed; parity against the reference run
    kwargs: dict[str, Any] = dict(
        prompt=[prompt] * bucket.batch,
        num_inference_steps=steps,
        height=bucket.height,
        width=bucket.width,
        output_type="np",
        return_trajectory=True,
        progress=progress,
    )
    reference_run = None
    for target in targets:
        result, recorded = target.result, target.manifest
        if recorded is not None and recorded.missing_for_generation():
            result.not_run = f"not run (the artifact holds {', '.join(recorded.components)} only)"
            continue
        control = target.pipe.spec.controlnets  # the same edge pattern into every target's ControlNets
        extra = {"control_image": edge_pattern(bucket.height, bucket.width, control)} if control else {}
        start = time.perf_counter()
        out = target.pipe(generator=torch.Generator().manual_seed(seed), **kwargs, **extra)
        result.end_to_end_s = time.perf_counter() - start
        result.denoiser_calls = len(out.trajectory)
        if recorded is None:
            reference_run = out
            continue
        result.precision = recorded.precision
        result.export_parity = {n: r.parity.summary for n, r in recorded.components.items()}
        if reference_run is not None:
            latents = compare(out.trajectory[-1], reference_run.trajectory[-1])
            image = compare(np.asarray(out.images), np.asarray(reference_run.images))
            final = trajectory_verdict(recorded.precision, out.trajectory[-1], reference_run.trajectory[-1], latents)
            result.parity = {
                "final_latents": {**latents.to_json(), **final.to_json()},
                "image": {**image.to_json(), **image_verdict(recorded.precision, image).to_json()},
            }

    # 5. ratios against the eager reference
    baseline = targets[0].result if targets[0].manifest is None else None
    for target in targets:
        result = target.result
        if baseline is None:
            continue
        if result.end_to_end_s is not None and baseline.end_to_end_s:
            result.end_to_end_vs_eager = result.end_to_end_s / baseline.end_to_end_s
        result.components_vs_eager = {
            n: c.median_s / baseline.components[n].median_s
            for n, c in result.components.items()
            if n in baseline.components
        }
    return BenchReport(
        machine=machine_info(),
        settings={
            "bucket": str(bucket),
            "steps": steps,
            "runs": runs,
            "warmup": warmup,
            "prompt": prompt,
            "seed": seed,
            "cfg_denoiser_batch": dims["denoiser_batch"],
        },
        targets={t.name: t.result for t in targets},
        peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    )


def render(report: BenchReport) -> str:
    """A readable table of the report."""
    m, s = report.machine, report.settings
    lines = [
        f"difflower bench: {s['bucket']} (BxHxW), {s['steps']} steps, median of {s['runs']} after {s['warmup']} "
        f"warm-up; {m['cpu']}, {m['cores']} cores ({' '.join(m.get('cpu_flags', [])) or 'flags unknown'})"
        + (f", {m['gpu']}" if m.get("gpu") else ""),
        "  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
    ]
    targets = report.targets
    components = sorted({c for t in targets.values() for c in t.components})
    header = f"  {'target':<22} {'load cold/warm s':>17} {'MB':>8}" + "".join(f" {c[:14]:>15}" for c in components)
    lines.append(header + f" {'end-to-end s':>13}  parity (final latents / image)")
    for name, t in targets.items():
        load = f"{t.load_s['cold']:.1f}/{t.load_s['warm']:.1f}"
        row = f"  {name[:22]:<22} {load:>17} {t.size_bytes / 2**20:>8.1f}"
        for c in components:
            value, ratio = t.components.get(c), t.components_vs_eager.get(c)
            cell = "-" if value is None else f"{value.median_s * 1000:.1f}ms" + (f" {ratio:.2f}x" if ratio else "")
            row += f" {cell:>15}"
        if t.end_to_end_s is None:
            lines += [row, f"  {'':<22} end to end: {t.not_run}"]
            continue
        against = f" {t.end_to_end_vs_eager:.2f}x" if t.end_to_end_vs_eager is not None else ""
        e2e = f"{t.end_to_end_s:.2f}{against}"
        parity = ""
        if t.parity:
            f, i = t.parity["final_latents"], t.parity["image"]
            psnr = "inf" if i["psnr"] is None else f"{i['psnr']:.1f} dB"
            parity = f"{'ok' if f['passed'] else 'MISSED'} / {psnr} {'ok' if i['passed'] else 'MISSED'}"
        lines.append(row + f" {e2e:>13}  {parity}")
    lines.append(f"\n  peak RSS {report.peak_rss_gib} GiB")
    return "\n".join(lines)


def plot(report: BenchReport, path: Path | str) -> Path:
    """A PNG bar chart: latency per component per target, with eager as the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = report.targets
    components = sorted({c for t in targets.values() for c in t.components})
    width = 0.8 / max(len(targets), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(components)), 4))
    for i, (name, t) in enumerate(targets.items()):
        values = [t.components[c].median_s * 1000 if c in t.components else 0 for c in components]
        ax.bar([x + i * width for x in range(len(components))], values, width, label=name)
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(components))], components)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"difflower bench, {report.settings['bucket']} (BxHxW)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


__all__ = ["BenchReport", "Timing", "bench", "interleaved", "machine_info", "plot", "render", "timed"]
