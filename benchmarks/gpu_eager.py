"""The eager reference on an NVIDIA GPU: fp16 parity on the tiny checkpoints, and the real-size
SDXL baseline (torch eager vs torch.compile) that the TensorRT backend is to be compared with.

    python benchmarks/gpu_eager.py [--out results.json] [--skip-compile]

1. Tiny sd / sdxl / sd3: the eager pipeline on CUDA in fp16 against the same pipeline on the
   CPU in fp32 (same seed, 4 steps): final-latent and image PSNR, judged by DESIGN.md's fp16
   gates; and CUDA fp32 against CPU fp32.
2. Real-size SDXL base config (random weights) at 1024x1024, 30 steps, batch 1, fp16 on CUDA:
   end-to-end time with torch eager, then with the UNet under torch.compile (compile time
   reported separately), in one process on one GPU, timed by difflower.validate.bench's harness;
   peak GPU memory; the compiled run's image PSNR against the eager one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import timed_result  # noqa: E402
from real_configs import real_spec  # noqa: E402

from difflower.reference.pipeline import load_pipeline  # noqa: E402
from difflower.reference.tiny import make_tiny_checkpoint  # noqa: E402
from difflower.validate.bench import Timing, interleaved, machine_info, timed  # noqa: E402
from difflower.validate.gates import image_verdict, trajectory_verdict  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402


def _run(pipe, steps: int, size: int | None = None):
    extra = {} if size is None else {"height": size, "width": size}
    return pipe("a watercolor painting of a lighthouse at sunset", num_inference_steps=steps, seed=0,
                output_type="np", return_trajectory=True, progress=False, **extra)  # fmt: skip


def fp32_noise() -> None:
    """Draw every noise tensor in fp32 and cast it, so runs in fp16 and fp32 start from the same
    noise: the pipeline draws in the run's dtype as diffusers' randn_tensor does, and torch 2.11
    draws different fp16 normals than fp32 ones for the same seed (torch 2.13 the same). The
    pipeline draws its noise in difflower.reference.latents."""
    import difflower.reference.latents as latents
    from difflower.reference.schedulers.base import randn_like_diffusers

    def draw(shape, generator, device, dtype):
        return randn_like_diffusers(shape, generator, device, torch.float32).to(dtype)

    latents.randn_like_diffusers = draw


def tiny_parity(root: Path) -> dict:
    results = {}
    for family in ("sd", "sdxl", "sd3"):
        try:
            path = make_tiny_checkpoint(root / family, family, seed=0)
            reference = _run(load_pipeline(path), 4)
            row = {}
            for name, dtype in (("cuda_fp32", torch.float32), ("cuda_fp16", torch.float16)):
                out = _run(load_pipeline(path, dtype=dtype, device="cuda"), 4)
                precision = "fp16" if dtype == torch.float16 else "fp32"
                final = out.trajectory[-1].float().cpu()
                expected = reference.trajectory[-1].float()
                latents = compare(final, expected)
                image = compare(np.asarray(out.images), np.asarray(reference.images))
                row[name] = {
                    "final_latents": {
                        **latents.to_json(),
                        **trajectory_verdict(precision, final, expected, latents).to_json(),
                    },
                    "image": {**image.to_json(), **image_verdict(precision, image).to_json()},
                }
            results[family] = row
        except Exception:  # report and go on: one family's failure should not hide the others
            results[family] = {"error": traceback.format_exc()[-1500:]}
        print(family, json.dumps(results[family])[:600], flush=True)
    return results


def _synchronized(pipe, steps: int, outputs: list):
    """One 1024x1024 generation that returns when the GPU is done; its output appended to `outputs`."""

    def run() -> None:
        outputs.append(_run(pipe, steps, 1024))
        torch.cuda.synchronize()

    return run


def _timed_runs(pipe, steps: int, runs: int) -> tuple[object, Timing]:
    """`runs` timed 1024x1024 generations (synchronized, no further warm-up): the last output and the timing."""
    outputs: list = []
    timing = interleaved({"run": _synchronized(pipe, steps, outputs)}, runs, warmup=0)["run"]
    return outputs[-1], timing


def sdxl_baseline(root: Path, steps: int, compile_unet: bool) -> dict:
    path, seconds = timed_result(make_tiny_checkpoint, root / "sdxl-real", spec=real_spec("sdxl"), seed=0)
    report: dict = {"checkpoint_write_s": seconds, "steps": steps, "size": 1024, "batch": 1}
    pipe = load_pipeline(path, dtype=torch.float16, device="cuda")
    _synchronized(pipe, 2, [])()  # warm-up: cuDNN/cuBLAS heuristics, allocator
    torch.cuda.reset_peak_memory_stats()
    eager, timing = _timed_runs(pipe, steps, 2)
    report["eager_s"] = list(timing.samples)
    report["eager_timing"] = timing.to_json()
    report["eager_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report["eager_image_finite"] = bool(np.isfinite(np.asarray(eager.images)).all())
    print("eager", report["eager_s"], flush=True)
    if compile_unet:
        unet = pipe.unet
        unet.compile()
        report["compile_warmup_s"] = timed(_synchronized(pipe, 2, []))
        compiled, timing = _timed_runs(pipe, steps, 2)
        report["compiled_s"] = list(timing.samples)
        report["compiled_timing"] = timing.to_json()
        report["compiled_vs_eager_image"] = compare(np.asarray(compiled.images), np.asarray(eager.images)).to_json()
        report["speedup_compiled_vs_eager"] = report["eager_timing"]["min_s"] / timing.min_s
        print("compiled", report["compiled_s"], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu-eager.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--fp32-noise", action="store_true", help="same noise for fp16 and fp32 runs (see fp32_noise)")
    args = parser.parse_args()
    if args.fp32_noise:
        fp32_noise()
    machine = machine_info()
    report: dict = {
        "gpu": machine.get("gpu"),
        "versions": {**machine["versions"], "cuda": torch.version.cuda},
        "machine": machine,
        "noise": "drawn in fp32 for every run" if args.fp32_noise else "drawn in the run's dtype (as diffusers)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["tiny_parity"] = tiny_parity(Path(tmp))
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        if not args.skip_sdxl:
            try:
                report["sdxl_1024"] = sdxl_baseline(Path(tmp), args.steps, not args.skip_compile)
            except Exception:
                report["sdxl_1024"] = {"error": traceback.format_exc()[-2000:]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
