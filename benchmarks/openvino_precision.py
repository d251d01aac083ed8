"""What OpenVINO's default inference precision buys an int8 UNet, and what it costs in numbers.

    python benchmarks/openvino_precision.py [ARTIFACT] [--runs 3] [--json PATH]

difflower compiles OpenVINO models with `INFERENCE_PRECISION_HINT=f32` on the CPU, so a CPU
with bf16 units (AVX512_BF16, AMX) computes what one without them computes. OpenVINO's own
default, which optimum-intel keeps for its int8 pipelines, runs the ops left in float in bf16
on such CPUs. This script loads one int8 (or fp32) OpenVINO artifact's UNet twice, with
`inference_precision=f32` and `=default`, times one CFG step (batch 2, 4x64x64 latents at
512x512, 77x768 text states) interleaved, and gives the PSNR of the default-precision output
against the f32 one. ARTIFACT defaults to the static int8 export benchmarks/peers.py makes
($DIFFLOWER_BENCH_DIR/peers-sd15/difflower_openvino_static_int8).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from difflower.artifact.manifest import Manifest
from difflower.runtimes.pipeline import make_engines
from difflower.validate.bench import interleaved, machine_info

CACHE = Path(os.environ.get("DIFFLOWER_BENCH_DIR", "/tmp/difflower-bench"))
DEFAULT_ARTIFACT = CACHE / "peers-sd15" / "difflower_openvino_static_int8"
PRECISIONS = ("f32", "default")


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    peak = float(reference.max() - reference.min())
    mse = float(((reference - other) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", nargs="?", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 64, 64, generator=generator),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 77, 768, generator=generator),
    }
    manifest = Manifest.read(args.artifact)
    engines = {p: make_engines(manifest, args.artifact, inference_precision=p)["unet"] for p in PRECISIONS}
    outputs = {p: torch.as_tensor(next(iter(engine(inputs).values()))) for p, engine in engines.items()}
    timings = interleaved({p: (lambda engine=engine: engine(inputs)) for p, engine in engines.items()}, runs=args.runs)

    result = {
        "benchmark": "OpenVINO inference precision, one CFG UNet step at 512x512",
        "artifact": str(args.artifact),
        "artifact_precision": manifest.precision,
        "passes": [p.get("name") for p in manifest.passes],
        "machine": machine_info(),
        "timings": {p: t.to_json() for p, t in timings.items()},
        "default_vs_f32": round(timings["default"].median_s / timings["f32"].median_s, 3),
        "psnr_default_vs_f32_db": round(psnr(outputs["f32"], outputs["default"]), 2),
    }
    for p, t in timings.items():
        print(f"inference_precision={p:8s} median {t.median_s:.3f} s")
    print(f"default / f32: {result['default_vs_f32']:.2f}x; output PSNR {result['psnr_default_vs_f32_db']} dB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
