"""The first-block cache on a real-width SD3 transformer (issue 20): what a reusing step costs
against a full one, per engine.

    python benchmarks/first_block_sd3.py [--layers 6] [--size 512] [--steps 20] [--runs 1]
    python benchmarks/first_block_sd3.py --tiny   # smoke test: a tiny checkpoint (seconds)

The checkpoint is SD3-medium's published config with random weights (real width: 24 heads of
64, 1536 wide, CLIP-L + OpenCLIP-bigG, no T5: `skip_t5`), cut to --layers joint blocks (the
issue's "reduced depth"; 24 in the real model) to fit exports and runs in this machine's time.

1. Exports (cached in $DIFFLOWER_BENCH_DIR) with `--cache-graphs first-block`: the transformer
   (also returning its tail residual), `transformer_first` (embeddings + the first block) and
   `transformer_tail` (the output head fed the first block plus a cached tail residual), and the
   two CLIP encoders: ONNX Runtime dynamic, OpenVINO static 1xSIZExSIZE.
2. Per engine (eager first, then one artifact at a time), one process, batch 2 (CFG):
   - per call, interleaved, median of 3: the full transformer, the first block, the tail;
   - the denoising loop end to end (text encoding + --steps FlowMatch Euler steps, latents out,
     no VAE decode) uncached, with `first-block:interval=2` and with `first-block:interval=3`,
     interleaved, median of --runs (1 with --tiny).
3. Derived per engine: a reusing step's cost (first + tail) as a fraction of a full step, and the
   loop speed-up each interval gives. The drift of the cached latents from the uncached ones is
   reported, not gated (random weights say little about quality).

Writes benchmarks/results/first-block-sd3.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shlex
import sys
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, timed_result, write_result  # noqa: E402
from real_configs import SD3_MEDIUM, real_spec  # noqa: E402

import difflower  # noqa: E402
from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.errors import DifflowerError  # noqa: E402
from difflower.reference.loading import read_model_index  # noqa: E402
from difflower.reference.tiny import make_tiny_checkpoint  # noqa: E402
from difflower.validate.bench import interleaved, machine_info  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402

DENOISER = ("transformer", "transformer_first", "transformer_tail")
PROMPT = "a watercolor painting of a lighthouse at sunset"
POLICIES = ("first-block:interval=2", "first-block:interval=3")


def checkpoint(tiny: bool, layers: int, scratch: Path) -> Path:
    if tiny:
        return make_tiny_checkpoint(scratch / "tiny-sd3", "sd3", seed=0)
    path = CACHE / f"sd3-random-{layers}layers"
    if not (path / "model_index.json").is_file():
        print(f"writing a random-weight SD3-medium checkpoint with {layers} blocks to {path} ...", flush=True)
        spec = replace(real_spec("sd3"), transformer=replace(SD3_MEDIUM, num_layers=layers))
        make_tiny_checkpoint(path, spec=spec, seed=0, overwrite=True)
    return path


def exported(source: Path, folder: Path, backend: str, options: dict[str, Any]) -> dict:
    """The text encoders (CLIPs; T5 only in the tiny checkpoint) and the transformer's graphs."""
    encoders = [n for n in read_model_index(source).components if n.startswith("text_encoder")]
    components = (*encoders, *DENOISER)
    command = ["difflower", "export", str(source), "--backend", backend, "--out", str(folder)]
    command += ["--components", *components, "--cache-graphs", "first-block"]
    command += [f"--{k}={v}" for k, vs in options.items() for v in vs]
    seconds = None
    try:
        manifest = Manifest.read(folder)
        if set(manifest.components) != set(components):
            raise DifflowerError("another export")
    except DifflowerError:
        print(f"exporting {folder.name} ...", flush=True)
        run = partial(export, source, backend, folder, components=components, cache_graphs="first-block", **options)
        manifest, seconds = timed_result(run, overwrite=True, progress=False)
        print(f"  {seconds:.1f} s", flush=True)
    return {
        "folder": folder,
        "export_s": seconds,  # None: reused from the cache
        "parity": {
            k: r.parity.summary + (" ok" if r.parity.passed else " MISSED") for k, r in manifest.components.items()
        },
        "command": shlex.join(command),
    }


def one_step_inputs(pipe: Any, size: int) -> tuple:
    """The loop's first denoiser call (sample, timestep, conditioning) of a 1-step run."""
    seen: list[tuple] = []
    original = pipe.calls.denoiser

    def spy(sample, timestep, cond, residuals=None):
        seen.append((sample, timestep, cond))
        return original(sample, timestep, cond, residuals)

    pipe.calls.denoiser = spy
    try:
        pipe(PROMPT, num_inference_steps=1, seed=0, height=size, width=size, output_type="latent", progress=False)
    finally:
        pipe.calls.denoiser = original
    return seen[0]


def measure(name: str, pipe: Any, size: int, steps: int, runs: int) -> dict:
    calls = pipe.calls
    sample, timestep, cond = one_step_inputs(pipe, size)
    first, _ = calls.first_block(sample, timestep, cond)
    _, tail = calls.denoiser_with_tail(sample, timestep, cond)
    print(f"{name}: per call, 3 runs each ...", flush=True)
    per_call = interleaved(
        {
            "full": lambda: calls.denoiser_with_tail(sample, timestep, cond),
            "first_block": lambda: calls.first_block(sample, timestep, cond),
            "tail": lambda: calls.denoiser_from_cache(first, tail, timestep, cond),
        },
        3,
    )
    base = dict(prompt=PROMPT, num_inference_steps=steps, seed=0, height=size, width=size, output_type="latent",
                progress=False)  # fmt: skip
    outputs: dict[str, Any] = {}

    def run(key: str, **extra: Any) -> None:
        outputs[key] = pipe(**base, **extra)

    print(f"{name}: the {steps}-step loop, uncached and {', '.join(POLICIES)}, {runs} run(s) each ...", flush=True)
    runners = {"uncached": partial(run, "uncached")} | {p: partial(run, p, cache=p) for p in POLICIES}
    loops = interleaved(runners, runs, warmup=0)
    full, first_s, tail_s = (per_call[k].median_s for k in ("full", "first_block", "tail"))
    return {
        "engine": name,
        "per_call": {k: v.to_json() for k, v in per_call.items()},
        "reusing_step_fraction": (first_s + tail_s) / full,
        "loop": {k: v.to_json() for k, v in loops.items()},
        "loop_speedup": {p: loops["uncached"].median_s / loops[p].median_s for p in POLICIES},
        "full_steps": {p: outputs[p].full_steps for p in POLICIES},
        "cached_vs_uncached_latents": {
            p: compare(outputs[p].images, outputs["uncached"].images).to_json() for p in POLICIES
        },
        "latents": {k: o.images for k, o in outputs.items()},
    }


def markdown(result: dict) -> str:
    lines = [
        "| engine | full call s | first block s | tail s | reusing step / full | loop uncached s "
        + " ".join(f"| {p} s (speed-up)" for p in POLICIES)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(POLICIES),
    ]
    for r in result["rows"]:
        c = {k: v["median_s"] for k, v in r["per_call"].items()}
        cached = " ".join(f"| {r['loop'][p]['median_s']:.1f} ({r['loop_speedup'][p]:.2f}x)" for p in POLICIES)
        lines.append(
            f"| {r['engine']} | {c['full']:.3f} | {c['first_block']:.3f} | {c['tail']:.4f} "
            f"| {r['reusing_step_fraction']:.3f} | {r['loop']['uncached']['median_s']:.1f} {cached} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="joint blocks of the transformer (24 in SD3-medium)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: 512; --tiny: 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each loop (median reported)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny checkpoint in a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/first-block-sd3.json)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    size = args.size or (64 if args.tiny else 512)
    runs = 1 if args.tiny else args.runs
    with tempfile.TemporaryDirectory(prefix="difflower-first-block-") as scratch:
        root = Path(scratch) if args.tiny else CACHE
        source = checkpoint(args.tiny, args.layers, Path(scratch))
        out = args.out or (
            Path(scratch).parent / "first-block-sd3-tiny.json"
            if args.tiny
            else HERE / "results" / "first-block-sd3.json"
        )
        backends = {"onnxruntime": ("onnx", {}), "openvino_static": ("openvino", {"static": [f"1x{size}x{size}"]})}
        exports = {
            name: exported(source, root / f"{source.name}-first-block-{name}", backend, options)
            for name, (backend, options) in backends.items()
        }
        gc.collect()
        rows = [measure("eager", difflower.load(source), size, args.steps, runs)]
        gc.collect()
        for name, facts in exports.items():
            rows.append(measure(name, difflower.load(facts["folder"]), size, args.steps, runs))
            gc.collect()
    reference = rows[0]["latents"]
    for row in rows:
        latents = row.pop("latents")
        if row["engine"] != "eager":  # the same cached runs on the artifact and on the reference
            row["latents_vs_eager"] = {k: compare(v, reference[k]).to_json() for k, v in latents.items()}
    result = {
        "benchmark": (
            f"{'tiny SD3' if args.tiny else f'SD3-medium width, {args.layers} of 24 blocks (random weights)'} "
            f"at {size}x{size}, batch 2 (CFG), {args.steps} FlowMatch Euler steps, latents out (no VAE decode)"
        ),
        "rows": rows,
        "exports": {k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in exports.items()},
        "commands": {
            "benchmark": shlex.join(["python", "benchmarks/first_block_sd3.py", *sys.argv[1:]]),
            "exports": {k: v["command"] for k, v in exports.items()},
        },
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": machine_info(),
    }
    write_result(out, result, markdown(result))


if __name__ == "__main__":
    main()
