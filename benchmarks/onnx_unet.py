"""Real-size ONNX benchmarks (issue 4): random weights, real architecture configs.

    python benchmarks/onnx_unet.py sd15-step   # one CFG UNet step at 512x512: onnxruntime vs torch eager
                                               # (standard ONNX attention and ORT's fused MultiHeadAttention)
    python benchmarks/onnx_unet.py sdxl-export # peak RSS and time of exporting the SDXL base UNet (fp32)

Checkpoints and artifacts are cached under $DIFFLOWER_BENCH_DIR (default /tmp/difflower-bench);
results go to benchmarks/results/*.json with the machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_configs import real_spec  # noqa: E402

from difflower.reference.tiny import make_tiny_checkpoint  # noqa: E402
from difflower.validate.bench import interleaved, machine_info, timed  # noqa: E402

CACHE = Path(os.environ.get("DIFFLOWER_BENCH_DIR", "/tmp/difflower-bench"))
T = TypeVar("T")


def timed_result(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """`fn(*args, **kwargs)`'s result and the seconds it took, by difflower.validate.bench's `timed`."""
    result: list[T] = []
    seconds = timed(lambda: result.append(fn(*args, **kwargs)))
    return result[0], seconds


def checkpoint(family: str) -> Path:
    path = CACHE / f"{family}-random"
    if not (path / "model_index.json").is_file():
        print(f"writing a random-weight {family} checkpoint to {path} ...", flush=True)
        make_tiny_checkpoint(path, spec=real_spec(family), seed=0, overwrite=True)
    return path


def sd15_source(tiny: bool, scratch: Path, out: Path | None, name: str) -> tuple[Path, Path, Path]:
    """(artifact root, checkpoint, result file) of an SD1.5 benchmark: the real-size random-weight
    checkpoint in CACHE and results/NAME.json, or with `tiny` (a smoke test) a tiny checkpoint in
    `scratch` and a temp result file."""
    if tiny:
        return (
            scratch,
            make_tiny_checkpoint(scratch / "tiny-sd", "sd", seed=0),
            out or scratch.parent / f"{name}-tiny.json",
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE, checkpoint("sd15"), out or Path(__file__).resolve().parent / "results" / f"{name}.json"


def write_result(out: Path, result: dict, table: str) -> None:
    """The result JSON at `out`, and its markdown table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table)
    print(f"wrote {out}")


def sd15_step_inputs() -> dict[str, torch.Tensor]:
    """One CFG step of the SD1.5 UNet at 512x512: batch 2, 4x64x64 latents, seeded."""
    gen = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 64, 64, generator=gen),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 77, 768, generator=gen),
    }


def _export_unet(source: Path, artifact: Path, attention: str) -> dict:
    from difflower.driver import export

    if (artifact / "difflower.json").is_file():
        return {}
    manifest, seconds = timed_result(
        export, source, "onnx", artifact, components=["unet"], attention=attention, overwrite=True
    )
    return {"seconds": seconds, "parity": manifest.components["unet"].parity.to_json()}


def sd15_step(runs: int, warmup: int) -> dict:
    """One CFG step of the SD1.5 UNet at 512x512 (batch 2, 4x64x64 latents): torch eager vs ORT
    (standard ONNX attention) vs ORT (its fused MultiHeadAttention), interleaved in one process."""
    from difflower.artifact.manifest import Manifest
    from difflower.reference.loading import load_unet
    from difflower.runtimes.onnxruntime_engine import OnnxRuntimeEngine
    from difflower.validate.metrics import compare

    source = checkpoint("sd15")
    artifacts = {"onnxruntime": CACHE / "sd15-onnx-unet", "onnxruntime_fused_attention": CACHE / "sd15-onnx-unet-mha"}
    exports = {
        "onnxruntime": _export_unet(source, artifacts["onnxruntime"], "sdpa"),
        "onnxruntime_fused_attention": _export_unet(source, artifacts["onnxruntime_fused_attention"], "onnxruntime"),
    }

    inputs = sd15_step_inputs()
    unet = load_unet(source / "unet", torch.float32)

    def eager():
        with torch.no_grad():
            return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample

    runners = {"torch_eager": eager}
    for name, folder in artifacts.items():
        engine = OnnxRuntimeEngine(Manifest.read(folder).components["unet"], folder)
        runners[name] = lambda engine=engine: torch.from_numpy(engine(inputs)["out_sample"])

    # Warm-up: ORT's first calls grow its memory arena (the first timed call after a single
    # warm-up was measured 40% slower than the rest). The first call of each is the first
    # warm-up (its output is kept for parity); then the harness's other warm-ups and the
    # interleaved runs.
    outputs = {name: run() for name, run in runners.items()}
    timings = interleaved(runners, runs, warmup=max(warmup - 1, 0))
    median = {name: t.median_s for name, t in timings.items()}
    return {
        "benchmark": "sd15 unet, one CFG step (batch 2, 4x64x64 latents = 512x512 px), fp32",
        "median_s": median,
        "ratio_vs_torch_eager": {name: median[name] / median["torch_eager"] for name in runners},
        "runs_s": {name: list(t.samples) for name, t in timings.items()},
        "timings": {name: t.to_json() for name, t in timings.items()},
        "warmup_runs": warmup,
        "parity_vs_eager": {
            name: compare(out, outputs["torch_eager"]).to_json()
            for name, out in outputs.items()
            if name != "torch_eager"
        },
        "export": exports,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def sdxl_export() -> dict:
    """Export the real-size SDXL base UNet to ONNX (fp32) in a child process; its peak RSS and time."""
    source = checkpoint("sdxl")
    artifact = CACHE / "sdxl-onnx-unet"
    command = [
        sys.executable, "-m", "difflower.cli", "export", str(source), "--backend", "onnx",
        "--out", str(artifact), "--components", "unet", "--overwrite",
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done, seconds = timed_result(subprocess.run, command, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode != 0:
        raise SystemExit(f"export failed ({done.returncode}):\n{done.stderr[-3000:]}")
    from difflower.artifact.manifest import Manifest

    record = Manifest.read(artifact).components["unet"]
    return {
        "benchmark": "sdxl base unet export to ONNX, fp32, dynamic shapes (incl. the parity run at 1024x1024)",
        "seconds": seconds,
        "peak_rss_gib": max(peak, before) / 2**20,
        "component_export_seconds": record.export_seconds,
        "files": record.files,
        "size_gib": record.size_bytes / 2**30,
        "parity": record.parity.to_json(),
        "stdout": done.stdout[-2000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("sd15-step", "sdxl-export"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    result = sd15_step(args.runs, args.warmup) if args.which == "sd15-step" else sdxl_export()
    result["machine"] = machine_info()
    out = HERE / "results" / f"onnx-{args.which}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("stdout", "machine")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
