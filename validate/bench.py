"""`difflower bench`: one benchmark protocol for the eager reference and every artifact.

For each target, in one process: load time (cold, then again warm or from the backend's
cache), per-component latency (each text encoder, one denoiser call, the VAE decoder) as the
median and spread of R runs after warm-up, interleaved across targets so all see the same
machine state, end-to-end latency of an N-step txt2img run, resident memory after loading,
size on disk, and parity (export-time component parity, and the end-to-end run's final
latents and image against the eager reference's, same seed). The report states the machine,
library versions, shapes and precision.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.manifest import Bucket, ComponentRecord, Manifest


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model and cores, memory, GPU if any, and the versions of the libraries that matter."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    packages = ("torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf", "coremltools", "tensorrt")
    info["versions"] = {p: v for p in (*packages, "difflower") if (v := _version(p)) is not None}
    return info


def _rss_gib() -> float:
    """Current resident set size (peak RSS never goes down, so it cannot attribute per target)."""
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
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


@dataclass
class Target:
    """One thing benchmarked: the eager reference or an artifact."""

    name: str
    path: Path
    kind: str  # "reference" or the artifact's backend
    pipe: Any = None
    engines: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def _reference_engines(pipe: Any, path: Path) -> dict[str, Any]:
    """The eager pipeline's own modules behind the engine interface (no second copy of the weights)."""
    from difflower.exporters.specs import component_specs, wrap_module
    from difflower.reference.loading import read_model_index
    from difflower.runtimes.torch_engine import TorchEngine

    engines = {}
    for spec in component_specs(read_model_index(path)):
        if spec.kind == "vae_encoder":
            continue  # txt2img does not encode images
        model = pipe.calls.components["vae" if spec.kind == "vae_decoder" else spec.source]
        config = {"class_name": spec.class_name, "source": spec.source, **spec.facts}
        record = ComponentRecord(spec.name, spec.kind, [], list(spec.inputs), list(spec.outputs), config=config)
        engines[spec.name] = TorchEngine(record, wrap_module(spec, model))
    return engines


def _load(target: Target, engine_options: dict[str, Any]) -> None:
    """Load `target` (timed by the caller) as a pipeline plus its component engines."""
    import difflower

    if target.kind == "reference":
        target.pipe = difflower.load(target.path)
        target.engines = _reference_engines(target.pipe, target.path)
    else:
        target.pipe = difflower.load(target.path, **engine_options)
        target.engines = {n: e for n, e in target.pipe.calls.engines.items() if n != "vae_encoder"}


def _time(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


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
) -> dict[str, Any]:
    """Benchmark `artifacts` (and the eager `reference`) under one protocol; returns the JSON report."""
    from difflower.exporters.specs import ShapePlan, example_inputs
    from difflower.validate.gates import image_verdict, trajectory_verdict
    from difflower.validate.metrics import compare

    targets = [Target("eager", Path(reference), "reference")] if reference is not None else []
    for path in artifacts:
        manifest = Manifest.read(path)
        targets.append(Target(Path(path).name, Path(path), manifest.backend))
    if not targets:
        from difflower.errors import ArgumentError

        raise ArgumentError("ARTIFACT", "give at least one artifact or --reference")

    # 1. load each target twice: cold, then warm (OpenVINO from its model cache, others from the OS cache)
    cache_dir = tempfile.mkdtemp(prefix="difflower-bench-cache-")
    for target in targets:
        options = {"cache_dir": cache_dir} if target.kind == "openvino" else {}
        cold = _time(lambda t=target, o=options: _load(t, o), 1)[0]
        target.pipe = target.engines = None
        gc.collect()
        warm = _time(lambda t=target, o=options: _load(t, o), 1)[0]
        target.result["load_s"] = {"cold": cold, "warm": warm}
        target.result["rss_after_load_gib"] = round(_rss_gib(), 2)
        target.result["size_bytes"] = _size_on_disk(target.path, weights_only=target.kind == "reference")

    # 2. shapes: the first static artifact's bucket, else the checkpoint's native size at one image
    spec = targets[0].pipe.spec
    buckets = [b for t in targets if t.kind != "reference" for b in Manifest.read(t.path).buckets]
    bucket = buckets[0] if buckets else Bucket(1, spec.sample_size * spec.vae_scale_factor,
                                                spec.sample_size * spec.vae_scale_factor)  # fmt: skip
    dims = ShapePlan().dims(bucket, spec.vae_scale_factor)

    # 3. per-component latency, interleaved across targets
    from difflower.exporters.specs import spec_for_record

    inputs: dict[str, dict[str, torch.Tensor]] = {}
    for target in targets:
        for name, engine in target.engines.items():
            inputs.setdefault(name, example_inputs(spec_for_record(engine.record), dims, seed=seed))
    times: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}
    for _ in range(warmup):
        for target in targets:
            for name, engine in target.engines.items():
                engine(inputs[name])
    for _ in range(runs):
        for target in targets:
            for name, engine in target.engines.items():
                times[target.name].setdefault(name, []).extend(_time(lambda e=engine, n=name: e(inputs[n]), 1))
    for target in targets:
        target.result["components"] = {
            name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
            for name, t in times[target.name].items()
        }

    # 4. end to end, same prompt and seed; parity against the reference run
    kwargs = dict(prompt=[prompt] * bucket.batch, num_inference_steps=steps, height=bucket.height,
                  width=bucket.width, output_type="np", return_trajectory=True, progress=progress)  # fmt: skip
    reference_run = None
    for target in targets:
        if target.kind != "reference" and Manifest.read(target.path).missing_for_generation():
            held = ", ".join(Manifest.read(target.path).components)
            target.result["end_to_end_s"] = None
            target.result["not_run"] = f"not run (the artifact holds {held} only)"
            continue
        start = time.perf_counter()
        out = target.pipe(generator=torch.Generator().manual_seed(seed), **kwargs)
        target.result["end_to_end_s"] = time.perf_counter() - start
        target.result["denoiser_calls"] = len(out.trajectory)
        if target.kind == "reference":
            reference_run = out
            continue
        manifest = Manifest.read(target.path)
        target.result["precision"] = manifest.precision
        target.result["export_parity"] = {n: r.parity.get("summary") for n, r in manifest.components.items()}
        if reference_run is not None:
            latents = compare(out.trajectory[-1], reference_run.trajectory[-1])
            image = compare(np.asarray(out.images), np.asarray(reference_run.images))
            final = trajectory_verdict(manifest.precision, out.trajectory[-1], reference_run.trajectory[-1], latents)
            target.result["parity"] = {
                "final_latents": {**latents.to_json(), **final.to_json()},
                "image": {**image.to_json(), **image_verdict(manifest.precision, image).to_json()},
            }

    baseline = targets[0].result if targets[0].kind == "reference" else None
    for target in targets:
        if baseline is not None and target.result["end_to_end_s"] is not None:
            target.result["end_to_end_vs_eager"] = target.result["end_to_end_s"] / baseline["end_to_end_s"]
        if baseline is not None:
            target.result["components_vs_eager"] = {
                n: c["median_s"] / baseline["components"][n]["median_s"]
                for n, c in target.result["components"].items()
                if n in baseline["components"]
            }
    return {
        "machine": machine_info(),
        "settings": {
            "bucket": str(bucket),
            "steps": steps,
            "runs": runs,
            "warmup": warmup,
            "prompt": prompt,
            "seed": seed,
            "cfg_denoiser_batch": dims["denoiser_batch"],
        },  # fmt: skip
        "targets": {t.name: {"path": str(t.path), "kind": t.kind, **t.result} for t in targets},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def render(report: dict[str, Any]) -> str:
    """A readable table of the report."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"difflower bench: {s['bucket']} (BxHxW), {s['steps']} steps, median of {s['runs']} after {s['warmup']} "
        f"warm-up; {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else ""),
        "  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
    ]
    targets = report["targets"]
    components = sorted({c for t in targets.values() for c in t["components"]})
    header = f"  {'target':<22} {'load cold/warm s':>17} {'MB':>8}" + "".join(f" {c[:14]:>15}" for c in components)
    lines.append(header + f" {'end-to-end s':>13}  parity (final latents / image)")
    for name, t in targets.items():
        load = f"{t['load_s']['cold']:.1f}/{t['load_s']['warm']:.1f}"
        row = f"  {name[:22]:<22} {load:>17} {t['size_bytes'] / 2**20:>8.1f}"
        for c in components:
            value = t["components"].get(c)
            ratio = t.get("components_vs_eager", {}).get(c)
            cell = "-" if value is None else f"{value['median_s'] * 1000:.1f}ms" + (f" {ratio:.2f}x" if ratio else "")
            row += f" {cell:>15}"
        if t["end_to_end_s"] is None:
            lines.append(row)
            lines.append(f"  {'':<22} end to end: {t['not_run']}")
            continue
        e2e = f"{t['end_to_end_s']:.2f}" + (f" {t['end_to_end_vs_eager']:.2f}x" if "end_to_end_vs_eager" in t else "")
        parity = ""
        if "parity" in t:
            f, i = t["parity"]["final_latents"], t["parity"]["image"]
            psnr = "inf" if i["psnr"] is None else f"{i['psnr']:.1f} dB"
            parity = f"{'ok' if f['passed'] else 'MISSED'} / {psnr} {'ok' if i['passed'] else 'MISSED'}"
        lines.append(row + f" {e2e:>13}  {parity}")
    lines.append(f"\n  peak RSS {report['peak_rss_gib']} GiB")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path | str) -> Path:
    """A PNG bar chart: latency per component per target, with eager as the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = report["targets"]
    components = sorted({c for t in targets.values() for c in t["components"]})
    width = 0.8 / max(len(targets), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(components)), 4))
    for i, (name, t) in enumerate(targets.items()):
        values = [t["components"].get(c, {}).get("median_s", 0) * 1000 for c in components]
        ax.bar([x + i * width for x in range(len(components))], values, width, label=name)
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(components))], components)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"difflower bench, {report['settings']['bucket']} (BxHxW)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


__all__ = ["bench", "machine_info", "plot", "render"]
