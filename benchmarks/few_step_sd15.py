"""Few-step sampling on the real-size SD1.5 config (issue 19): 4-step LCM vs 20-step PNDM, 512x512.

    python benchmarks/few_step_sd15.py [--runs 1] [--warmup 1] [--steps-pndm 20] [--steps-lcm 4] [--out PATH]
    python benchmarks/few_step_sd15.py --tiny   # smoke test: a tiny checkpoint at its native size (seconds)

LCM runs the way LCM-LoRA is used: the `lcm` scheduler at guidance 1.0 (no classifier-free
guidance, so one batch-1 denoiser call per step) on a plain SD UNet. The weights are random
(speed does not depend on their values) and a fused LoRA adds nothing at run time, so the
plain checkpoint stands for an LCM-LoRA-fused one.

1. Exports (cached in $DIFFLOWER_BENCH_DIR; reused when the manifest reads back and matches),
   text_encoder + unet + vae_decoder, fp32: ONNX dynamic with CFG, ONNX dynamic `--no-cfg`,
   OpenVINO static 1x512x512 with CFG, OpenVINO static 1x512x512 `--no-cfg` (denoiser batch 1).
   The two CFG artifacts are the ones openvino_sd15.py exports (same folders).
2. Per backend (onnxruntime, openvino static), one process, same prompt and seed: a 20-step
   PNDM run at guidance 7.5 on the CFG artifact and a 4-step LCM run at guidance 1.0 on the
   no-CFG artifact, end to end (text encoding + denoising loop + VAE decode, image out). The
   backend's two pipelines are loaded together (at most two real-size pipelines at once; freed
   before the next backend's) and interleaved by difflower.validate.bench's harness: 1 warm-up,
   then 1 timed run each (--runs, --warmup). Every denoiser call is timed too (`timed`), giving
   the seconds per UNet call and what the rest of the run costs (text encoding, scheduler, decode).
3. Per backend: the speed-up, PNDM seconds / LCM seconds.

Writes benchmarks/results/few-step-sd15.json (--tiny: a temp file, unless --out) with the
machine, library versions, exports, rows, speed-ups and the equivalent commands, and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shlex
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

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

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PROMPT = "a watercolor painting of a lighthouse at sunset"
SEED = 0
BACKENDS = {"onnxruntime": "onnx", "openvino_static": "openvino"}  # row name -> export backend
SAMPLERS = {  # sampler -> (artifact with CFG doubling?, guidance scale)
    "pndm": (True, 7.5),
    "lcm": (False, 1.0),
}


def artifact_name(backend: str, cfg: bool) -> str:
    return f"sd15-{backend}" + ("" if cfg else "-nocfg")


def cached_manifest(folder: Path, cfg: bool, static: list[str]) -> Manifest | None:
    """The manifest of an earlier export in `folder` if it reads back and was built as asked."""
    try:
        manifest = Manifest.read(folder)
    except DifflowerError:
        return None
    matches = (
        set(manifest.components) == set(COMPONENTS)
        and bool(manifest.shapes.get("cfg_doubles_denoiser_batch", True)) == cfg
        and [str(b) for b in manifest.buckets] == static
    )
    return manifest if matches else None


def export_all(source: Path, root: Path, size: int) -> dict[str, dict]:
    out = {}
    for backend, exporter in BACKENDS.items():
        static = [f"1x{size}x{size}"] if backend == "openvino_static" else []
        for cfg in (True, False):
            name = artifact_name(backend, cfg)
            folder = root / name
            command = ["difflower", "export", str(source), "--backend", exporter, "--out", str(folder)]
            command += ["--components", *COMPONENTS] + [f"--static={s}" for s in static] + ([] if cfg else ["--no-cfg"])
            manifest = cached_manifest(folder, cfg, static)
            seconds = None
            if manifest is None:
                print(f"exporting {name} ...", flush=True)
                run = partial(export, source, exporter, folder, components=COMPONENTS, static=static, cfg=cfg)
                manifest, seconds = timed_result(run, overwrite=True, progress=False)
                print(f"  {seconds:.1f} s", flush=True)
            out[name] = {
                "folder": folder,
                "backend": backend,
                "cfg": cfg,
                "static": static,
                "export_s": seconds,  # None: reused from the cache
                "component_export_s": {k: r.export_seconds for k, r in manifest.components.items()},
                "parity": {
                    k: r.parity.summary + (" ok" if r.parity.passed else " MISSED")
                    for k, r in manifest.components.items()
                },
                "size_mib": {k: round(r.size_bytes / 2**20, 1) for k, r in manifest.components.items()},
                "command": shlex.join(command),
            }
    return out


def time_denoiser(pipe: Any, log: list[list[float]]) -> None:
    """Time every denoiser call of `pipe` into the newest list of `log` (one list per run)."""
    denoiser = pipe.calls.denoiser

    def call(*args: Any, **kwargs: Any) -> Any:  # whatever the loop passes (sample, timestep, cond, ...)
        prediction, seconds = timed_result(denoiser, *args, **kwargs)
        log[-1].append(seconds)
        return prediction

    pipe.calls.denoiser = call


def end_to_end(pipe: Any, log: list[list[float]], **kwargs: Any) -> Any:
    """One txt2img run (text encoding, loop, decode), its denoiser calls timed into a new list of `log`."""
    log.append([])
    return pipe(**kwargs)


def run_backend(backend: str, exports: dict, steps: dict[str, int], size: int, runs: int, warmup: int) -> list[dict]:
    """The backend's PNDM and LCM pipelines loaded together and interleaved; one row per sampler."""
    pipes, loads, logs, runners, commands = {}, {}, {}, {}, {}
    for sampler, (cfg, guidance) in SAMPLERS.items():
        folder = exports[artifact_name(backend, cfg)]["folder"]
        pipes[sampler], loads[sampler] = timed_result(difflower.load, folder, scheduler=sampler)
        logs[sampler] = []
        time_denoiser(pipes[sampler], logs[sampler])
        kwargs = dict(prompt=PROMPT, num_inference_steps=steps[sampler], guidance_scale=guidance, seed=SEED,
                      height=size, width=size, output_type="np", progress=False)  # fmt: skip
        runners[sampler] = partial(end_to_end, pipes[sampler], logs[sampler], **kwargs)
        commands[sampler] = shlex.join([
            "difflower", "generate", str(folder), "--prompt", PROMPT, "--steps", str(steps[sampler]),
            "--guidance", str(guidance), "--scheduler", sampler, "--seed", str(SEED),
            "--height", str(size), "--width", str(size), "-o", f"{backend}-{sampler}.png",
        ])  # fmt: skip
    print(f"{backend}: {warmup} warm-up + {runs} timed run(s) per sampler ...", flush=True)
    timings = interleaved(runners, runs, warmup=warmup)
    rows = []
    for sampler, (cfg, guidance) in SAMPLERS.items():
        t = timings[sampler]
        calls = logs[sampler][warmup:]  # the timed runs' denoiser calls
        unet_total = statistics.median(sum(c) for c in calls)
        rows.append({
            "backend": backend,
            "artifact": artifact_name(backend, cfg),
            "sampler": sampler,
            "steps": steps[sampler],
            "guidance_scale": guidance,
            "denoiser_batch": 2 if cfg else 1,
            "denoiser_calls": len(calls[0]),
            "load_s": loads[sampler],
            "end_to_end": t.to_json(),
            "runs_s": list(t.samples),
            "seconds": t.median_s,
            "unet_call_s": statistics.median(s for c in calls for s in c),
            "unet_total_s": unet_total,
            "rest_s": t.median_s - unet_total,  # text encoding, scheduler, VAE decode, postprocessing
            "command": commands[sampler],
        })  # fmt: skip
        print(f"  {sampler}: {t.median_s:.2f} s", flush=True)
    del pipes, runners
    gc.collect()
    return rows


def speedups(rows: list[dict]) -> dict[str, dict]:
    by = {(r["backend"], r["sampler"]): r for r in rows}
    out = {}
    for backend in BACKENDS:
        pndm, lcm = by[backend, "pndm"], by[backend, "lcm"]
        out[backend] = {
            "pndm_s": pndm["seconds"],
            "lcm_s": lcm["seconds"],
            "speedup": pndm["seconds"] / lcm["seconds"],
            "pndm_unet_call_s": pndm["unet_call_s"],
            "lcm_unet_call_s": lcm["unet_call_s"],
        }
    return out


def markdown(result: dict) -> str:
    lines = [
        "| backend | sampler | steps | guidance | UNet calls x batch | end-to-end s | s / UNet call | UNet s | rest s "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = result["speedup"][r["backend"]]["speedup"]
        lines.append(
            f"| {r['backend']} | {r['sampler']} | {r['steps']} | {r['guidance_scale']} "
            f"| {r['denoiser_calls']} x {r['denoiser_batch']} | {r['seconds']:.2f} | {r['unet_call_s']:.3f} "
            f"| {r['unet_total_s']:.2f} | {r['rest_s']:.2f} | {'' if r['sampler'] == 'pndm' else f'{ratio:.2f}x'} |"
        )
    lines += ["", "| artifact | export s | components' export s |", "|---|---|---|"]
    for name, e in result["exports"].items():
        seconds = "cached" if e["export_s"] is None else f"{e['export_s']:.1f}"
        parts = ", ".join(f"{k} {v:.1f}" for k, v in e["component_export_s"].items())
        lines.append(f"| {name} | {seconds} | {parts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="timed end-to-end runs per sampler (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed end-to-end runs per sampler first")
    parser.add_argument("--steps-pndm", type=int, default=20, help="steps of the PNDM runs (guidance 7.5)")
    parser.add_argument("--steps-lcm", type=int, default=4, help="steps of the LCM runs (guidance 1.0)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny checkpoint in a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/few-step-sd15.json)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    steps = {"pndm": args.steps_pndm, "lcm": args.steps_lcm}
    with tempfile.TemporaryDirectory(prefix="difflower-few-step-") as scratch:
        root, source, out = sd15_source(args.tiny, Path(scratch), args.out, "few-step-sd15")
        size = spec_from_configs(read_model_index(source)).native_size  # 512 for SD1.5
        exports = export_all(source, root, size)
        gc.collect()  # the exports' traced models, before two real-size pipelines load
        rows = [r for b in BACKENDS for r in run_backend(b, exports, steps, size, args.runs, args.warmup)]
    machine = machine_info()
    result = {
        "benchmark": (
            f"{'tiny SD' if args.tiny else 'SD1.5 (random weights)'} at {size}x{size}, fp32, end to end: "
            f"{args.steps_lcm}-step LCM (guidance 1.0, no-CFG artifact) vs {args.steps_pndm}-step PNDM "
            "(guidance 7.5, CFG artifact) on ONNX Runtime and OpenVINO static"
        ),
        "prompt": PROMPT,
        "seed": SEED,
        "warmup_runs": args.warmup,
        "timed_runs": args.runs,
        "exports": {k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in exports.items()},
        "rows": rows,
        "speedup": speedups(rows),
        "commands": {
            "benchmark": shlex.join(["python", "benchmarks/few_step_sd15.py", *sys.argv[1:]]),
            "exports": {k: v["command"] for k, v in exports.items()},
            "runs": {f"{r['backend']} {r['sampler']}": r["command"] for r in rows},
        },
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "versions": machine.get("versions", {}),
        "machine": machine,
    }
    write_result(out, result, markdown(result))


if __name__ == "__main__":
    main()
