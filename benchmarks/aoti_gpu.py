"""AOTInductor and compiled eager on an NVIDIA GPU (issue 22), in one run.

    python benchmarks/aoti_gpu.py [--out results.json] [--logs DIR] [--deadline-s 480]

On the lent GPU machine (torch there, no network): build the wheel here, carry it, install it
outside the repository (whose difflower/ folder would shadow it), then run, e.g.
    here:   pip wheel --no-deps --no-build-isolation . -w .whl   (.whl/ in .git/info/exclude)
    there:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
            PYTHONPATH=/tmp/site python3 benchmarks/aoti_gpu.py --out $OUT/aoti-gpu-h200.json \
            --logs $OUT/logs --deadline-s 420

0. A loader probe: one nn.Linear compiled by AOTInductor for the device and loaded, in a child
   (on the H200's torch 2.11.0+cu130 the load segfaulted; the child's exit status says so).
1. The CUDA tests of tests/test_aoti.py (tiny sd, every component compiled for CUDA in fp32 and
   fp16, through the export gates and `validate_artifact` on the GPU), as a pytest child.
2. Real-size SD1.5 config (random weights), one CFG UNet step at 512x512 (batch 2) in fp16:
   torch eager, compiled eager (torch.compile on the repeated blocks) and an `aoti` package
   (static, `--device cuda --precision fp16`), interleaved (median of --runs after warm-ups),
   each output against fp32 eager on the GPU.
3. Real-size SDXL base config, 1024x1024, 30 steps, batch 1, fp16: the whole pipeline on eager,
   `compile=True` and an `aoti` artifact of text encoders, UNet and VAE decoder; images against
   the fp32 eager pipeline's (the same noise: drawn in fp32 and cast, see gpu_eager.fp32_noise).

Compiling is most of the wall time, and mostly single-threaded Python: the two exports and the
pytest child run at once in their own processes on CPUs 4.. while this process, pinned to CPUs
0-3, loads and compiles the eager forms; every timing is taken after the compiles it would
share the CPUs with have ended, except that part 2's timings overlap part 3's export (other
CPUs; the result file says whether it was still running). `--tiny --device cpu --precision
bf16` runs the same code on the tiny checkpoints without a GPU (a dry run, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from aoti_sd15 import EXPORT  # noqa: E402
from gpu_eager import fp32_noise  # noqa: E402
from onnx_unet import CACHE, timed_result  # noqa: E402
from real_configs import real_spec  # noqa: E402

from difflower.reference.tiny import make_tiny_checkpoint, tiny_spec  # noqa: E402
from difflower.validate.bench import interleaved, machine_info, timed  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse at sunset"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pin(cpus: set[int]) -> None:
    """Run this process (and the children it starts from now on) on `cpus`, where the OS allows."""
    try:
        os.sched_setaffinity(0, cpus & os.sched_getaffinity(0) or os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass


class Child:
    """A child process writing its output to a log; `result()` waits for it up to a deadline.

    It runs in the logs folder: `python -c` and `python -m` put their cwd first on sys.path, where
    the repository's own difflower/ folder would shadow the installed package."""

    def __init__(self, name: str, command: list[str], logs: Path, cpus: set[int]):
        self.name, self.log = name, logs / f"{name}.log"
        self.started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: pin(cpus), cwd=logs
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self, deadline: float) -> dict:
        try:
            rc = self.process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"error": f"did not finish in {time.perf_counter() - self.started:.0f} s; killed"}
        lines = self.log.read_text().strip().splitlines()
        outcome: dict = {"rc": rc, "wall_s": round(time.perf_counter() - self.started, 1), "tail": lines[-6:]}
        if rc == 0 and lines and lines[-1].startswith("{"):
            outcome.update(json.loads(lines[-1]))
        return outcome


def export_child(name: str, source: Path, out: Path, options: dict, logs: Path, cpus: set[int]) -> Child:
    command = [sys.executable, "-c", EXPORT, str(source), "aoti", str(out), json.dumps(options)]
    return Child(name, command, logs, cpus)


LINEAR_PROBE = """
import os, sys, tempfile, torch
device = sys.argv[1]
m, x = torch.nn.Linear(8, 8).to(device), torch.randn(2, 8, device=device)
program = torch.export.export(m, (x,))
path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tempfile.mkdtemp(), "m.pt2"))
print("compiled", flush=True)
out = torch._inductor.aoti_load_package(path)(x)
print("loaded and ran; max abs vs eager", float((out - m(x)).abs().max()), flush=True)
"""


def synchronized(run: Callable[[], object], device: str) -> Callable[[], object]:
    """`run`, returning when the device is done (its result kept)."""

    def call() -> object:
        out = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return call


def sd15_step(source: Path, artifact: Path, export: Child, args, deadline: float) -> dict:
    """One CFG UNet step: eager, compiled eager, aoti, in the export's precision, vs fp32 eager."""
    from difflower.artifact.manifest import Manifest
    from difflower.reference.compile import compile_regions
    from difflower.reference.loading import load_unet
    from difflower.runtimes.pipeline import make_engines

    device, dtype = args.device, DTYPES[args.precision]
    config = json.loads((source / "unet" / "config.json").read_text())
    size, channels, width = config["sample_size"], config["in_channels"], config["cross_attention_dim"]
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, channels, size, size, generator=gen).to(device),
        "timestep": torch.full((2,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(2, 77, width, generator=gen).to(device),
    }
    low = {k: v.to(dtype) for k, v in inputs.items()}

    def module_runner(model, feed):
        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample.float()

        return synchronized(run, device)

    reference = module_runner(load_unet(source / "unet", torch.float32).to(device), inputs)()
    eager = load_unet(source / "unet", dtype).to(device)
    compiled = load_unet(source / "unet", dtype).to(device)
    report: dict = {"what": f"one CFG UNet step, batch 2, {size * 8}x{size * 8}, {args.precision}"}
    report["compiled_regions"] = compile_regions(compiled, where="unet")
    runners = {"torch_eager": module_runner(eager, low), "compiled_eager": module_runner(compiled, low)}
    report["compiled_first_call_s"] = timed(runners["compiled_eager"])
    report["export"] = export.result(deadline)
    if (artifact / "difflower.json").is_file():
        engine = make_engines(Manifest.read(artifact), artifact, device=device)["unet"]
        runners["aoti"] = synchronized(lambda: torch.as_tensor(engine(inputs)["out_sample"]), device)
    report["vs_fp32_eager"] = {name: compare(run().cpu(), reference.cpu()).to_json() for name, run in runners.items()}
    report["timed_while_other_exports_ran"] = args.sdxl_export_running()
    timings = interleaved(runners, runs=args.runs, warmup=args.warmup)
    base = timings["torch_eager"].median_s
    report["timings"] = {name: t.to_json() for name, t in timings.items()}
    report["vs_eager"] = {name: t.median_s / base for name, t in timings.items()}
    return report


def generate(pipe, steps: int):
    """One image at the pipeline's native size (the artifact's one static bucket)."""
    return pipe(PROMPT, num_inference_steps=steps, seed=0, output_type="np", progress=False)


def sdxl_run(source: Path, artifact: Path, export: Child, args, deadline: float) -> dict:
    """The whole pipeline, `args.steps` steps at the native size: eager, compiled eager, aoti."""
    from difflower.reference.pipeline import load_pipeline
    from difflower.runtimes.pipeline import load_artifact

    device, dtype = args.device, DTYPES[args.precision]
    report: dict = {"what": f"sdxl txt2img at the native size, {args.steps} steps, batch 1, {args.precision}"}
    pipes = {
        "torch_eager": load_pipeline(source, dtype=dtype, device=device),
        "compiled_eager": load_pipeline(source, dtype=dtype, device=device, compile=True),
    }
    images: dict[str, np.ndarray] = {}

    def runner(name: str, pipe) -> Callable[[], object]:
        return synchronized(lambda: images.__setitem__(name, np.asarray(generate(pipe, args.steps).images)), device)

    report["compiled_first_call_s"] = timed(runner("compiled_eager", pipes["compiled_eager"]))
    report["export"] = export.result(deadline)
    if (artifact / "difflower.json").is_file():
        pipes["aoti"] = load_artifact(artifact, device=device)
    runners = {name: runner(name, pipe) for name, pipe in pipes.items()}
    timings = interleaved(runners, runs=args.sdxl_runs, warmup=1)
    base = timings["torch_eager"].median_s
    report["timings"] = {name: t.to_json() for name, t in timings.items()}
    report["vs_eager"] = {name: t.median_s / base for name, t in timings.items()}
    report["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del pipes, runners
    reference = np.asarray(generate(load_pipeline(source, dtype=torch.float32, device=device), args.steps).images)
    report["image_vs_fp32_eager"] = {name: compare(image, reference).to_json() for name, image in images.items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "aoti-gpu.json")
    parser.add_argument("--logs", type=Path, default=CACHE / "aoti-gpu-logs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="tiny sd / sdxl checkpoints: a dry run of the code")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sdxl-runs", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=480.0, help="exports still running then are killed")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.deadline_s
    fp32_noise()  # fp16 eager and the aoti artifact's fp32 loop draw the same noise
    cpus = sorted(os.sched_getaffinity(0))
    mine, theirs = set(cpus[:4]), set(cpus[4:]) or set(cpus)
    args.logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(), "device": args.device, "precision": args.precision, "tiny": args.tiny}
    report["cuda"] = torch.version.cuda

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    sources, children = {}, {}
    options = {"device": args.device, "precision": args.precision, "allow_mismatch": True, "overwrite": True}
    plan = {"sd15": ["unet"], "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]}
    for family, components in plan.items():
        path = CACHE / (f"{family}-tiny" if args.tiny else f"{family}-random")
        if not (path / "model_index.json").is_file():
            spec = tiny_spec("sd" if family == "sd15" else family) if args.tiny else real_spec(family)
            _, report[f"{family}_checkpoint_write_s"] = timed_result(
                make_tiny_checkpoint, path, spec=spec, seed=0, overwrite=True
            )
        sources[family] = path
        out = CACHE / f"{path.name}-aoti-{args.device}-{args.precision}"
        child = export_child(f"{family}-export", path, out, {**options, "components": components}, args.logs, theirs)
        children[family] = (out, child)
    children["loader_probe"] = (
        None,
        Child("loader-probe", [sys.executable, "-c", LINEAR_PROBE, args.device], args.logs, theirs),
    )
    if not args.skip_tests:
        test_file = str(HERE.parent / "tests" / "test_aoti.py")
        tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "cuda"]
        children["tests"] = (None, Child("tests", tests, args.logs, theirs))
    pin(mine)
    args.sdxl_export_running = children["sdxl"][1].running
    for family, part in (("sd15", sd15_step), ("sdxl", sdxl_run)):
        try:
            report[family] = part(sources[family], children[family][0], children[family][1], args, deadline)
        except Exception:
            report[family] = {"error": traceback.format_exc()[-3000:]}
        print(family, json.dumps(report[family])[:2000], flush=True)
        save()
    for name in ("loader_probe", "tests"):
        if name in children:
            report[name] = children[name][1].result(deadline)
    save()
    print(json.dumps({k: report.get(k) for k in ("loader_probe", "tests", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
