"""AOTInductor and compiled eager against the other CPU engines (issue 22): one CFG UNet step.

    python benchmarks/aoti_sd15.py [--runs 5] [--warmup 2]

Real-size SD1.5 config, random weights, one classifier-free-guidance step at 512x512 (batch 2,
4x64x64 latents, 77x768 text states), fp32. At most three real-size engines are loaded at a time
(24 GiB), so the engines run in two phases, each with eager as its baseline, interleaved
(difflower.validate.bench.interleaved: warm-ups, then A B C A B C ..., median of --runs):

  phase 1: torch eager, compiled eager (torch.compile on the repeated blocks), aoti (static 1x512x512)
  phase 2: torch eager, onnxruntime (dynamic), openvino static 1x512x512

Export and compile costs (seconds; peak RSS of the export process) are recorded; every engine's
output is compared with eager's. Artifacts are cached in $DIFFLOWER_BENCH_DIR; the JSON goes to
benchmarks/results/aoti-sd15.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, checkpoint, sd15_step_inputs  # noqa: E402

from difflower.validate.bench import interleaved, machine_info, timed  # noqa: E402

ARTIFACTS = {
    "aoti": ("aoti", {"components": ["unet"], "static": ["1x512x512"]}),
    "onnxruntime": ("onnx", {"components": ["unet"]}),
    "openvino_static": ("openvino", {"components": ["unet"], "static": ["1x512x512"]}),
}
EXPORT = """
import json, resource, sys, time
from difflower.driver import export
start = time.perf_counter()
manifest = export(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, **json.loads(sys.argv[4]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
components = {name: {"parity": r.parity.summary, "passed": r.parity.passed, "export_seconds": r.export_seconds,
                     "compile_seconds": r.config.get("compile_seconds")} for name, r in manifest.components.items()}
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak, "components": components}))
"""


def build(source: Path, name: str) -> dict:
    """The UNet artifact `name`, exported in a child process (its peak RSS is the export's own)."""
    backend, options = ARTIFACTS[name]
    folder = CACHE / f"sd15-{name}-unet"
    if (folder / "difflower.json").is_file():
        return {"cached": True}
    command = [sys.executable, "-c", EXPORT, str(source), backend, str(folder), json.dumps(options)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def engine_runner(name: str, inputs: dict[str, torch.Tensor]):
    from difflower.artifact.manifest import Manifest
    from difflower.runtimes.pipeline import make_engines

    folder = CACHE / f"sd15-{name}-unet"
    engine = make_engines(Manifest.read(folder), folder)["unet"]
    return lambda: torch.as_tensor(engine(inputs)["out_sample"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "aoti-sd15.json")
    args = parser.parse_args()
    from difflower.reference.compile import compile_regions
    from difflower.reference.loading import load_unet
    from difflower.validate.metrics import compare

    source = checkpoint("sd15")
    exports = {name: build(source, name) for name in ARTIFACTS}
    inputs = sd15_step_inputs()
    unet = load_unet(source / "unet", torch.float32)

    def eager() -> torch.Tensor:
        with torch.no_grad():
            return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample

    report: dict = {"benchmark": "sd15 unet, one CFG step, 512x512, fp32", "machine": machine_info(), "phases": []}
    report["exports"] = exports
    reference = eager()
    for phase in (("compiled_eager", "aoti"), ("onnxruntime", "openvino_static")):
        runners = {"torch_eager": eager}
        compiled = None
        for name in phase:
            if name == "compiled_eager":
                compiled = load_unet(source / "unet", torch.float32)
                regions = compile_regions(compiled)

                def run_compiled(model=compiled) -> torch.Tensor:
                    with torch.no_grad():
                        return model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample

                report["compiled_eager_first_call_s"] = timed(run_compiled)  # compiles the regions
                report["compiled_eager_regions"] = regions
                runners[name] = run_compiled
            else:
                runners[name] = engine_runner(name, inputs)
        parity = {n: compare(run(), reference).to_json() for n, run in runners.items() if n != "torch_eager"}
        timings = interleaved(runners, runs=args.runs, warmup=args.warmup)
        base = timings["torch_eager"].median_s
        report["phases"].append(
            {
                "engines": list(runners),
                "timings": {n: t.to_json() for n, t in timings.items()},
                "vs_eager": {n: t.median_s / base for n, t in timings.items()},
                "parity_vs_eager": parity,
            }
        )
        print(json.dumps(report["phases"][-1]["vs_eager"]), flush=True)
        del runners, compiled
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
