"""Step time on a shared machine: quiet vs one busy core, torch's default threads vs difflower's.

On a 2-core machine with one other busy process, torch's default (one OpenMP thread per core)
makes every parallel region wait at its barrier for the thread that sits descheduled on the busy
core. difflower's command line instead counts the idle cores at start-up and sets OpenMP's
PASSIVE wait policy (difflower.threads). This script measures, per engine:

- tiny SD, a 20-step txt2img (PNDM: 21 denoiser calls), eager / torchscript / onnxruntime / openvino;
- real-size SD1.5 (random weights), one CFG UNet step at 512x512, eager / onnxruntime / openvino
  static (with --real; the artifacts are exported once into $DIFFLOWER_BENCH_DIR);

under nine conditions: {torch default, idle-core count alone, idle-core count + PASSIVE wait}
x {quiet, one busy core from the start, one busy core arriving after the worker chose}. Each condition
runs in a fresh worker process (the thread policy is chosen when a process starts; OpenMP reads
its wait policy once), the busy core being a second process spinning in a loop, started before
the worker (or once it has chosen its threads). Within a worker the engines are interleaved.

    python benchmarks/contention.py [--real] [--runs 3] [--json benchmarks/results/contention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("DIFFLOWER_BENCH_DIR", "/tmp/difflower-bench"))
HERE = Path(__file__).resolve().parent
PROMPT = "a watercolor painting of a lighthouse at sunset"
POLICIES = ("torch-default", "idle-cores", "difflower")
LOADS = ("quiet", "one-busy-core", "busy-after-start")
READY = "difflower-contention: threads chosen"


def _prepare_tiny() -> dict[str, Path]:
    from difflower.driver import export
    from difflower.reference.tiny import make_tiny_checkpoint

    root = CACHE / "contention"
    checkpoint = root / "tiny-sd"
    if not checkpoint.is_dir():
        make_tiny_checkpoint(checkpoint, "sd", seed=0)
    out = {"eager": checkpoint}
    for backend in ("torchscript", "onnx", "openvino"):
        path = root / f"tiny-sd-{backend}"
        if not (path / "difflower.json").is_file():
            export(checkpoint, backend, path, progress=False, overwrite=path.exists())
        out[backend] = path
    return out


def _prepare_real() -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    from real_configs import real_spec

    from difflower.driver import export
    from difflower.reference.tiny import make_tiny_checkpoint

    checkpoint = CACHE / "sd15-random"
    if not (checkpoint / "model_index.json").is_file():
        make_tiny_checkpoint(checkpoint, spec=real_spec("sd15"), seed=0)
    out = {"eager": checkpoint}
    for backend, options in (("onnx", {}), ("openvino", {"static": ["1x512x512"]})):
        path = CACHE / f"contention-sd15-{backend}-unet"
        if not (path / "difflower.json").is_file():
            export(checkpoint, backend, path, components=["unet"], progress=False, overwrite=path.exists(), **options)
        out[backend] = path
    return out


def _hog() -> subprocess.Popen:
    """A process that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _run_worker(policy: str, load: str, targets: dict[str, Path], real: bool, runs: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("DIFFLOWER_THREADS", None)
    hog = _hog() if load == "one-busy-core" else None
    try:
        if hog is not None:
            time.sleep(1.0)  # the busy process is running when the worker starts, as on a shared machine
        command = [
            sys.executable,
            __file__,
            "--worker",
            policy,
            "--runs",
            str(runs),
            "--targets",
            json.dumps({k: str(v) for k, v in targets.items()}),
        ]
        if real:
            command.append("--real")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if load == "busy-after-start":
            # the other process arrives once the worker has chosen its threads on a quiet machine
            assert process.stderr is not None
            for line in process.stderr:
                if READY in line:
                    break
            hog = _hog()
        stdout, stderr = process.communicate()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if process.returncode != 0:
        return {"error": stderr.strip().splitlines()[-3:]}
    return json.loads(stdout.strip().splitlines()[-1])


def worker(policy: str, targets: dict[str, str], real: bool, runs: int) -> dict:
    """In a fresh process: pick the thread policy, load every engine, time them interleaved."""
    if policy != "torch-default":
        from difflower.threads import ThreadPolicy, configure_threads, prepare_process

        if policy == "difflower":
            prepare_process()
        threads = configure_threads(ThreadPolicy())
    import torch

    if policy == "torch-default":
        threads = torch.get_num_threads()
    print(READY, file=sys.stderr, flush=True)
    from difflower.api import load
    from difflower.validate.bench import interleaved

    runners = {}
    if real:
        from difflower.artifact.manifest import Manifest
        from difflower.reference.loading import load_unet
        from difflower.runtimes.pipeline import make_engines

        gen = torch.Generator().manual_seed(0)
        inputs = {
            "sample": torch.randn(2, 4, 64, 64, generator=gen),
            "timestep": torch.full((2,), 500.0),
            "encoder_hidden_states": torch.randn(2, 77, 768, generator=gen),
        }
        unet = load_unet(Path(targets["eager"]) / "unet", torch.float32)

        def eager() -> None:
            with torch.no_grad():
                unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

        runners["eager"] = eager
        for name in ("onnx", "openvino"):
            folder = Path(targets[name])
            engine = make_engines(Manifest.read(folder), folder)["unet"]
            runners[name] = lambda engine=engine: engine(inputs)
    else:
        for name, path in targets.items():
            pipe = load(path)
            runners[name] = lambda pipe=pipe: pipe(
                PROMPT, num_inference_steps=20, seed=0, output_type="latent", progress=False
            )
    timings = interleaved(runners, runs=runs, warmup=1)
    return {
        "policy": policy,
        "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
        "median_s": {name: t.median_s for name, t in timings.items()},
        "timings": {name: t.to_json() for name, t in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="real-size SD1.5 UNet step instead of tiny txt2img")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    parser.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.targets), args.real, args.runs)))
        return

    from difflower.validate.bench import machine_info

    targets = _prepare_real() if args.real else _prepare_tiny()
    report = {
        "benchmark": "sd15 unet CFG step, 512x512" if args.real else "tiny sd, 20-step txt2img (PNDM)",
        "machine": machine_info(),
        "runs": args.runs,
        "conditions": {},
    }
    for load in args.loads:
        for policy in args.policies:
            key = f"{policy}/{load}"
            report["conditions"][key] = _run_worker(policy, load, targets, args.real, args.runs)
            print(key, json.dumps(report["conditions"][key].get("median_s", report["conditions"][key])), flush=True)
    # every condition against the fastest quiet time per engine (the machine's best)
    best = {}
    for policy in args.policies:
        for name, seconds in report["conditions"].get(f"{policy}/quiet", {}).get("median_s", {}).items():
            best[name] = min(best.get(name, seconds), seconds)
    report["vs_best_quiet"] = {
        key: {name: seconds / best[name] for name, seconds in cond.get("median_s", {}).items() if name in best}
        for key, cond in report["conditions"].items()
    }
    print(json.dumps(report["vs_best_quiet"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
