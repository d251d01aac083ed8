"""`difflower bench` on real-size configs (random weights) at their native resolution.

    python benchmarks/bench_real.py --family sd15 --backends onnx openvino-static --steps 20

Builds the checkpoint (benchmarks/real_configs.py), exports it to each backend asked for
(cached in $DIFFLOWER_BENCH_DIR; `openvino-static` is OpenVINO with the native size as its
static bucket), then runs the bench protocol with the eager reference as the baseline and
writes benchmarks/results/bench-<family>.json and .png. Keep to at most two backends with the
reference on a 24 GiB machine: three real-size pipelines are the most that fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, checkpoint  # noqa: E402

from difflower.driver import export  # noqa: E402
from difflower.validate.bench import bench, plot, render  # noqa: E402

NATIVE = {"sd15": "1x512x512", "sdxl": "1x1024x1024", "sd3": "1x1024x1024"}
COMPONENTS = {"sd15": ("text_encoder", "unet", "vae_decoder"),
              "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
              "sd3": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")}  # fmt: skip


def artifact(family: str, backend: str, source: Path) -> Path:
    folder = CACHE / f"{family}-bench-{backend}"
    if not (folder / "difflower.json").is_file():
        base, _, variant = backend.partition("-")
        static = [NATIVE[family]] if variant == "static" or base in ("torchscript",) else []
        export(source, base, folder, components=COMPONENTS[family], static=static, overwrite=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(NATIVE), default="sd15")
    parser.add_argument("--backends", nargs="+", default=["onnx", "openvino-static"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    source = checkpoint(args.family)
    artifacts = [artifact(args.family, b, source) for b in args.backends]
    report = bench(artifacts, source, steps=args.steps, runs=args.runs, progress=True)
    print(render(report))
    out = HERE / "results" / f"bench-{args.family}.json"
    out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
