"""What a ControlNet costs per denoising step on the real-size SD1.5 config (issue 19), 512x512.

    python benchmarks/controlnet_sd15.py [--runs 5] [--warmup 2]
    python benchmarks/controlnet_sd15.py --tiny   # smoke test: a tiny checkpoint (seconds)

One CFG step (batch 2, 4x64x64 latents, a 512x512 control image) per backend: the UNet alone
vs the ControlNet plus the UNet that takes its residuals, fp32. The ControlNet has the SD1.5
ControlNet architecture (ControlNetConfig.from_unet of the SD1.5 UNet: the v1.1 ControlNets'
shape, 361M parameters) with random weights, like the UNet; speed does not depend on values.

1. Exports (cached in $DIFFLOWER_BENCH_DIR): per backend (ONNX Runtime dynamic, OpenVINO static
   1x512x512) the UNet alone (few_step_sd15.py's CFG artifacts when present), and the UNet with
   residual inputs plus the ControlNet (`difflower export --controlnet`).
2. Per backend, in one process, interleaved by difflower.validate.bench's harness (2 warm-ups,
   median of 5): `unet` (the plain UNet), `controlnet` (the ControlNet alone), `unet+controlnet`
   (the ControlNet, then the UNet fed its residuals: one controlled step). The eager torch
   modules are the first row. At most three real-size engines are held at once.

Writes benchmarks/results/controlnet-sd15.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import sd15_source, timed_result, write_result  # noqa: E402

from difflower.artifact.manifest import Bucket, Manifest  # noqa: E402
from difflower.artifact.specs import ShapePlan, example_inputs, load_export_module, spec_for_record  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.errors import DifflowerError  # noqa: E402
from difflower.reference.loading import read_model_index  # noqa: E402
from difflower.reference.spec import spec_from_configs  # noqa: E402
from difflower.reference.tiny import make_tiny_controlnet  # noqa: E402
from difflower.runtimes.pipeline import make_engines  # noqa: E402
from difflower.validate.bench import interleaved, machine_info  # noqa: E402

BACKENDS = {"onnxruntime": "onnx", "openvino_static": "openvino"}  # row name -> export backend


def controlnet_for(source: Path, root: Path) -> Path:
    """A random-weight ControlNet of the checkpoint's UNet architecture, written once."""
    folder = root / f"{source.name}-controlnet"
    if not (folder / "config.json").is_file():
        print(f"writing a random-weight ControlNet to {folder} ...", flush=True)
        make_tiny_controlnet(folder, source, seed=0, overwrite=True)
    return folder


def exported(source: Path, controlnet: Path | None, folder: Path, backend: str, static: list[str]) -> dict:
    """The artifact at `folder` (exported unless an earlier run left it), with its export facts."""
    components = ["unet", "controlnet"] if controlnet else ["unet"]
    command = ["difflower", "export", str(source), "--backend", backend, "--out", str(folder)]
    command += ["--components", *components] + [f"--static={s}" for s in static]
    command += ["--controlnet", str(controlnet)] if controlnet else []
    seconds = None
    try:
        manifest = Manifest.read(folder)
        if not set(components) <= set(manifest.components) or (controlnet is None) == (
            "controlnet" in manifest.components
        ):
            raise DifflowerError("another export")  # (the UNet of a whole-pipeline artifact is reused as it is)
    except DifflowerError:
        print(f"exporting {folder.name} ...", flush=True)
        kwargs: dict[str, Any] = dict(components=components, static=static, progress=False, overwrite=True)
        manifest, seconds = timed_result(
            export, source, backend, folder, controlnet=[controlnet] if controlnet else [], **kwargs
        )
        print(f"  {seconds:.1f} s", flush=True)
    return {
        "folder": folder,
        "manifest": manifest,
        "export_s": seconds,  # None: reused from the cache
        "component_export_s": {k: r.export_seconds for k, r in manifest.components.items()},
        "parity": {
            k: r.parity.summary + (" ok" if r.parity.passed else " MISSED") for k, r in manifest.components.items()
        },
        "command": shlex.join(command),
    }


def step_runners(unet: Callable, controlnet: Callable, unet_res: Callable, inputs: dict) -> dict[str, Callable]:
    """The three timed calls; `unet+controlnet` feeds the ControlNet's own outputs to the UNet."""

    def controlled() -> Any:
        residuals = controlnet(inputs["controlnet"])
        return unet_res({**inputs["unet"], **residuals})

    return {
        "unet": lambda: unet(inputs["unet"]),
        "controlnet": lambda: controlnet(inputs["controlnet"]),
        "unet+controlnet": controlled,
    }


def example(manifest: Manifest, name: str, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    return example_inputs(spec_for_record(manifest.components[name]), dims, seed=0)


def eager_row(source: Path, plain: dict, with_cn: dict, dims: dict, runs: int, warmup: int) -> dict:
    """The reference modules (fp32 eager torch), through the same wrappers the exports trace."""
    modules = {}
    for key, export_facts, name in (
        ("unet", plain, "unet"),
        ("unet_res", with_cn, "unet"),
        ("controlnet", with_cn, "controlnet"),
    ):
        record = export_facts["manifest"].components[name]
        modules[key] = (
            load_export_module(spec_for_record(record), source),
            [t.name for t in record.inputs],
            [t.name for t in record.outputs],
        )

    def engine(key: str) -> Callable[[dict], dict]:
        module, input_names, output_names = modules[key]

        def call(inputs: dict) -> dict:
            with torch.no_grad():
                return dict(zip(output_names, module(*(inputs[n] for n in input_names)), strict=True))

        return call

    inputs = {
        "unet": example(plain["manifest"], "unet", dims),
        "controlnet": example(with_cn["manifest"], "controlnet", dims),
    }
    runners = step_runners(engine("unet"), engine("controlnet"), engine("unet_res"), inputs)
    print(f"eager: {warmup} warm-up + {runs} timed runs ...", flush=True)
    row = {"backend": "eager", **{k: t.to_json() for k, t in interleaved(runners, runs, warmup).items()}}
    modules.clear()
    del runners
    gc.collect()
    return row


def backend_row(name: str, plain: dict, with_cn: dict, dims: dict, runs: int, warmup: int) -> dict:
    unet = make_engines(plain["manifest"], plain["folder"])["unet"]
    engines = make_engines(with_cn["manifest"], with_cn["folder"])
    inputs = {
        "unet": example(plain["manifest"], "unet", dims),
        "controlnet": example(with_cn["manifest"], "controlnet", dims),
    }
    runners = step_runners(unet, engines["controlnet"], engines["unet"], inputs)
    print(f"{name}: {warmup} warm-up + {runs} timed runs ...", flush=True)
    row = {"backend": name, **{k: t.to_json() for k, t in interleaved(runners, runs, warmup).items()}}
    del unet, engines
    gc.collect()
    return row


def markdown(result: dict) -> str:
    lines = [
        "| backend | UNet step | ControlNet | ControlNet + UNet step | controlled / plain |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        unet, cn, both = (r[k]["median_s"] for k in ("unet", "controlnet", "unet+controlnet"))
        lines.append(f"| {r['backend']} | {unet:.3f} s | {cn:.3f} s | {both:.3f} s | {both / unet:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny checkpoint in a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/controlnet-sd15.json)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="difflower-controlnet-") as scratch:
        root, source, out = sd15_source(args.tiny, Path(scratch), args.out, "controlnet-sd15")
        size = spec_from_configs(read_model_index(source)).native_size
        dims = ShapePlan().dims(Bucket(1, size, size), 8)  # CFG: denoiser batch 2
        controlnet = controlnet_for(source, root)
        exports = {}
        for name, backend in BACKENDS.items():
            static = [f"1x{size}x{size}"] if name == "openvino_static" else []
            exports[name] = (
                # few_step_sd15.py's CFG artifacts hold the plain UNet already: reused when present
                exported(source, None, root / f"sd15-{name}", backend, static),
                exported(source, controlnet, root / f"{source.name}-controlnet-{name}", backend, static),
            )
        gc.collect()
        rows = [eager_row(source, *exports["onnxruntime"], dims, args.runs, args.warmup)]
        gc.collect()
        rows += [backend_row(n, *exports[n], dims, args.runs, args.warmup) for n in BACKENDS]
    machine = machine_info()
    result = {
        "benchmark": (
            f"{'tiny SD' if args.tiny else 'SD1.5 (random weights)'} at {size}x{size}, fp32, one CFG step "
            "(batch 2): UNet alone vs ControlNet + UNet with residual inputs"
        ),
        "rows": rows,
        "ratios": {r["backend"]: r["unet+controlnet"]["median_s"] / r["unet"]["median_s"] for r in rows},
        "exports": {
            f"{n} {kind}": {k: v for k, v in e.items() if k not in ("folder", "manifest")}
            for n, pair in exports.items()
            for kind, e in zip(("unet", "unet+controlnet"), pair, strict=True)
        },
        "commands": {"benchmark": shlex.join(["python", "benchmarks/controlnet_sd15.py", *sys.argv[1:]])},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": machine,
    }
    write_result(out, result, markdown(result))


if __name__ == "__main__":
    main()
