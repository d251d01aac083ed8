"""Real-size TorchScript benchmark (issue 8): one CFG step of the SD1.5 UNet, random weights.

    python benchmarks/torchscript_unet.py   # torch eager vs the torchscript artifact vs it frozen

The UNet is exported with `--backend torchscript` (no --static: the checkpoint's 512x512 at one
image, batch 2 with CFG) into $DIFFLOWER_BENCH_DIR (default /tmp/difflower-bench) and run
through the torchscript engine; `torch.jit.freeze` of the same traced module is timed beside
it, as the evidence for saving graphs unfrozen. The three run interleaved in one process on
the same inputs, after warm-up (TorchScript's profiling executor optimizes on its first two
calls). The 1-minute load average before and after is recorded: the figures are only as
good as the machine was quiet. Results: benchmarks/results/torchscript-sd15-step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, checkpoint, sd15_step_inputs  # noqa: E402

from difflower.validate.bench import interleaved, machine_info  # noqa: E402


def _export(source: Path, artifact: Path) -> dict:
    """Export the UNet unless an earlier run did; what its manifest recorded either way."""
    from difflower.artifact.manifest import Manifest
    from difflower.driver import export

    cached = (artifact / "difflower.json").is_file()
    if not cached:
        export(source, "torchscript", artifact, components=["unet"], overwrite=True)
    manifest = Manifest.read(artifact)
    record = manifest.components["unet"]
    return {
        "cached_from_an_earlier_run": cached,
        "export_seconds": record.export_seconds,
        "shapes": manifest.shapes,
        "size_gib": record.size_bytes / 2**30,
        "parity": record.parity.summary,
    }


def keeping_outputs(
    runners: dict[str, Callable[[], torch.Tensor]], outputs: dict[str, torch.Tensor]
) -> dict[str, Callable[[], torch.Tensor]]:
    """The runners, each also storing its latest output in `outputs`."""

    def keep(name: str, run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            outputs[name] = run()
            return outputs[name]

        return call

    return {name: keep(name, run) for name, run in runners.items()}


def sd15_step(runs: int, warmup: int) -> dict:
    """Eager vs torchscript (vs frozen torchscript), interleaved: medians, ratios, parity."""
    from difflower.artifact.formats import TORCHSCRIPT_FILE as FILE
    from difflower.artifact.formats import load_traced
    from difflower.artifact.manifest import Manifest
    from difflower.artifact.specs import UNetExport
    from difflower.reference.loading import load_unet
    from difflower.runtimes.torchscript_engine import TorchScriptEngine
    from difflower.validate.metrics import compare

    load_before = os.getloadavg()
    source = checkpoint("sd15")
    artifact = CACHE / "sd15-torchscript-unet"
    exported = _export(source, artifact)

    inputs = sd15_step_inputs()
    eager = UNetExport(load_unet(source / "unet", torch.float32), text_time=False).eval().requires_grad_(False)
    manifest = Manifest.read(artifact)
    engine = TorchScriptEngine.open(manifest.components["unet"], artifact, manifest)
    frozen = torch.jit.freeze(load_traced(artifact / "unet" / FILE, "cpu"))

    def run_eager():
        with torch.no_grad():
            return eager(*inputs.values())[0]

    def run_frozen():
        with torch.no_grad():
            return frozen(*inputs.values())[0]

    runners = {
        "torch_eager": run_eager,
        "torchscript": lambda: engine(inputs)["out_sample"],
        "torchscript_frozen": run_frozen,
    }
    # The warm-up rounds are timed too (interleaved, as the runs), and their last outputs kept for parity.
    outputs: dict[str, torch.Tensor] = {}
    warmups = interleaved(keeping_outputs(runners, outputs), warmup, warmup=0)
    timings = interleaved(runners, runs, warmup=0)
    median = {name: t.median_s for name, t in timings.items()}
    return {
        "benchmark": "sd15 unet, one CFG step (batch 2, 4x64x64 latents = 512x512 px, 77x768 context), fp32",
        "median_s": median,
        "ratio_vs_torch_eager": {name: median[name] / median["torch_eager"] for name in runners},
        "runs_s": {name: list(t.samples) for name, t in timings.items()},
        "timings": {name: t.to_json() for name, t in timings.items()},
        "warmup_s": {name: list(t.samples) for name, t in warmups.items()},
        "parity_vs_eager": {
            name: compare(out, outputs["torch_eager"]).to_json()
            for name, out in outputs.items()
            if name != "torch_eager"
        },
        "export": exported,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.warmup < 1 or args.runs < 1:
        parser.error("needs at least 1 warm-up (its outputs give the parity) and 1 timed run")
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    result = sd15_step(args.runs, args.warmup)
    result["machine"] = machine_info()
    out = HERE / "results" / "torchscript-sd15-step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
