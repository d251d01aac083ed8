"""OpenVINO vs the other CPU paths on the real-size SD1.5 config (issue 5), random weights, 512x512.

    python benchmarks/openvino_sd15.py [--runs 5] [--warmup 2] [--steps 20]

1. Exports (cached in $DIFFLOWER_BENCH_DIR): ONNX; OpenVINO dynamic; OpenVINO static 1x512x512;
   OpenVINO static + hybrid int8 (calibrated on the repository prompt set).
2. One CFG UNet step (batch 2, 4x64x64 latents) in one process, interleaved, at most three
   real-size engines at a time: [eager, onnxruntime, openvino dynamic], then [eager, openvino
   static, openvino static int8]; 2 warm-ups, median of 5 (difflower.validate.bench's harness).
   OpenVINO compile time cold and from its model cache.
3. A 20-step txt2img run per backend (one at a time, same prompt and seed, PNDM, guidance 7.5),
   with its final latents and image compared with the eager run (trajectory and image parity).

Writes benchmarks/results/openvino-sd15.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, checkpoint, sd15_step_inputs, timed_result  # noqa: E402

import difflower  # noqa: E402
from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.reference.loading import load_unet  # noqa: E402
from difflower.runtimes.pipeline import make_engines  # noqa: E402
from difflower.validate.bench import interleaved, machine_info, timed  # noqa: E402
from difflower.validate.gates import image_verdict, trajectory_verdict  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PROMPT = "a watercolor painting of a lighthouse at sunset"


def export_all(source: Path) -> dict[str, dict]:
    plans = {
        "onnxruntime": ("onnx", {}),
        "openvino_dynamic": ("openvino", {}),
        "openvino_static": ("openvino", {"static": ["1x512x512"]}),
        "openvino_static_int8": (
            "openvino",
            {
                "static": ["1x512x512"],
                "quantize": "int8",
                "calibration_prompts": 4,
                "calibration_steps": 5,
                "allow_mismatch": True,
            },
        ),  # fmt: skip
    }
    out = {}
    for name, (backend, options) in plans.items():
        folder = CACHE / f"sd15-{name}"
        if not (folder / "difflower.json").is_file():
            print(f"exporting {name} ...", flush=True)
            seconds = timed(partial(export, source, backend, folder, components=COMPONENTS, overwrite=True, **options))
            print(f"  {seconds:.0f} s", flush=True)
        manifest = Manifest.read(folder)
        out[name] = {
            "folder": folder,
            "precision": manifest.precision,
            "parity": {
                k: r.parity.summary + (" ok" if r.parity.passed else " MISSED") for k, r in manifest.components.items()
            },  # fmt: skip
            "export_seconds": {k: r.export_seconds for k, r in manifest.components.items()},
            "size_mib": {k: round(r.size_bytes / 2**20, 1) for k, r in manifest.components.items()},
        }
    return out


def unet_engine(folder: Path, **options):
    manifest = Manifest.read(folder)
    only_unet = Manifest(**{**manifest.__dict__, "components": {"unet": manifest.components["unet"]}})
    return make_engines(only_unet, folder, **options)["unet"]


def time_group(runners: dict, runs: int, warmup: int) -> dict:
    """The first call of each runner is the first warm-up (its output is kept for parity); the
    harness does the other warm-ups and the interleaved runs."""
    outputs = {name: run() for name, run in runners.items()}
    timings = interleaved(runners, runs, warmup=max(warmup - 1, 0))
    reference = outputs["torch_eager"]
    return {
        name: {
            **t.to_json(),
            "runs_s": list(t.samples),
            "parity_vs_eager": compare(outputs[name], reference).to_json(),
        }
        for name, t in timings.items()
    }


def unet_step(exports: dict, source: Path, runs: int = 5, warmup: int = 2) -> dict:
    inputs = sd15_step_inputs()
    unet = load_unet(source / "unet", torch.float32)

    def eager():
        with torch.no_grad():
            return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample

    def runner(engine):
        return lambda: torch.from_numpy(np.asarray(engine(inputs)["out_sample"]))

    results: dict = {}
    cache = CACHE / "openvino-cache"
    load_times = {}
    for group in (("onnxruntime", "openvino_dynamic"), ("openvino_static", "openvino_static_int8")):
        engines = {}
        for name in group:
            options = {"cache_dir": str(cache)} if name.startswith("openvino") else {}
            engines[name], seconds = timed_result(unet_engine, exports[name]["folder"], **options)
            if name.startswith("openvino"):
                second, again = timed_result(unet_engine, exports[name]["folder"], **options)
                load_times[name] = {
                    "first_load_s": seconds,
                    "first_loaded_from_cache": engines[name].loaded_from_cache,
                    "second_load_s": again,
                    "second_loaded_from_cache": second.loaded_from_cache,
                }
                del second
        measured = time_group({"torch_eager": eager, **{n: runner(e) for n, e in engines.items()}}, runs, warmup)
        results[" + ".join(("torch_eager", *group))] = measured
        del engines
        gc.collect()
    return {"groups": results, "openvino_unet_load": load_times}


def end_to_end(exports: dict, source: Path, steps: int = 20) -> dict:
    kwargs = dict(prompt=PROMPT, num_inference_steps=steps, height=512, width=512, output_type="np",
                  return_trajectory=True, progress=False)  # fmt: skip
    results = {}
    eager_out = None
    for name in ("torch_eager", *exports):
        pipe = difflower.load(source) if name == "torch_eager" else difflower.load(exports[name]["folder"])
        out, seconds = timed_result(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
        entry = {"seconds": seconds, "denoiser_calls": len(out.trajectory)}
        if name == "torch_eager":
            eager_out = out
        else:
            precision = exports[name]["precision"]
            latents = compare(out.trajectory[-1], eager_out.trajectory[-1])
            image = compare(out.images, eager_out.images)
            entry["final_latents"] = {
                **latents.to_json(),
                **trajectory_verdict(precision, out.trajectory[-1], eager_out.trajectory[-1], latents).to_json(),
            }
            entry["image"] = {**image.to_json(), **image_verdict(precision, image).to_json()}
        results[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k == "seconds"}), flush=True)
        del pipe
        gc.collect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed UNet steps per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="UNet warm-up calls per engine")
    parser.add_argument("--steps", type=int, default=20, help="steps of the end-to-end runs")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    source = checkpoint("sd15")
    exports = export_all(source)
    result = {
        "benchmark": "SD1.5 (random weights) at 512x512, fp32 unless quantized",
        "exports": {k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in exports.items()},
        "unet_step": unet_step(exports, source, args.runs, args.warmup),
    }
    result[f"end_to_end_{args.steps}_steps"] = end_to_end(exports, source, args.steps)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["machine"] = machine_info()
    out = HERE / "results" / "openvino-sd15.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
