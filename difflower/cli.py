"""The `difflower` command line.

Argument parsing lives here and nowhere else: each subcommand turns its flags into plain
keyword arguments of a library function. A user mistake (`DifflowerError`) is printed as one
line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from difflower.errors import ArgumentError, DifflowerError
from difflower.exporters import BACKENDS
from difflower.runtimes.pipeline import ENGINES


def _cmd_tiny(args: argparse.Namespace) -> int:
    from difflower.reference.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.dir, family=args.family, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {args.family} checkpoint (seed {args.seed}) to {out}")
    return 0


def _open_image(path: Path | None, flag: str):
    if path is None:
        return None
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as err:
        raise ArgumentError(flag, f"cannot read image {path} ({err})") from None


def _save_images(images: list, out: Path) -> list[Path]:
    """Save PIL images to `out` (several: OUT-0.png, OUT-1.png, ...), each written then renamed into place."""
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        partial = path.with_name(f".{path.name}.partial")
        image.save(partial, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
        partial.replace(path)
    return paths


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import difflower

    if args.output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ArgumentError("-o", f"{args.output} must end in .png, .jpg or .webp")
    pipe = difflower.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        scheduler=args.scheduler,
        engine=args.engine,
        threads=args.threads,
        **_engine_options(args),
    )
    start = time.perf_counter()
    result = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        image=_open_image(args.image, "--image"),
        mask_image=_open_image(args.mask, "--mask"),
        strength=args.strength,
        output_type="pil",
    )
    elapsed = time.perf_counter() - start
    paths = _save_images(result.images, args.output)
    size = f"{result.images[0].width}x{result.images[0].height}"
    print(f"wrote {', '.join(map(str, paths))} ({size}, {len(result.timesteps)} steps, {elapsed:.1f} s)")
    return 0


def _engine_options(args: argparse.Namespace) -> dict:
    """Engine settings given on the command line (only those set, so engines refuse what they lack)."""
    options = {}
    for pair in getattr(args, "engine_option", None) or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ArgumentError("--engine-option", f"expected KEY=VALUE, got {pair!r}")
        options[key.replace("-", "_")] = value
    if getattr(args, "compute_units", None):
        options["compute_units"] = args.compute_units
    if getattr(args, "data_parallel", False):
        options["data_parallel"] = True
    return options


def _cmd_export(args: argparse.Namespace) -> int:
    from difflower.exporters import export

    manifest = export(
        args.model,
        args.backend,
        args.out,
        components=args.components,
        static=args.static or (),
        precision=args.precision,
        attention=args.attention,
        fuse_qkv=args.fuse_qkv,
        cfg=not args.no_cfg,
        allow_mismatch=args.allow_mismatch,
        overwrite=args.overwrite,
        quantize=args.quantize,
        calibration_prompts=args.calibration_prompts,
        calibration_steps=args.calibration_steps,
        auto_cast=args.auto_cast,
        auto_cast_type=args.auto_cast_type,
        chunk_unet=args.chunk_unet or None,
    )
    print(f"wrote {args.out} ({manifest.backend}, {manifest.precision}, {manifest.shapes['graph']} shapes)")
    print(f"  {'component':<16} {'export s':>8} {'MB':>9}  parity")
    for record in manifest.components.values():
        p = record.parity
        verdict = {True: "ok", False: "MISSED (kept by --allow-mismatch)", None: "not measured here"}[p["passed"]]
        print(
            f"  {record.name:<16} {record.export_seconds:>8.1f} {record.size_bytes / 2**20:>9.1f}  "
            f"{p['summary']}; {p['gate']}: {verdict}"
        )
    return 0


def _write_json(path: Path | None, data: dict, label: str) -> None:
    """Write a command's JSON report to `path` (if given), creating its folder."""
    if path is None:
        return
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"  {label}: {path}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from difflower.validate.parity import validate_artifact
    from difflower.validate.report import render

    report = validate_artifact(
        args.artifact,
        args.reference,
        steps=args.steps,
        prompt=args.prompt,
        seed=args.seed,
        engine=args.engine,
        device=args.device,
        allow_source_mismatch=args.allow_mismatch,
        engine_options=_engine_options(args),
    )
    print(render(report))
    _write_json(args.json, report.to_json(), "full report")
    return 0 if report.passed else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from difflower.validate.bench import bench, plot, render

    report = bench(
        args.artifacts,
        args.reference,
        steps=args.steps,
        runs=args.runs,
        warmup=args.warmup,
        prompt=args.prompt,
        seed=args.seed,
    )
    print(render(report))
    _write_json(args.json, report, "report")
    if args.plot is not None:
        try:
            print(f"  chart: {plot(report, args.plot)}")
        except ModuleNotFoundError:
            raise ArgumentError("--plot", "needs matplotlib: pip install 'difflower[bench]'") from None
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from difflower.manifest import Manifest

    manifest = Manifest.read(args.artifact)
    shapes = manifest.shapes
    buckets = ", ".join("x".join(map(str, b)) for b in shapes.get("buckets", [])) or "any"
    print(f"{args.artifact}: {manifest.family} artifact, backend {manifest.backend}, precision {manifest.precision}")
    print(f"  created {manifest.created_at} from {manifest.source.get('path')}")
    print(
        f"  shapes: {shapes.get('graph')} graphs, buckets {buckets}, CFG doubles the denoiser batch: "
        f"{shapes.get('cfg_doubles_denoiser_batch')}"
    )
    print(f"  passes: {', '.join(p.get('name', '?') for p in manifest.passes) or 'none'}")
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    for record in manifest.components.values():
        ins = ", ".join(f"{t.name} {t.dtype}[{','.join(map(str, t.shape))}]" for t in record.inputs)
        outs = ", ".join(f"{t.name}[{','.join(map(str, t.shape))}]" for t in record.outputs)
        verdict = {True: "ok", False: "MISSED", None: "not measured"}[record.parity.get("passed", False)]
        detail = record.parity.get("summary", "")
        print(f"  {record.name}: {record.size_bytes / 2**20:.1f} MB, parity {verdict} ({detail})")
        print(f"    in:  {ins}")
        print(f"    out: {outs}")
        if record.config.get("ops"):  # backends that list their program's operations (Core ML)
            print("    ops: " + ", ".join(f"{op} x{n}" for op, n in record.config["ops"].items()))
        for chunk in record.config.get("chunks", []):  # a denoiser exported as chained packages
            size = f"{chunk['weight_bytes'] / 2**20:.1f} MiB of weights before compression"
            print(f"    {chunk['name']}: {chunk['stages'][0]}..{chunk['stages'][-1]}, {size}, {chunk['file']}")
    return 0


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default=None, help="for artifacts: the engine to run them on")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's own)")
    parser.add_argument("--engine-option", action="append", metavar="KEY=VALUE", help="an engine setting (repeatable)")
    parser.add_argument("--data-parallel", action="store_true", help="neuron: split the CFG batch over two cores")
    parser.add_argument(
        "--compute-units", choices=("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE"), help="coreml (macOS): where to run"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflower",
        description="Lower Stable-Diffusion-family models to accelerator backends and prove parity.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny", help="write a tiny random checkpoint in diffusers format")
    tiny.add_argument("dir", type=Path, metavar="DIR", help="output folder")
    tiny.add_argument("--family", choices=("sd", "sdxl", "sd3"), default="sd")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    tiny.set_defaults(handler=_cmd_tiny)

    gen = commands.add_parser("generate", help="generate images with a checkpoint (eager reference)")
    gen.add_argument("model", type=Path, metavar="MODEL", help="a diffusers-format checkpoint or an artifact folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the family's)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--scheduler", default=None, help="swap the scheduler: euler, euler-a, ddim, pndm, dpm++2m, ...")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--image", type=Path, default=None, help="init image (img2img, or inpainting with --mask)")
    gen.add_argument("--mask", type=Path, default=None, help="inpainting mask (white = repaint)")
    gen.add_argument("--strength", type=float, default=None, help="img2img/inpainting strength in [0, 1]")
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    gen.add_argument("--device", default="cpu")
    _add_engine_flags(gen)
    gen.add_argument("-o", "--output", type=Path, required=True, help="output image (.png)")
    gen.set_defaults(handler=_cmd_generate)

    exp = commands.add_parser("export", help="export a checkpoint to a backend artifact, checked against the reference")
    exp.add_argument("model", type=Path, metavar="MODEL", help="diffusers-format checkpoint folder")
    exp.add_argument("--backend", required=True, help=f"one of {', '.join(BACKENDS)}")
    exp.add_argument("--quantize", default=None, help="backend compression, e.g. int8-weight, int4-weight, int8")
    exp.add_argument("--auto-cast", default=None, choices=("none", "matmul", "all"), help="neuron: ops to cast")
    exp.add_argument("--auto-cast-type", default=None, choices=("bf16", "fp16", "tf32"), help="neuron: cast type")
    exp.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    exp.add_argument(
        "--precision", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp32 (coreml: fp16 compute)"
    )
    exp.add_argument("--static", action="append", metavar="BxHxW", help="static shape bucket (repeatable)")
    exp.add_argument(
        "--attention",
        choices=("sdpa", "math", "onnxruntime", "split-einsum", "split-einsum-v2"),
        default="sdpa",
        help="attention variant: onnxruntime = ORT's fused MultiHeadAttention (faster on ORT, ORT-only graph)",
    )
    exp.add_argument("--fuse-qkv", action="store_true", help="fuse the denoiser's attention projections (one matmul)")
    exp.add_argument(
        "--chunk-unet", action="store_true", help="coreml: the UNet as two chained packages (iOS, < 1 GiB each)"
    )
    exp.add_argument("--calibration-prompts", type=int, default=None, help="int8: prompts to calibrate on (default 8)")
    exp.add_argument("--calibration-steps", type=int, default=None, help="int8: steps per calibration prompt (10)")
    exp.add_argument("--components", nargs="+", default=None, help="export only these components")
    exp.add_argument("--no-cfg", action="store_true", help="static denoiser batch without guidance doubling")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    exp.add_argument("--allow-mismatch", action="store_true", help="keep the artifact when a parity gate is missed")
    exp.set_defaults(handler=_cmd_export)

    val = commands.add_parser("validate", help="parity of an artifact vs the eager reference (exit 1 on a miss)")
    val.add_argument("artifact", type=Path, metavar="ARTIFACT")
    val.add_argument("--reference", type=Path, required=True, metavar="MODEL", help="the source checkpoint")
    val.add_argument("--steps", type=int, default=4)
    val.add_argument("--prompt", default="a watercolor painting of a lighthouse at sunset")
    val.add_argument("--seed", type=int, default=0)
    _add_engine_flags(val)
    val.add_argument("--device", default="cpu")
    val.add_argument("--json", type=Path, default=None, help="write the full report here")
    val.add_argument("--allow-mismatch", action="store_true", help="compare even if MODEL is not the source")
    val.set_defaults(handler=_cmd_validate)

    ben = commands.add_parser("bench", help="one benchmark protocol for the reference and artifacts")
    ben.add_argument("artifacts", type=Path, nargs="*", metavar="ARTIFACT")
    ben.add_argument("--reference", type=Path, default=None, metavar="MODEL", help="the eager baseline")
    ben.add_argument("--steps", type=int, default=4, help="steps of the end-to-end run")
    ben.add_argument("--runs", type=int, default=3, help="timed runs per component (median reported)")
    ben.add_argument("--warmup", type=int, default=1)
    ben.add_argument("--prompt", default="a watercolor painting of a lighthouse at sunset")
    ben.add_argument("--seed", type=int, default=0)
    ben.add_argument("--json", type=Path, default=None, help="write the report here")
    ben.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="latency chart")
    ben.set_defaults(handler=_cmd_bench)

    info = commands.add_parser("info", help="summarise an artifact's manifest")
    info.add_argument("artifact", type=Path, metavar="ARTIFACT")
    info.set_defaults(handler=_cmd_info)
    return parser


# Python keyword -> the flag a CLI user typed, so errors name what the user can change.
_FLAGS = {
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "num_images_per_prompt": "--num-images",
    "image": "--image",
    "mask_image": "--mask",
    "strength": "--strength",
    "dtype": "--dtype",
    "generator": "--seed",
}


def _message(err: DifflowerError) -> str:
    if isinstance(err, ArgumentError) and err.name in _FLAGS:
        return f"argument {_FLAGS[err.name]}: {err.detail}"
    return str(err)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except DifflowerError as err:
        print(f"difflower {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difflower {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
