"""DeepCache in the one loop on the real-size SD1.5 config (issue 20): 512x512, 20 steps, fp32 and int8.

    python benchmarks/deepcache_sd15.py [--runs 1] [--steps 20] [--interval 3] [--calibration-prompts 2]
    python benchmarks/deepcache_sd15.py --tiny   # smoke test: a tiny checkpoint (seconds)

1. Exports (cached in $DIFFLOWER_BENCH_DIR), each with `--cache-graphs deepcache` (the UNet also
   returns the deep feature of skip branch 0; `unet_shallow` is the shallow path):
   ONNX Runtime dynamic, OpenVINO static 1x512x512, OpenVINO static 1x512x512 + hybrid int8
   (calibrated on --calibration-prompts x 5 steps of the prompt set: the UNet on an uncached run,
   the shallow graph on the cached steps of a deepcache:interval=2 run).
2. Per engine (the eager reference first, then one artifact at a time), one process, same prompt
   and seed, PNDM at guidance 7.5 (21 UNet calls of batch 2 for 20 steps): one untimed 2-step
   warm-up, then the uncached and the `deepcache:interval=3` run interleaved (difflower.validate.
   bench's harness), end to end (text encoding, loop, VAE decode).
3. Per engine: the speed-up of DeepCache over the same engine uncached, every run's speed-up over
   eager fp32 uncached, the steps that ran the whole UNet, and the drift of the cached image from
   the uncached one (reported, not gated: with random weights it says little about quality).

Writes benchmarks/results/deepcache-sd15.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import sd15_source, timed_result, write_result  # noqa: E402

import difflower  # noqa: E402
from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.errors import DifflowerError  # noqa: E402
from difflower.reference.loading import read_model_index  # noqa: E402
from difflower.reference.spec import spec_from_configs  # noqa: E402
from difflower.validate.bench import interleaved, machine_info  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "unet_shallow", "vae_decoder")
# Rows that load an artifact above with engine options: OpenVINO's bf16 float ops (its default on a
# CPU with bf16 units; difflower compiles f32 unless asked) on the int8 artifact.
VARIANTS = {"openvino_static_int8_bf16": ("openvino_static_int8", {"inference_precision": "bf16"})}
PROMPT = "a watercolor painting of a lighthouse at sunset"
SEED = 0


def artifacts(size: int, calibration_prompts: int) -> dict[str, tuple[str, dict[str, Any]]]:
    static = [f"1x{size}x{size}"]
    int8 = {"quantize": "int8", "calibration_prompts": calibration_prompts, "calibration_steps": 5}
    return {
        "onnxruntime": ("onnx", {}),
        "openvino_static": ("openvino", {"static": static}),
        "openvino_static_int8": ("openvino", {"static": static, **int8}),
    }


def exported(source: Path, folder: Path, backend: str, options: dict[str, Any]) -> dict:
    command = ["difflower", "export", str(source), "--backend", backend, "--out", str(folder)]
    command += ["--components", *COMPONENTS, "--cache-graphs", "deepcache"]
    command += [
        f"--{k.replace('_', '-')}={v}" for k, vs in options.items() for v in (vs if isinstance(vs, list) else [vs])
    ]
    seconds = None
    try:
        manifest = Manifest.read(folder)
        if set(manifest.components) != set(COMPONENTS):
            raise DifflowerError("another export")
        calibrated = {p["component"] for p in manifest.passes if "calibration_samples" in p.get("settings", {})}
        if options.get("quantize") == "int8" and "unet_shallow" not in calibrated:
            raise DifflowerError("an int8 export from before the shallow graph was calibrated")
    except DifflowerError:
        print(f"exporting {folder.name} ...", flush=True)
        run = partial(export, source, backend, folder, components=COMPONENTS, cache_graphs="deepcache", **options)
        manifest, seconds = timed_result(run, overwrite=True, progress=False)
        print(f"  {seconds:.1f} s", flush=True)
    return {
        "folder": folder,
        "precision": manifest.precision,
        "export_s": seconds,  # None: reused from the cache
        "parity": {
            k: r.parity.summary + (" ok" if r.parity.passed else " MISSED") for k, r in manifest.components.items()
        },
        "command": shlex.join(command),
    }


@contextmanager
def component_times(pipe: Any):
    """Seconds spent in each engine of an artifact pipeline while the block runs (eager: none)."""
    spent: dict[str, float] = {}
    engines = getattr(pipe, "engines", {})
    for name, engine in engines.items():

        def timed(inputs, _run=engine.run, _name=name):
            start = time.perf_counter()
            try:
                return _run(inputs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start

        engine.run = timed
    try:
        yield spent
    finally:
        for engine in engines.values():
            del engine.run  # the class's own method again


def measure(name: str, pipe: Any, steps: int, size: int, interval: int, runs: int) -> dict:
    """The uncached and the cached run of one pipeline, interleaved after a short warm-up."""
    base = dict(prompt=PROMPT, num_inference_steps=steps, seed=SEED, height=size, width=size, output_type="np",
                progress=False)  # fmt: skip
    pipe(**{**base, "num_inference_steps": 2})  # warm-up: first-call allocations, lazy compiles
    outputs: dict[str, Any] = {}
    policy = f"deepcache:interval={interval}"

    seconds: dict[str, dict[str, float]] = {}  # artifacts: each component's time in each timed run

    def run(key: str, **extra: Any) -> None:
        with component_times(pipe) as spent:
            outputs[key] = pipe(**base, **extra)
        seconds[key] = spent

    print(f"{name}: {runs} timed run(s) each, uncached and {policy} ...", flush=True)
    timings = interleaved({"uncached": partial(run, "uncached"), "deepcache": partial(run, "deepcache", cache=policy)},
                          runs, warmup=0)  # fmt: skip
    drift = compare(np.asarray(outputs["deepcache"].images), np.asarray(outputs["uncached"].images))
    return {
        "engine": name,
        "uncached": timings["uncached"].to_json(),
        "deepcache": timings["deepcache"].to_json(),
        "speedup": timings["uncached"].median_s / timings["deepcache"].median_s,
        "full_steps": outputs["deepcache"].full_steps,
        "component_seconds": seconds or None,  # the last timed run of each
        "cached_vs_uncached_image": drift.to_json(),
        "images": {k: np.asarray(o.images) for k, o in outputs.items()},
    }


def markdown(result: dict) -> str:
    lines = [
        "| engine | precision | uncached s | deepcache s | DeepCache speed-up | deepcache vs eager fp32 "
        "| image vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        psnr = r.get("deepcache_image_vs_eager_deepcache", {}).get("psnr")
        parity = "-" if psnr is None else f"{psnr:.1f} dB"
        lines.append(
            f"| {r['engine']} | {r['precision']} | {r['uncached']['median_s']:.1f} | {r['deepcache']['median_s']:.1f} "
            f"| {r['speedup']:.2f}x | {r['deepcache_vs_eager']:.2f}x | {parity} |"
        )
    lines += ["", "| engine | run | " + " | ".join(COMPONENTS) + " |", "|---|---|" + "---|" * len(COMPONENTS)]
    for r in result["rows"]:
        for run, spent in (r.get("component_seconds") or {}).items():
            if not spent:  # eager: no engines
                continue
            cells = " | ".join(f"{spent[c]:.2f}" if c in spent else "-" for c in COMPONENTS)
            lines.append(f"| {r['engine']} | {run} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each (median reported)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--calibration-prompts", type=int, default=2, help="int8: prompts x 5 steps to calibrate on")
    parser.add_argument(
        "--engines", nargs="+", default=None, help="rows to measure beside eager (default: every artifact and variant)"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny checkpoint in a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/deepcache-sd15.json)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="difflower-deepcache-") as scratch:
        root, source, out = sd15_source(args.tiny, Path(scratch), args.out, "deepcache-sd15")
        size = spec_from_configs(read_model_index(source)).native_size
        known = [*artifacts(size, 0), *VARIANTS]
        unknown = sorted(set(args.engines or ()) - set(known))
        if unknown:
            parser.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        wanted = set(args.engines or known)
        needed = wanted | {VARIANTS[name][0] for name in wanted & set(VARIANTS)}
        exports = {
            name: exported(source, root / f"{source.name}-deepcache-{name}", backend, options)
            for name, (backend, options) in artifacts(size, args.calibration_prompts).items()
            if name in needed
        }
        loads = {name: (name, {}) for name in exports if name in wanted}
        loads |= {name: variant for name, variant in VARIANTS.items() if name in wanted}
        gc.collect()
        eager = difflower.load(source)
        rows = [{"precision": "fp32", **measure("eager", eager, args.steps, size, args.interval, args.runs)}]
        del eager
        gc.collect()
        for name, (artifact, engine_options) in loads.items():
            facts = exports[artifact]
            pipe = difflower.load(facts["folder"], **engine_options)
            row = {"precision": facts["precision"], "artifact": artifact, "engine_options": engine_options}
            rows.append({**row, **measure(name, pipe, args.steps, size, args.interval, args.runs)})
            del pipe
            gc.collect()
    baseline, reference = rows[0]["uncached"]["median_s"], rows[0]["images"]["deepcache"]
    for row in rows:
        images = row.pop("images")
        row["uncached_vs_eager"] = baseline / row["uncached"]["median_s"]
        row["deepcache_vs_eager"] = baseline / row["deepcache"]["median_s"]
        if row["engine"] != "eager":  # the same cached run on the artifact and on the reference
            row["deepcache_image_vs_eager_deepcache"] = compare(images["deepcache"], reference).to_json()
    result = {
        "benchmark": (
            f"{'tiny SD' if args.tiny else 'SD1.5 (random weights)'} at {size}x{size}, {args.steps} PNDM steps, "
            f"guidance 7.5, end to end: uncached vs deepcache:interval={args.interval} (branch 0)"
        ),
        "rows": rows,
        "exports": {k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in exports.items()},
        "commands": {
            "benchmark": shlex.join(["python", "benchmarks/deepcache_sd15.py", *sys.argv[1:]]),
            "exports": {k: v["command"] for k, v in exports.items()},
        },
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": machine_info(),
    }
    write_result(out, result, markdown(result))


if __name__ == "__main__":
    main()
