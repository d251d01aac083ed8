"""The real-size FLUX.1-schnell transformer (11.9 B parameters, 19 + 38 blocks) exported on this
24 GiB machine with `--stream-weights` (issue 17): peak memory by step, time and size.

    python benchmarks/flux_full_export.py [--size 512]
    python benchmarks/flux_full_export.py --tiny   # smoke test: a tiny checkpoint (seconds)

1. The checkpoint: FLUX.1-schnell's published transformer config with random bf16 weights (the
   dtype Black Forest Labs ships), about 24 GB in diffusers' sharded layout, written shard by
   shard (never the whole model in memory), cached in $DIFFLOWER_BENCH_DIR. The weights are drawn
   as `difflower tiny` draws them: uniform in +-1/sqrt(fan_in), norms' scales 1 and shifts 0.
2. In a process of its own, the export's own code for the transformer (`plan_export`, then
   `write_component`, what `difflower export CKPT --backend onnx --precision fp16 --stream-weights
   --static 1xSIZExSIZE --components transformer` runs) with each step's peak RSS and peak
   anonymous memory (`StepPeaks`, benchmarks/flux_export_memory.py): the skeleton, the reference
   outputs (a forward reading one layer's weights at a time), the fp16 island measurement, the
   trace without weights and the weights streamed to `model.onnx_data`.
3. What the CLI does next, the parity check through ONNX Runtime, is left out: ORT's CPU provider
   runs fp16 matmuls in fp32 behind casts, so its session would hold 48 GB. Instead every tensor
   in `model.onnx_data` is compared with the checkpoint's, cast to fp16 (and transposed where the
   graph reads it transposed); the graph's parity is measured at reduced depth by
   flux_export_memory.py's `onnx_fp16_streamed` target and the tests.

Writes benchmarks/results/flux-full-export.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from flux_transformer import FLUX_DEV  # noqa: E402
from onnx_unet import CACHE, write_result  # noqa: E402

from difflower.reference.loading import read_flux_config  # noqa: E402
from difflower.reference.tiny import make_tiny_checkpoint, tiny_spec  # noqa: E402
from difflower.reference.transformer_flux import FluxTransformer2DModel  # noqa: E402
from difflower.validate.bench import machine_info  # noqa: E402

FLUX_SCHNELL = replace(FLUX_DEV, guidance_embeds=False)
SHARD_BYTES = 5 * 1024**3  # diffusers' default max_shard_size ("5GB") for big models

EXPORT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from flux_export_memory import instrument_steps
steps = instrument_steps(streamed=True)
from pathlib import Path
from difflower.artifact.manifest import Bucket
from difflower.exporters.common import ExportOptions, plan_export, write_component
from difflower.exporters.onnx import OnnxExporter
source, out, size = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
options = ExportOptions(components=("transformer",), buckets=(Bucket(1, size, size),), precision="fp16",
                        stream_weights=True, progress=False)
start = time.perf_counter()
plan = plan_export(OnnxExporter(), source, options)
written = write_component(plan, plan.specs[0], out)
seconds = time.perf_counter() - start
steps.mark("finish")
passes = [p.to_json() for p in written.passes]
print("result", json.dumps({"seconds": seconds, "rss": steps.peaks, "anonymous": steps.anonymous, "passes": passes,
                            "expected_finite": all(bool(t.isfinite().all()) for t in written.expected)}))
"""


def _draw(name: str, shape: tuple[int, ...], constant: float | None, seed: int) -> torch.Tensor:
    """One bf16 weight, drawn as `reference.tiny.portable_init_` draws it (numpy PCG64 seeded by
    the name: the same numbers on every CPU)."""
    if constant is not None:
        return torch.full(shape, constant, dtype=torch.bfloat16)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(fan_in)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return torch.from_numpy(values).to(torch.bfloat16)


def _constants(model: torch.nn.Module) -> dict[str, float]:
    """Norm scales (1) and shifts (0): the parameters a constructor sets to a constant."""
    out = {}
    for module_name, module in model.named_modules():
        if "Norm" in type(module).__name__:
            for param_name, _ in module.named_parameters(recurse=False):
                out[f"{module_name}.{param_name}"] = 1.0 if param_name == "weight" else 0.0
    return out


def write_checkpoint(folder: Path, config, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> None:
    """A real-size transformer folder in diffusers' sharded layout, one shard in memory at a time."""
    from safetensors.torch import save_file

    from difflower.reference.loading import WEIGHTS_NAME
    from difflower.reference.tiny import DIFFUSERS_LAYOUT_VERSION, config_to_dict

    with torch.device("meta"):
        model = FluxTransformer2DModel(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    constants = _constants(model)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        print(f"  shard {i}/{len(shards)}: {len(names)} tensors", flush=True)
        save_file({n: _draw(n, shapes[n], constants.get(n), seed) for n in names}, str(tmp / file))
        weight_map.update(dict.fromkeys(names, file))
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    raw = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
    (tmp / "config.json").write_text(json.dumps({**raw, **config_to_dict(config)}, indent=2) + "\n")
    tmp.rename(folder)


def checkpoint(tiny: bool, scratch: Path) -> Path:
    """The pipeline folder: tiny text encoders and VAE around the real-size transformer."""
    if tiny:  # the tiny transformer rewritten by the same sharded writer, in shards of 64 KiB
        path = make_tiny_checkpoint(scratch / "tiny-flux-schnell", "flux-schnell", seed=0)
        config = read_flux_config(path / "transformer")
        shutil.rmtree(path / "transformer")
        write_checkpoint(path / "transformer", config, shard_bytes=64 * 1024)
        return path
    path = CACHE / "flux-schnell-random-full"
    if (path / "transformer" / "config.json").is_file():
        return path
    print(f"writing a random-weight FLUX.1-schnell pipeline (real-size transformer, bf16) to {path} ...", flush=True)
    spec = replace(tiny_spec("flux-schnell"), transformer=replace(FLUX_SCHNELL, num_layers=1, num_single_layers=1))
    make_tiny_checkpoint(path, spec=spec, seed=0, overwrite=True)  # the small components, and a stand-in transformer
    shutil.rmtree(path / "transformer")
    write_checkpoint(path / "transformer", FLUX_SCHNELL)
    return path


def check_weights(source: Path, folder: Path) -> dict:
    """Every weight in the written `model.onnx_data` against the checkpoint's, cast to fp16 (the
    graph's transposed reads transposed back): how many match exactly."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    from difflower.reference.streaming import CheckpointTensors

    tensors = CheckpointTensors(source / "transformer")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    data = np.memmap(folder / "model.onnx_data", dtype=np.uint8, mode="r")
    checked = equal = 0
    for init in graph.initializer:
        key = init.name.removeprefix("transformer.")
        if key not in tensors.shapes:
            continue  # a constant the optimizer folded, not a weight
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(init)
            dtype = np.float16 if init.data_type == onnx.TensorProto.FLOAT16 else np.float32
            raw = data[info.offset : info.offset + info.length]
            stored = np.frombuffer(raw, dtype=dtype).reshape(tuple(init.dims))
        else:  # small tensors stay in model.onnx
            stored = numpy_helper.to_array(init)
        want = tensors.read(key, torch.float16 if stored.dtype == np.float16 else torch.float32).numpy()
        checked += 1  # a weight the graph reads transposed is stored transposed
        equal += bool(np.array_equal(stored, want) or (want.ndim == 2 and np.array_equal(stored, want.T)))
    return {"weights_checked": checked, "weights_equal": equal, "checkpoint_tensors": len(tensors.shapes)}


def onnx_fp16(source: Path, scratch: Path, size: int) -> dict:
    """The export's own code up to its parity check (see the module docstring), then the files' check."""
    out = scratch / "artifact"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", EXPORT, str(HERE), str(source), str(out), str(size)], capture_output=True, text=True
    )
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines or not lines[-1].startswith("result "):
        print(run.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the export failed (exit {run.returncode})")
    measured = json.loads(lines[-1].split(" ", 1)[1])
    folder = out / "transformer"
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    weights = check_weights(source, folder)
    shutil.rmtree(out)  # 24 GB: the point is the memory and the files' check
    return {
        "export_seconds": measured["seconds"],
        "peak_rss_gib": max(measured["rss"].values()),
        "peak_anonymous_gib": max(measured["anonymous"].values()),
        "step_peaks_gib": measured["rss"],
        "step_anonymous_peaks_gib": measured["anonymous"],
        "files_bytes": files,
        "reference_outputs_finite": measured["expected_finite"],
        "passes": measured["passes"],
        "parity": "not run: ONNX Runtime's CPU session would hold the weights in fp32 (48 GB); weights checked",
        **weights,
        "passed": weights["weights_equal"] == weights["weights_checked"] > 0,
    }


def openvino_int8_weight(source: Path, scratch: Path, size: int) -> dict:
    """`difflower export --backend openvino --quantize int8-weight --stream-weights`, the whole
    command, parity included: its int8 weights (12 GB) fit where ORT's fp32 copy does not."""
    from flux_export_memory import peak_of

    from difflower.artifact.manifest import Manifest

    out = scratch / "openvino"
    arguments = ["export", str(source), "--backend", "openvino", "--quantize", "int8-weight", "--stream-weights"]
    arguments += ["--components", "transformer", "--static", f"1x{size}x{size}", "--out", str(out)]
    peak, seconds, steps = peak_of(arguments)
    manifest = Manifest.read(out)
    record = manifest.components["transformer"]
    files = {p.name: p.stat().st_size for p in (out / "transformer").iterdir()}
    shutil.rmtree(out)
    return {
        "export_seconds": seconds,
        "peak_rss_gib": peak,
        "peak_anonymous_gib": max(steps["anonymous"].values()),
        "step_peaks_gib": steps["rss"],
        "step_anonymous_peaks_gib": steps["anonymous"],
        "files_bytes": files,
        "passes": manifest.passes,
        "parity": f"{record.parity.summary}; gate {record.parity.gate}",
        "passed": bool(record.parity.passed),
    }


TARGETS = {"onnx_fp16": onnx_fp16, "openvino_int8_weight": openvino_int8_weight}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint: checks the script, not the figures")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    scratch = Path(tempfile.mkdtemp(prefix="flux-full-"))
    size = 64 if args.tiny else args.size
    cached = not args.tiny and (CACHE / "flux-schnell-random-full" / "transformer" / "config.json").is_file()
    start = time.perf_counter()
    source = checkpoint(args.tiny, scratch)
    written_s = None if cached else time.perf_counter() - start  # None: an earlier run's checkpoint
    with torch.device("meta"):
        config = read_flux_config(source / "transformer")
        parameters = sum(p.numel() for p in FluxTransformer2DModel(config).parameters())
    source_bytes = sum(p.stat().st_size for p in (source / "transformer").glob("*.safetensors"))
    target_file = args.out or (
        Path(tempfile.gettempdir()) / "flux-full-export-tiny.json"
        if args.tiny
        else HERE / "results" / "flux-full-export.json"
    )
    earlier = json.loads(target_file.read_text()).get("targets", {}) if target_file.is_file() else {}
    measured = {}
    for name in args.targets:
        print(f"exporting: {name} ...", flush=True)
        measured[name] = {**TARGETS[name](source, scratch, size), "command": " ".join(sys.argv)}
    shutil.rmtree(scratch)
    result = {
        "benchmark": f"streamed export of the FLUX.1-schnell transformer (random bf16 weights), static {size}x{size}",
        "parameters": parameters,
        "checkpoint_bytes": source_bytes,
        "checkpoint_write_seconds": written_s,
        "targets": {**earlier, **measured},  # a target not run this time keeps its earlier figures
        "machine": machine_info(),
    }
    table = f"FLUX.1-schnell transformer, {parameters / 1e9:.2f} B parameters"
    table += f", checkpoint {source_bytes / 2**30:.1f} GiB bf16"
    for name, row in result["targets"].items():
        table += (
            f"\n\n{name}: export {row['export_seconds'] / 60:.1f} min, peak RSS {row['peak_rss_gib']:.1f} GiB "
            f"(anonymous {row['peak_anonymous_gib']:.1f} GiB), written {sum(row['files_bytes'].values()) / 2**30:.1f} "
            f"GiB; parity: {row['parity']}"
        )
        if "weights_checked" in row:
            table += f"; weights equal to the checkpoint's: {row['weights_equal']}/{row['weights_checked']}"
        table += "\npeak by step (RSS / anonymous):\n" + "\n".join(
            f"- {step}: {gib:.2f} / {row['step_anonymous_peaks_gib'][step]:.2f} GiB"
            for step, gib in row["step_peaks_gib"].items()
        )
    write_result(target_file, result, table)
    return 0 if all(row["passed"] for row in measured.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
