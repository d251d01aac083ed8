"""One FLUX.1 denoiser call at real width and reduced depth (issues 17 and 20): torch eager against
ONNX Runtime and OpenVINO, and what the first-block cache's parts cost against a whole call.

    python benchmarks/flux_transformer.py [--double 2] [--single 2] [--size 512] [--runs 3]
    python benchmarks/flux_transformer.py --tiny   # smoke test: a tiny checkpoint (seconds)

The transformer is FLUX.1-dev's published config (24 heads of 128 = 3072 wide, T5 width 4096,
CLIP pooled 768, guidance embedding, rotary axes 16/56/56) with random weights, cut to --double
double-stream and --single single-stream blocks (19 and 38 in the real model); the text encoders
and VAE beside it are tiny (only the transformer is exported and timed). One call at --size px:
(size/16)^2 image tokens and FluxPipeline's 512 T5 tokens, batch 1 (distilled guidance doubles
nothing), fp32.

1. Exports (cached in $DIFFLOWER_BENCH_DIR), the transformer only: ONNX Runtime with
   `--cache-graphs first-block` (the whole transformer also returning its tail residual, the first
   double-stream block alone, and the output head fed a cached residual), OpenVINO static.
2. One process, interleaved, median of --runs after a warm-up: eager, ONNX Runtime and OpenVINO
   whole calls; eager and ONNX Runtime first-block and head calls (a reusing step runs both).

Writes benchmarks/results/flux-transformer.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, timed_result, write_result  # noqa: E402

from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.reference.loading import load_flux_transformer  # noqa: E402
from difflower.reference.tiny import TinyCLIP, make_tiny_checkpoint, tiny_spec  # noqa: E402
from difflower.reference.transformer_flux import FluxConfig, packed_inputs  # noqa: E402
from difflower.runtimes.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from difflower.runtimes.openvino_engine import OpenVINOEngine  # noqa: E402
from difflower.validate.bench import interleaved, machine_info  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402

FLUX_DEV = FluxConfig(
    in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip


def checkpoint(tiny: bool, double: int, single: int, scratch: Path) -> Path:
    if tiny:
        return make_tiny_checkpoint(scratch / "tiny-flux", "flux", seed=0)
    path = CACHE / f"flux-random-{double}x{single}"
    if not (path / "model_index.json").is_file():
        print(f"writing a random-weight FLUX.1-dev transformer ({double} + {single} blocks) to {path} ...", flush=True)
        spec = tiny_spec("flux")
        spec = replace(
            spec,
            transformer=replace(FLUX_DEV, num_layers=double, num_single_layers=single),
            clips=(TinyCLIP(hidden_size=768, num_attention_heads=12, num_hidden_layers=1),),
            t5_d_model=4096,
        )
        make_tiny_checkpoint(path, spec=spec, seed=0, overwrite=True)
    return path


def exported(source: Path, folder: Path, backend: str, **options) -> float | None:
    if (folder / "difflower.json").is_file():
        return None  # an earlier run's export, reused
    print(f"exporting {folder.name} ...", flush=True)
    _, seconds = timed_result(export, source, backend, folder, overwrite=True, progress=False, **options)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    source = checkpoint(args.tiny, args.double, args.single, scratch)
    size = 64 if args.tiny else args.size
    root = scratch if args.tiny else CACHE
    tag = "tiny" if args.tiny else f"flux-{args.double}x{args.single}"
    ort_dir, ov_dir = root / f"{tag}-onnx-fb", root / f"{tag}-openvino-{size}"
    bucket = [f"1x{size}x{size}"]
    seconds = {
        "onnxruntime": exported(
            source,
            ort_dir,
            "onnx",
            components=["transformer", "transformer_first", "transformer_tail"],
            cache_graphs="first-block",
            static=bucket,
        ),  # fmt: skip
        "openvino": exported(source, ov_dir, "openvino", components=["transformer"], static=bucket),
    }
    ort, ov = Manifest.read(ort_dir), Manifest.read(ov_dir)
    engines = {name: OnnxRuntimeEngine(ort.components[name], ort_dir) for name in ort.components}
    openvino = OpenVINOEngine(ov.components["transformer"], ov_dir, ov)
    model = load_flux_transformer(source / "transformer", torch.float32)

    gen = torch.Generator().manual_seed(0)
    latent = size // 8
    config = model.config
    inputs = packed_inputs(
        torch.randn(1, config.in_channels // 4, latent, latent, generator=gen),
        torch.full((1,), 500.0),
        torch.randn(1, 512, config.joint_attention_dim, generator=gen),
        torch.randn(1, config.pooled_projection_dim, generator=gen),
        torch.full((1,), 3.5),
    )
    with torch.no_grad():
        first, _ = model.first_block(**inputs)
        _, tail = model.forward_with_tail(**inputs)
    head = {"first_block_hidden": first, "tail_residual": tail, "pooled_projections": inputs["pooled_projections"],
            "timestep": inputs["timestep"], "guidance": inputs["guidance"]}  # fmt: skip

    def eager():
        with torch.no_grad():
            return model(**inputs)[0]

    def eager_first():
        with torch.no_grad():
            return model.first_block(**inputs)[0]

    def eager_head():
        with torch.no_grad():
            return model.forward_from_cache(**head)

    runners = {
        "torch_eager": eager,
        "onnxruntime": lambda: torch.as_tensor(engines["transformer"](inputs)["out_hidden_states"]),
        "openvino": lambda: torch.as_tensor(openvino(inputs)["out_hidden_states"]),
        "torch_eager_first_block": eager_first,
        "onnxruntime_first_block": lambda: engines["transformer_first"](inputs)["first_block_hidden"],
        "torch_eager_head": eager_head,
        "onnxruntime_head": lambda: engines["transformer_tail"](head)["out_hidden_states"],
    }
    outputs = {name: torch.as_tensor(run()) for name, run in runners.items()}
    timings = interleaved(runners, args.runs, warmup=1)
    median = {name: t.median_s for name, t in timings.items()}
    whole = {"torch_eager": median["torch_eager"], "onnxruntime": median["onnxruntime"]}
    reusing = {
        "torch_eager": median["torch_eager_first_block"] + median["torch_eager_head"],
        "onnxruntime": median["onnxruntime_first_block"] + median["onnxruntime_head"],
    }
    params = sum(p.numel() for p in model.parameters())
    result = {
        "benchmark": f"FLUX.1-dev transformer at real width, {config.num_layers} double + {config.num_single_layers} "
        f"single blocks ({params / 1e9:.2f} B parameters, random), one call at {size}x{size} "
        f"({(latent // 2) ** 2} image + 512 text tokens), batch 1, fp32",
        "median_s": median,
        "ratio_vs_torch_eager": {n: median[n] / median["torch_eager"] for n in ("onnxruntime", "openvino")},
        "reusing_step_fraction_of_whole": {n: reusing[n] / whole[n] for n in whole},
        "timings": {name: t.to_json() for name, t in timings.items()},
        "parity_vs_eager": {
            "onnxruntime": compare(outputs["onnxruntime"], outputs["torch_eager"]).to_json(),
            "openvino": compare(outputs["openvino"], outputs["torch_eager"]).to_json(),
            "onnxruntime_head": compare(outputs["onnxruntime_head"], outputs["torch_eager_head"]).to_json(),
        },
        "export_s": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": machine_info(),
        "command": "python benchmarks/flux_transformer.py " + " ".join(sys.argv[1:]),
    }
    rows = [f"| {name} | {median[name]:.3f} |" for name in runners]
    table = "| call | median s |\n|---|---|\n" + "\n".join(rows)
    table += "\n\n" + "\n".join(
        f"- {n}: a reusing step (first block + head) costs {reusing[n] / whole[n]:.3f} of a whole call" for n in whole
    )
    write_result(out_path(args), result, table)
    return 0


def out_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.tiny:
        return Path(tempfile.gettempdir()) / "flux-transformer-tiny.json"
    return HERE / "results" / "flux-transformer.json"


if __name__ == "__main__":
    raise SystemExit(main())
