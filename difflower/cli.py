"""The `difflower` command line.

Argument parsing lives here and nowhere else: each subcommand checks what it can before any
model is loaded (output paths, input images, numbers), then turns its flags into keyword
arguments of a library function. A user mistake (`DifflowerError`), an argparse error and a
fault of the environment (a full disk, a read-only folder) are printed as one line on stderr
with exit status 2; anything else is a bug and keeps its traceback. SIGTERM and SIGHUP stop a
command like Ctrl-C does: what it was writing is removed, nothing half-written is left.
"""

from __future__ import annotations

import argparse
import errno
import math
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from difflower.errors import ArgumentError, DifflowerError
from difflower.exporters import BACKENDS
from difflower.hub import is_repo_id
from difflower.runtimes import ENGINES
from difflower.threads import ThreadPolicy, prepare_process, threads_for_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so every writer cleans up as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame: Any) -> NoReturn:
    raise Terminated(signum)


# -- argument types: a bad value is refused by the parser, before anything is loaded ---------------


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): `difflower CMD: error: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- checks before any work ----------------------------------------------------------------------


def _output_paths(out: Path, count: int) -> list[Path]:
    """Where `count` images go: OUT itself, or OUT-0, OUT-1, ... beside it."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _check_output(path: Path | None, overwrite: bool, flag: str, suffixes: tuple[str, ...]) -> None:
    from difflower.atomic import check_destination

    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise ArgumentError(flag, f"{path} must end in {', '.join(suffixes)}")
    check_destination(path, overwrite=overwrite, argument=flag, what="file")


def _open_image(path: Path | None, flag: str):
    if path is None:
        return None
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise ArgumentError(flag, f"cannot read image {path} ({err})") from None


def _write_image(image: Any, path: Path, overwrite: bool, metadata: dict[str, str]) -> None:
    """Save one image through a temporary file, with the generation settings in its PNG text."""
    from difflower.atomic import atomic_file
    from difflower.bulk import encode_image

    kind = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    data = encode_image(image, kind, metadata)
    with atomic_file(path, overwrite=overwrite, argument="-o") as tmp:
        tmp.write_bytes(data)


# -- the commands ---------------------------------------------------------------------------------


def _cmd_tiny(args: argparse.Namespace) -> int:
    from difflower.reference.tiny import make_tiny_checkpoint, make_tiny_controlnet

    if args.controlnet_for is not None:
        out = make_tiny_controlnet(args.dir, args.controlnet_for, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote a tiny ControlNet (seed {args.seed}) for {args.controlnet_for} to {out}")
        return 0
    out = make_tiny_checkpoint(args.dir, family=args.family, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {args.family} checkpoint (seed {args.seed}) to {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from difflower.reference.single_file import convert_single_file

    if args.config_from is None:
        raise ArgumentError(
            "--config-from",
            "a single file holds weights only: pass the diffusers folder or Hub repo id of its base model "
            "(configs, tokenizers, scheduler), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5",
        )
    out = convert_single_file(
        args.file, args.config_from, args.out, prediction_type=args.prediction_type, overwrite=args.overwrite
    )
    print(f"wrote {out} (diffusers format, from {args.file} with the configs of {args.config_from})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    # 1. everything that can be checked before a model is loaded
    bulk = args.prompts is not None
    _check_generate_mode(args, bulk)
    paths = [] if bulk else _output_paths(args.output, args.num_images)
    for path in paths:
        _check_output(path, args.overwrite, "-o", IMAGE_SUFFIXES)
    image, mask = _open_image(args.image, "--image"), _open_image(args.mask, "--mask")
    controls = [_open_image(path, "--control-image") for path in args.control_image or []]
    if args.strength is not None and image is None:
        raise ArgumentError("--strength", "applies to img2img and inpainting: pass --image as well")
    if mask is not None and image is None:
        raise ArgumentError("--mask", "needs the image to inpaint: pass --image as well")
    call = dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        image=image,
        mask_image=mask,
        strength=args.strength,
        check_memory=not args.no_memory_check,
        cache=args.cache,
        **_control_arguments(args, controls),
        **({"true_cfg_scale": args.true_cfg_scale} if args.true_cfg_scale is not None else {}),
    )
    load_options = dict(
        dtype=args.dtype,
        device=args.device,
        variant=args.variant,
        scheduler=args.scheduler,
        lora=args.lora,
        controlnet=args.controlnet,
        engine=args.engine,
        threads=args.threads,
        compile=args.compile,
        **_engine_options(args),
    )
    model = str(args.model) if is_repo_id(args.model) else str(Path(args.model).absolute())
    if bulk:
        return _generate_bulk(args, model, load_options, call)

    # 2. load, then run
    import difflower
    from difflower.bulk import image_metadata

    pipe = difflower.load(args.model, **load_options)
    start = time.perf_counter()
    result = pipe(prompt=args.prompt, seed=args.seed, output_type="pil", **call)
    elapsed = time.perf_counter() - start

    # 3. save
    scheduler = type(pipe.scheduler).__name__
    metadata = image_metadata(
        model, args.prompt, args.negative_prompt, args.seed, args.guidance, len(result.timesteps), scheduler
    )
    replaced = [p for p in paths if p.exists()]
    for picture, path in zip(result.images, paths, strict=True):
        _write_image(picture, path, args.overwrite, metadata)
    size = f"{result.images[0].width}x{result.images[0].height}"
    note = f"; replaced {', '.join(map(str, replaced))}" if replaced else ""
    cached = ""
    if result.full_steps is not None:
        denoiser = "transformer" if pipe.spec.is_transformer else "UNet"
        cached = f", {sum(result.full_steps)} of them with the whole {denoiser} ({args.cache})"
    print(f"wrote {', '.join(map(str, paths))} ({size}, {len(result.timesteps)} steps{cached}, {elapsed:.1f} s{note})")
    return 0


def _check_generate_mode(args: argparse.Namespace, bulk: bool) -> None:
    """One prompt to -o, or a prompt file to --out-dir: each mode's flags, and not the other's."""
    if bulk:
        for given, flag in ((args.prompt, "--prompt"), (args.output, "-o")):
            if given is not None:
                raise ArgumentError(flag, "does not go with --prompts (the prompt file's images go to --out-dir)")
        if args.out_dir is None:
            raise ArgumentError("--out-dir", "is required with --prompts: the folder the images go to")
        if args.overwrite:
            raise ArgumentError("--overwrite", "a --prompts run never replaces images; use another --out-dir")
        if args.workers is not None and not args.ray:
            raise ArgumentError("--workers", "needs --ray")
        if args.ray:
            _require_extra("generate --ray", ("ray",), "ray")
        return
    for given, flag in ((args.out_dir, "--out-dir"), (args.ray or None, "--ray"), (args.workers, "--workers")):
        if given is not None:
            raise ArgumentError(flag, "goes with --prompts FILE (bulk generation)")
    for given, flag in ((args.prompt, "--prompt"), (args.output, "-o")):
        if given is None:
            raise ArgumentError(flag, "is required (or --prompts FILE --out-dir DIR for a prompt file)")


def _generate_bulk(args: argparse.Namespace, model: str, load_options: dict, call: dict) -> int:
    from difflower import bulk

    prompts = bulk.read_prompts(args.prompts)
    fingerprint = {
        "model": model,
        **{k: v for k, v in load_options.items() if k not in ("threads", "device", "engine")},
        **{k: v for k, v in call.items() if k not in ("image", "mask_image", "control_image", "check_memory")},
        **{flag: _file_digest(path) for flag, path in (("image", args.image), ("mask", args.mask)) if path},
        "control_images": [_file_digest(p) for p in args.control_image or []],
    }
    tasks = bulk.plan(prompts, args.seed, args.num_images, fingerprint)
    start = time.perf_counter()
    written, skipped = bulk.run(tasks, args.out_dir, model, load_options, call, ray=args.ray, workers=args.workers)
    elapsed = time.perf_counter() - start
    kept = f"; {skipped} already there" if skipped else ""
    print(f"wrote the images of {written} prompts to {args.out_dir} ({elapsed:.1f} s{kept})")
    return 0


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _control_arguments(args: argparse.Namespace, controls: list) -> dict:
    """The ControlNet arguments of a generate call (only those given, so the defaults are the pipeline's)."""
    out: dict = {}
    if controls:
        out["control_image"] = controls[0] if len(controls) == 1 else controls
    for flag, key in (
        ("control_scale", "controlnet_conditioning_scale"),
        ("control_start", "control_guidance_start"),
        ("control_end", "control_guidance_end"),
    ):
        values = getattr(args, flag)
        if values:
            out[key] = values[0] if len(values) == 1 else values
    if args.guess_mode:
        out["guess_mode"] = True
    return out


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
    from difflower.driver import export

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
        device=args.device,
        lora=args.lora or (),
        controlnet=args.controlnet or (),
        cache_graphs=args.cache_graphs,
        lora_slots=args.lora_slots,
        stream_weights=args.stream_weights,
    )
    print(f"wrote {args.out} ({manifest.backend}, {manifest.precision}, {manifest.shapes['graph']} shapes)")
    print(f"  {'component':<16} {'export s':>8} {'MB':>9}  parity")
    for record in manifest.components.values():
        p = record.parity
        verdict = {True: "ok", False: "MISSED (kept by --allow-mismatch)", None: "not measured here"}[p.passed]
        print(
            f"  {record.name:<16} {record.export_seconds:>8.1f} {record.size_bytes / 2**20:>9.1f}  "
            f"{p.summary}; {p.gate}: {verdict}"
        )
    return 0


def _write_json(path: Path | None, data: dict, label: str, overwrite: bool) -> None:
    """Write a command's JSON report to `path` (if given) through a temporary file."""
    if path is None:
        return
    import json

    from difflower.atomic import atomic_file

    with atomic_file(path, overwrite=overwrite, argument="--json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    print(f"  {label}: {path}")


def _cmd_validate(args: argparse.Namespace) -> int:
    _check_output(args.json, args.overwrite, "--json", (".json",))
    _check_output(args.html, args.overwrite, "--html", (".html", ".htm"))
    if args.html is not None and args.json is not None and args.html.resolve() == args.json.resolve():
        raise ArgumentError("--html", "is the same file as --json; give each its own")
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
        cache=args.cache,
    )
    print(render(report))
    _write_json(args.json, report.to_json(), "full report", args.overwrite)
    if args.html is not None:
        from difflower.atomic import atomic_file
        from difflower.validate.html import render_html

        with atomic_file(args.html, overwrite=args.overwrite, argument="--html") as tmp:
            tmp.write_text(render_html(report), encoding="utf-8")
        print(f"  page: {args.html}")
    return 0 if report.passed else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    _check_output(args.json, args.overwrite, "--json", (".json",))
    _check_output(args.plot, args.overwrite, "--plot", (".png",))
    from difflower.validate.bench import bench, plot, render

    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401 - checked before the benchmark, not after it
        except ModuleNotFoundError:
            raise ArgumentError("--plot", "needs matplotlib: pip install 'difflower[bench]'") from None
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
    _write_json(args.json, report.to_json(), "report", args.overwrite)
    if args.plot is not None:
        from difflower.atomic import atomic_file

        with atomic_file(args.plot, overwrite=args.overwrite, argument="--plot") as tmp:
            plot(report, tmp)
        print(f"  chart: {args.plot}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from difflower.serve import ServeSettings, serve

    settings = ServeSettings(args.max_batch, args.max_wait_ms, args.queue_size, args.timeout)
    options = _engine_options(args)
    _require_serve_extra()
    import difflower

    if args.ray or args.replicas is not None or args.max_replicas is not None:
        if not args.ray:
            raise ArgumentError("--replicas" if args.replicas is not None else "--max-replicas", "needs --ray")
        _require_extra("serve --ray", ("ray",), "ray")
        from difflower import serve_ray

        application = serve_ray.build(
            args.model,
            settings,
            replicas=args.replicas or 1,
            max_replicas=args.max_replicas,
            device=args.device,
            engine=args.engine,
            threads=args.threads,
            engine_options=options,
        )
        serve_ray.run(application, args.host, args.port, settings)
        return 0
    pipe = difflower.load(args.model, device=args.device, engine=args.engine, threads=args.threads, **options)
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (Ctrl-C drains the queue and stops)", flush=True)
    serve(pipe, args.host, args.port, settings, source=str(args.model))
    return 0


def _require_serve_extra() -> None:
    _require_extra("serve", ("starlette", "uvicorn", "prometheus_client", "multipart"), "serve")


def _require_extra(what: str, modules: tuple[str, ...], extra: str) -> None:
    import importlib.util

    missing = [m for m in modules if not importlib.util.find_spec(m)]
    if missing:
        raise DifflowerError(f"{what} needs {', '.join(missing)}: pip install 'difflower[{extra}]'")


def _cmd_info(args: argparse.Namespace) -> int:
    from difflower.artifact.manifest import Manifest

    manifest = Manifest.read(args.artifact)
    shapes = manifest.shapes
    buckets = ", ".join("x".join(map(str, b)) for b in shapes.get("buckets", [])) or "any"
    print(f"{args.artifact}: {manifest.family} artifact, backend {manifest.backend}, precision {manifest.precision}")
    hub = manifest.source.get("hub")
    single = manifest.source.get("single_file")
    origin = manifest.source.get("path")
    if hub:
        origin = f"{hub['repo_id']}@{hub['commit']} (revision {hub['revision']})"
    elif single:
        origin = f"{single['path']} (single file, sha256 {single['sha256'][:12]}...)"
    print(f"  created {manifest.created_at} from {origin}")
    for lora in manifest.source.get("loras", []):
        modules = ", ".join(f"{name} {count}" for name, count in lora["modules"].items())
        detail = f"{lora['format']}; {modules} modules; sha256 {lora['sha256'][:12]}"
        print(f"  LoRA fused: {lora['path']} x {lora['scale']} ({detail})")
    for record in manifest.components.values():
        if record.config.get("lora_slots"):
            count = sum(t.name.startswith("lora_down.") for t in record.inputs)
            print(f"  LoRA slots: rank {record.config['lora_slots']} on {count} projections of {record.name} "
                  "(generate --lora FILE[:SCALE] runs any LoRA there)")  # fmt: skip
    for k, record in enumerate(manifest.source.get("controlnets", [])):
        origin = record["hub"]["repo_id"] + "@" + record["hub"]["commit"] if "hub" in record else record["path"]
        print(f"  ControlNet {k}: {origin} (component {'controlnet' if k == 0 else f'controlnet_{k}'})")
    print(
        f"  shapes: {shapes.get('graph')} graphs, buckets {buckets}, CFG doubles the denoiser batch: "
        f"{shapes.get('cfg_doubles_denoiser_batch')}"
    )
    missing = manifest.missing_for_generation()
    if missing:
        held = ", ".join(manifest.components)
        print(f"  partial: holds {held} only; cannot generate alone (lacks {', '.join(missing)})")
    print(f"  passes: {', '.join(p.get('name', '?') for p in manifest.passes) or 'none'}")
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    for record in manifest.components.values():
        ins = ", ".join(f"{t.name} {t.dtype}[{','.join(map(str, t.shape))}]" for t in record.inputs)
        outs = ", ".join(f"{t.name}[{','.join(map(str, t.shape))}]" for t in record.outputs)
        verdict = {True: "ok", False: "MISSED", None: "not measured"}[record.parity.passed]
        detail = record.parity.summary
        print(f"  {record.name}: {record.size_bytes / 2**20:.1f} MB, parity {verdict} ({detail})")
        print(f"    in:  {ins}")
        print(f"    out: {outs}")
        if record.config.get("ops"):  # backends that list their program's operations (Core ML)
            print("    ops: " + ", ".join(f"{op} x{n}" for op, n in record.config["ops"].items()))
        for chunk in record.config.get("chunks", []):  # a denoiser exported as chained packages
            size = f"{chunk['weight_bytes'] / 2**20:.1f} MiB of weights before compression"
            print(f"    {chunk['name']}: {chunk['stages'][0]}..{chunk['stages'][-1]}, {size}, {chunk['file']}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from difflower.artifact.manifest import Manifest, verify_files

    manifest = Manifest.read(args.artifact)
    checked = verify_files(manifest, Path(args.artifact))
    print(f"{args.artifact}: {checked} files match the sha256 recorded at export")
    return 0


# -- the parser -----------------------------------------------------------------------------------


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default=None, help="for artifacts: the engine to run them on")
    parser.add_argument("--threads", type=positive_int, default=None, help="threads (default: the idle cores)")
    parser.add_argument("--engine-option", action="append", metavar="KEY=VALUE", help="an engine setting (repeatable)")
    parser.add_argument("--data-parallel", action="store_true", help="neuron: split the CFG batch over two cores")
    parser.add_argument(
        "--compute-units", choices=("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE"), help="coreml (macOS): where to run"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="difflower",
        description="Lower Stable-Diffusion-family models to accelerator backends and prove parity.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    tiny = commands.add_parser("tiny", help="write a tiny random checkpoint in diffusers format")
    tiny.add_argument("dir", type=Path, metavar="DIR", help="output folder")
    tiny.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux", "flux-schnell"), default="sd")
    tiny.add_argument("--seed", type=non_negative_int, default=0)
    tiny.add_argument(
        "--controlnet-for",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="write a tiny ControlNet fitting this (SD/SDXL) checkpoint's UNet instead",
    )
    tiny.add_argument("--overwrite", action="store_true", help="replace DIR if it is a tiny checkpoint difflower wrote")
    tiny.set_defaults(handler=_cmd_tiny)

    conv = commands.add_parser(
        "convert", help="convert a single-file checkpoint (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) to a diffusers folder"
    )
    conv.add_argument("file", type=Path, metavar="FILE", help="the .safetensors single file")
    conv.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    conv.add_argument(
        "--config-from", default=None, metavar="MODEL", help="diffusers folder or Hub repo id of the same architecture"
    )
    conv.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="override (SD 2.x 768: v_prediction)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace --out if an earlier convert wrote it")
    conv.set_defaults(handler=_cmd_convert)

    gen = commands.add_parser("generate", help="generate images with a checkpoint or an artifact")
    gen.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="a diffusers-format checkpoint, a Hub repo id, a single .safetensors file, or an artifact folder",
    )
    gen.add_argument("--prompt", default=None, help="the prompt (or --prompts FILE)")
    gen.add_argument(
        "--prompts", type=Path, default=None, metavar="FILE", help="a prompt per line: bulk generation into --out-dir"
    )
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the family's)")
    gen.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale")
    gen.add_argument(
        "--true-cfg-scale", type=finite_float, default=None, help="Flux: true CFG with --negative-prompt (> 1)"
    )
    gen.add_argument("--scheduler", default=None, help="swap the scheduler: euler, euler-a, ddim, pndm, dpm++2m, ...")
    gen.add_argument("--seed", type=non_negative_int, default=0)
    gen.add_argument("--height", type=positive_int, default=None)
    gen.add_argument("--width", type=positive_int, default=None)
    gen.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    gen.add_argument("--image", type=Path, default=None, help="init image (img2img, or inpainting with --mask)")
    gen.add_argument("--mask", type=Path, default=None, help="inpainting mask (white = repaint)")
    gen.add_argument("--strength", type=finite_float, default=None, help="img2img/inpainting strength in [0, 1]")
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="checkpoints only (default fp32)")
    gen.add_argument(
        "--variant", default=None, help="checkpoints: the weights variant to read, e.g. fp16 (*.fp16.safetensors)"
    )
    gen.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="fuse a LoRA (diffusers/peft or kohya .safetensors) into the denoiser and text encoders (repeatable)",
    )
    gen.add_argument(
        "--controlnet",
        action="append",
        metavar="DIR",
        help="checkpoints: a ControlNet folder or Hub repo id driving the UNet (repeatable; artifacts hold theirs)",
    )
    gen.add_argument(
        "--control-image",
        action="append",
        type=Path,
        metavar="IMAGE",
        help="the ControlNet's conditioning image, e.g. edges or depth (one per ControlNet, in order)",
    )
    gen.add_argument(
        "--control-scale", action="append", type=finite_float, metavar="SCALE", help="controlnet_conditioning_scale"
    )
    gen.add_argument(
        "--control-start", action="append", type=finite_float, metavar="FRACTION", help="start of its window (0)"
    )
    gen.add_argument("--control-end", action="append", type=finite_float, metavar="FRACTION", help="end of it (1)")
    gen.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (the prompt may be empty)")
    gen.add_argument(
        "--cache",
        default=None,
        metavar="deepcache[:interval=N,branch=K,center=C,pow=P]|first-block[:threshold=T|:interval=N]",
        help="step caching: DeepCache refreshes the deep UNet feature every N steps (default 3, branch 0), or "
        "as often on the paper's non-uniform schedule crowding around step C; first-block reruns an SD3 or Flux "
        "transformer's later blocks when its first block's residual moves by more than T (default 0.05), "
        "or every N steps",
    )
    gen.add_argument("--device", default="cpu")
    gen.add_argument(
        "--compile", action="store_true", help="checkpoints: torch.compile the repeated blocks (slow first image)"
    )
    gen.add_argument(
        "--no-memory-check", action="store_true", help="run a size even when its memory estimate exceeds what is free"
    )
    _add_engine_flags(gen)
    gen.add_argument("-o", "--output", type=Path, default=None, help="output image (.png, .jpg, .webp)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output image")
    gen.add_argument(
        "--out-dir", type=Path, default=None, help="with --prompts: the folder (images already there are skipped)"
    )
    gen.add_argument("--ray", action="store_true", help="with --prompts: spread the prompts over Ray Data workers")
    gen.add_argument("--workers", type=positive_int, default=None, help="with --ray: model copies (default: per CPU)")
    gen.set_defaults(handler=_cmd_generate)

    exp = commands.add_parser("export", help="export a checkpoint to a backend artifact, checked against the reference")
    exp.add_argument(
        "model", type=Path, metavar="MODEL", help="diffusers-format checkpoint folder, Hub repo id or single file"
    )
    exp.add_argument("--backend", required=True, choices=BACKENDS)
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
    exp.add_argument(
        "--calibration-prompts", type=positive_int, default=None, help="int8: prompts to calibrate on (default 8)"
    )
    exp.add_argument(
        "--calibration-steps", type=positive_int, default=None, help="int8: steps per calibration prompt (10)"
    )
    exp.add_argument("--components", nargs="+", default=None, help="export only these components")
    exp.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="fuse a LoRA (diffusers/peft or kohya .safetensors) into the denoiser and text encoders (repeatable)",
    )
    exp.add_argument(
        "--controlnet",
        action="append",
        metavar="DIR",
        help="a ControlNet folder or Hub repo id to export beside the UNet (repeatable)",
    )
    exp.add_argument(
        "--cache-graphs",
        default=None,
        metavar="deepcache[:branch=K]|first-block",
        help="also write the graphs a step cache needs (DeepCache for UNets, first-block for SD3/Flux transformers)",
    )
    exp.add_argument(
        "--lora-slots",
        type=int,
        default=None,
        metavar="RANK",
        help="onnx: the denoiser's attention projections take LoRA matrices up to RANK as inputs, so generate "
        "--lora switches adapters without re-export (zeros when none)",
    )
    exp.add_argument(
        "--stream-weights",
        action="store_true",
        help="onnx, openvino; Flux, SD3 (static): trace the transformer without its weights and write them tensor "
        "by tensor from the checkpoint, for models larger than memory",
    )
    exp.add_argument("--no-cfg", action="store_true", help="static denoiser batch without guidance doubling")
    exp.add_argument("--device", default=None, help="torchscript, aoti: trace/compile on cpu (default) or cuda")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier difflower artifact")
    exp.add_argument("--allow-mismatch", action="store_true", help="keep the artifact when a parity gate is missed")
    exp.set_defaults(handler=_cmd_export)

    val = commands.add_parser("validate", help="parity of an artifact vs the eager reference (exit 1 on a miss)")
    val.add_argument("artifact", type=Path, metavar="ARTIFACT")
    val.add_argument("--reference", type=Path, required=True, metavar="MODEL", help="the source checkpoint")
    val.add_argument("--steps", type=positive_int, default=4)
    val.add_argument("--prompt", default="a watercolor painting of a lighthouse at sunset")
    val.add_argument("--seed", type=non_negative_int, default=0)
    _add_engine_flags(val)
    val.add_argument("--device", default="cpu")
    val.add_argument(
        "--cache", default=None, metavar="POLICY", help="compare cached runs (same decisions); as generate --cache"
    )
    val.add_argument("--json", type=Path, default=None, help="write the full report here")
    val.add_argument(
        "--html", type=Path, default=None, help="write a self-contained page: images, difference heat map, drift plot"
    )
    val.add_argument("--overwrite", action="store_true", help="replace existing --json / --html files")
    val.add_argument("--allow-mismatch", action="store_true", help="compare even if MODEL is not the source")
    val.set_defaults(handler=_cmd_validate)

    ben = commands.add_parser("bench", help="one benchmark protocol for the reference and artifacts")
    ben.add_argument("artifacts", type=Path, nargs="*", metavar="ARTIFACT")
    ben.add_argument("--reference", type=Path, default=None, metavar="MODEL", help="the eager baseline")
    ben.add_argument("--steps", type=positive_int, default=4, help="steps of the end-to-end run")
    ben.add_argument("--runs", type=positive_int, default=3, help="timed runs per component (median reported)")
    ben.add_argument("--warmup", type=non_negative_int, default=1)
    ben.add_argument("--prompt", default="a watercolor painting of a lighthouse at sunset")
    ben.add_argument("--seed", type=non_negative_int, default=0)
    ben.add_argument("--json", type=Path, default=None, help="write the report here")
    ben.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="latency chart")
    ben.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    ben.set_defaults(handler=_cmd_bench)

    srv = commands.add_parser("serve", help="serve a model over HTTP: batched generation, metrics and a page")
    srv.add_argument(
        "model", type=Path, metavar="MODEL", help="an artifact folder (or a checkpoint: the eager reference)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=port_number, default=8000)
    srv.add_argument("--max-batch", type=positive_int, default=4, help="images per pipeline call (static: its batch)")
    srv.add_argument("--max-wait-ms", type=non_negative_float, default=10.0, help="wait for requests to batch with")
    srv.add_argument("--queue-size", type=positive_int, default=16, help="waiting requests before 429")
    srv.add_argument("--timeout", type=non_negative_float, default=600.0, help="seconds a request may wait (504)")
    srv.add_argument("--engine", default=None, help="artifact engine override (default: the backend's own)")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the engines (per replica)")
    srv.add_argument(
        "--engine-option", action="append", metavar="KEY=VALUE", help="an engine setting, e.g. arena=false (repeatable)"
    )
    srv.add_argument("--ray", action="store_true", help="serve on Ray Serve (a local cluster, or RAY_ADDRESS's)")
    srv.add_argument("--replicas", type=positive_int, default=None, help="with --ray: replicas, each with the engines")
    srv.add_argument(
        "--max-replicas", type=positive_int, default=None, help="with --ray: autoscale from --replicas up to this"
    )
    srv.set_defaults(handler=_cmd_serve)

    info = commands.add_parser("info", help="summarise an artifact's manifest")
    info.add_argument("artifact", type=Path, metavar="ARTIFACT")
    info.set_defaults(handler=_cmd_info)

    verify = commands.add_parser("verify", help="check every artifact file against the sha256 recorded at export")
    verify.add_argument("artifact", type=Path, metavar="ARTIFACT")
    verify.set_defaults(handler=_cmd_verify)
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
    "device": "--device",
    "generator": "--seed",
    "threads": "--threads",
    "compile": "--compile",
    "control_image": "--control-image",
    "controlnet_conditioning_scale": "--control-scale",
    "control_guidance_start": "--control-start",
    "control_guidance_end": "--control-end",
    "guess_mode": "--guess-mode",
    "cache": "--cache",
}

# Faults of the machine, not of difflower: a full disk, a read-only or forbidden folder.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.ENAMETOOLONG,
}


def _message(err: DifflowerError) -> str:
    if isinstance(err, ArgumentError) and err.name in _FLAGS:
        return f"argument {_FLAGS[err.name]}: {err.detail}"
    return str(err)


def _environment_message(err: BaseException) -> str | None:
    """One line for a fault of the environment (OSError, or safetensors' own error for one), else None."""
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = err.filename or ""
        return f"{where}: {err.strerror}" if where else str(err.strerror)
    if type(err).__name__ == "SafetensorError":  # safetensors reports OS errors as text
        match = re.search(r"(?:code: |os error )(\d+)", str(err))
        if match and int(match.group(1)) in _ENVIRONMENT_ERRNOS:
            import os

            return f"writing weights failed: {os.strerror(int(match.group(1)))}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    prepare_process()  # before torch is imported: OpenMP's wait policy is read once, at load
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.command in ("info", "verify"):  # the commands that do not compute with torch
            return args.handler(args)
        with threads_for_command(ThreadPolicy(getattr(args, "threads", None))):
            return args.handler(args)
    except DifflowerError as err:
        print(f"difflower {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difflower {args.command}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(
            f"difflower {args.command}: stopped by signal {stop.signum}; nothing half-written was left", file=sys.stderr
        )
        return 128 + stop.signum
    except Exception as err:
        message = _environment_message(err)
        if message is None:
            raise
        print(f"difflower {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
