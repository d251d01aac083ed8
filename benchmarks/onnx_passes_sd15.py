"""Graph passes on the real-size SD1.5 UNet (issue 9): one CFG step at 512x512 on ONNX Runtime.

    python benchmarks/onnx_passes_sd15.py [--runs 5] [--warmup 2]

Exports the UNet (random weights, SD1.5 config) five ways: fp32 dynamic; + fuse_qkv;
+ fuse_qkv + static shapes (1x512x512); int8 weight-only (dynamic) and int8 static QDQ, both on
top of fuse_qkv + static. Then times one CFG step (batch 2, 4x64x64 latents) in one process,
interleaved, in two phases, each in a fresh process, so that at most three sessions are loaded
at once on a 24 GiB machine: the three fp32 graphs, then the best fp32 graph beside the two
int8 graphs. Parity of
every graph's output against the fp32 dynamic graph (itself ~1e-6 from torch eager, see
onnx-sd15-step.json) and the export's own component parity against the reference are recorded.
Writes benchmarks/results/onnx-passes-sd15.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
import sys
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, checkpoint, sd15_step_inputs  # noqa: E402

from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.validate.bench import Timing, interleaved, machine_info, timed  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402

STATIC = "1x512x512"
CONFIGS = {
    "fp32_dynamic": {},
    "fp32_fuse_qkv": {"fuse_qkv": True},
    "fp32_fuse_qkv_static": {"fuse_qkv": True, "static": [STATIC]},
    "int8_weight_dynamic": {"fuse_qkv": True, "static": [STATIC], "quantize": "int8-weight"},
    "int8_qdq_static": {
        "fuse_qkv": True,
        "static": [STATIC],
        "quantize": "int8",
        "calibration_prompts": 2,
        "calibration_steps": 4,
    },
}
PHASES = (("fp32_dynamic", "fp32_fuse_qkv", "fp32_fuse_qkv_static"),
          ("fp32_fuse_qkv_static", "int8_weight_dynamic", "int8_qdq_static"))  # fmt: skip


def build(source: Path, name: str) -> dict:
    folder = CACHE / f"sd15-passes-{name}"
    if (folder / "difflower.json").is_file():
        return {"cached": True}
    seconds = timed(partial(export, source, "onnx", folder, components=["unet"], overwrite=True, **CONFIGS[name]))
    return {"seconds": round(seconds, 1)}


def time_phase(phase: tuple[str, ...], inputs, runs: int, warmup: int) -> tuple[dict[str, Timing], dict]:
    """Load the phase's graphs, then time one call of each, interleaved; their first outputs too.

    The first call of each graph is the first warm-up (its output is returned for parity); the
    harness does the other warm-ups and the interleaved runs."""
    from difflower.runtimes.onnxruntime_engine import OnnxRuntimeEngine

    engines, outputs = {}, {}
    for name in phase:
        folder = CACHE / f"sd15-passes-{name}"
        engines[name] = OnnxRuntimeEngine(Manifest.read(folder).components["unet"], folder)
        outputs[name] = engines[name](inputs)["out_sample"]
    runners = {name: partial(engine, inputs) for name, engine in engines.items()}
    return interleaved(runners, runs, warmup=max(warmup - 1, 0)), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    configs, phases = list(CONFIGS), PHASES
    source = checkpoint("sd15")
    exports = {name: build(source, name) for name in configs}
    gc.collect()

    inputs = sd15_step_inputs()
    report: dict = {
        "benchmark": "sd15 unet, one CFG step (batch 2, 4x64x64 latents = 512x512 px), onnxruntime CPU",
        "machine": machine_info(),
        "runs": args.runs,
        "warmup": args.warmup,
        "export": exports,
        "phases": [],
        "artifacts": {},
    }
    outputs: dict[str, torch.Tensor] = {}
    for name in configs:
        manifest = Manifest.read(CACHE / f"sd15-passes-{name}")
        record = manifest.components["unet"]
        report["artifacts"][name] = {
            "precision": manifest.precision,
            "passes": [{k: p[k] for k in ("name", "rewrites", "parity")} for p in manifest.passes],
            "export_parity_vs_reference": record.parity.summary,
            "export_gate": f"{record.parity.gate}: {'ok' if record.parity.passed else 'MISSED'}",
            "size_mib": round(record.size_bytes / 2**20, 1),
        }
    spawn = multiprocessing.get_context("spawn")
    for phase in phases:
        with spawn.Pool(1) as pool:  # a fresh process per phase: the last phase's memory is gone
            timings, phase_outputs = pool.apply(time_phase, (phase, inputs, args.runs, args.warmup))
        outputs.update({name: torch.from_numpy(out) for name, out in phase_outputs.items()})
        median = {name: t.median_s for name, t in timings.items()}
        base = phase[0]
        report["phases"].append({
            "median_s": median,
            "runs_s": {name: list(t.samples) for name, t in timings.items()},
            f"speedup_vs_{base}": {name: median[base] / m for name, m in median.items()},
            "timings": {name: t.to_json() for name, t in timings.items()},
        })  # fmt: skip
        print(json.dumps(report["phases"][-1]["median_s"]), flush=True)
    report["parity_vs_fp32_dynamic"] = {
        name: compare(out, outputs["fp32_dynamic"]).to_json() for name, out in outputs.items() if name != "fp32_dynamic"
    }
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest phase
    out = HERE / "results" / "onnx-passes-sd15.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
