"""Peak memory of exporting the FLUX.1 transformer against its depth (issue 17), so that the full
model's need is known: real width, reduced depth, random weights, each export in a process of its own.

    python benchmarks/flux_export_memory.py [--depths 1x2,2x4] [--size 512]
    python benchmarks/flux_export_memory.py --tiny   # smoke test: the tiny checkpoint (seconds)

For each depth (double x single blocks; FLUX.1 has 19 x 38) the transformer of FLUX.1-dev's
config with random weights (benchmarks/flux_transformer.py writes it) is
1. loaded alone, as the export loads it (fp32 on the CPU): the peak RSS of loading;
2. exported to ONNX with `--precision fp16` and to OpenVINO with `--quantize int8-weight`, static
   1xSIZExSIZE, the transformer only: the peak RSS of the whole export (tracing, the passes, the
   files, the parity check), its time, the size written, and the peak of each step (`StepPeaks`:
   the export's functions are wrapped to read the kernel's high-water mark at each step's end and
   reset it, so each figure is that step's own peak, including what earlier steps still hold).
A line through the points (peak against parameter count) gives each target's need at FLUX.1's
11.9 B parameters; the difference between the export's peak and the load's says how much the
export itself holds beyond the fp32 weights.

Writes benchmarks/results/flux-export-memory.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from flux_transformer import FLUX_DEV, checkpoint  # noqa: E402
from onnx_unet import CACHE, write_result  # noqa: E402

from difflower.validate.bench import machine_info  # noqa: E402

TARGETS = {
    "onnx_fp16": ["--backend", "onnx", "--precision", "fp16"],
    "openvino_int8_weight": ["--backend", "openvino", "--quantize", "int8-weight"],
    "onnx_fp16_streamed": ["--backend", "onnx", "--precision", "fp16", "--stream-weights"],
    "openvino_int8_weight_streamed": ["--backend", "openvino", "--quantize", "int8-weight", "--stream-weights"],
}
EXPORT = """
import json, sys
sys.path.insert(0, sys.argv.pop(1))
from flux_export_memory import instrument_steps
from difflower.cli import main
steps = instrument_steps()
rc = main(sys.argv[1:])
steps.mark("finish (config, manifest, move into place)")
print("steps", json.dumps({"rss": steps.peaks, "anonymous": steps.anonymous}), file=sys.stderr)
sys.exit(rc)
"""
LOAD = """
import resource, sys, torch
from difflower.reference.loading import load_flux_transformer
model = load_flux_transformer(sys.argv[1], torch.float32)
touched = sum(float(p.sum()) for p in model.parameters())  # the weights resident, not only mapped
print(sum(p.numel() for p in model.parameters()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


class StepPeaks:
    """The peak memory of each step of an export, in the process doing it.

    - `peaks` (RSS): at each step's end the kernel's high-water mark (VmHWM) is read and reset to
      the current RSS (/proc/self/clear_refs). RSS counts the checkpoint's memory-mapped pages
      once touched: they are the page cache's, reclaimable, and resident or not as it pleases.
    - `anonymous`: the largest RssAnon a thread saw sampling every 10 ms during the step: the
      memory the process itself allocated, which is what runs a machine out of memory.
    """

    def __init__(self) -> None:
        import threading

        self.peaks: dict[str, float] = {}
        self.anonymous: dict[str, float] = {}
        self._anon_kib = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()
        self.mark("start-up (imports)")

    @staticmethod
    def _status_kib(field: str) -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1])

    def _sample(self) -> None:
        import time

        while True:
            anon = self._status_kib("RssAnon:")
            with self._lock:
                self._anon_kib = max(self._anon_kib, anon)
            time.sleep(0.01)

    def mark(self, step: str) -> None:
        hwm = self._status_kib("VmHWM:") / 2**20
        with self._lock:
            anon = max(self._anon_kib, self._status_kib("RssAnon:")) / 2**20
            self._anon_kib = 0
        self.peaks[step] = max(self.peaks.get(step, 0.0), hwm)  # GiB; a step seen twice: its max
        self.anonymous[step] = max(self.anonymous.get(step, 0.0), anon)
        Path("/proc/self/clear_refs").write_text("5")

    def wrap(self, owner, name: str, step: str, before: str | None = None) -> None:
        """Mark `before` (the step that led up to it) when owner.name is called, `step` when it returns."""
        original = getattr(owner, name)

        def marked(*args, **kwargs):
            if before is not None:
                self.mark(before)
            result = original(*args, **kwargs)
            self.mark(step)
            return result

        setattr(owner, name, marked)


def instrument_steps(streamed: bool | None = None) -> StepPeaks:
    """Mark the export's steps (ONNX and OpenVINO) where the functions doing them return;
    `streamed` (default: whether the command line has --stream-weights) picks --stream-weights'
    steps, whose reference outputs come first."""
    import difflower.driver as driver
    import difflower.exporters.common as common
    import difflower.exporters.onnx as onnx_exporter
    import difflower.exporters.openvino as openvino_exporter

    steps = StepPeaks()
    steps.wrap(common, "load_export_module", "load the reference module (fp32)", before="plan the export")
    steps.wrap(common, "export_skeleton", "build the meta-device skeleton", before="plan the export")
    if streamed is None:
        streamed = "--stream-weights" in sys.argv
    if streamed:
        steps.wrap(onnx_exporter, "select_islands", "fp16 island measurement", before="reference outputs (streamed)")
        steps.wrap(onnx_exporter, "half_module", "fp16 module dtypes")
        steps.wrap(onnx_exporter, "streamed_export", "ONNX: trace without weights, stream them to disk")
        steps.wrap(
            openvino_exporter,
            "streamed_export",
            "ONNX (fp16 weights): trace, stream",
            before="reference outputs (streamed)",
        )
        steps.wrap(openvino_exporter, "compress_component", "OpenVINO: nncf compression", before="OpenVINO: read_model")
    else:
        steps.wrap(onnx_exporter, "torch_export", "ONNX: trace and write", before="reference outputs")
        steps.wrap(onnx_exporter, "static_shapes", "ONNX: static shapes (onnxslim)")
        steps.wrap(onnx_exporter, "select_islands", "ONNX: fp16 island measurement")
        steps.wrap(onnx_exporter, "convert_fp16", "ONNX: fp16 conversion")
        steps.wrap(openvino_exporter, "convert", "OpenVINO: convert_model", before="reference outputs")
        steps.wrap(openvino_exporter, "compress_component", "OpenVINO: nncf compression")
    steps.wrap(driver, "exported_component_parity", "parity (engine load + run)", before="write the backend's files")
    return steps


def parameters(double: int, single: int) -> int:
    """FLUX.1-dev's transformer parameter count at this depth (from its config, no weights)."""
    import torch

    from difflower.reference.transformer_flux import FluxTransformer2DModel

    config = replace(FLUX_DEV, num_layers=double, num_single_layers=single)
    with torch.device("meta"):
        return sum(p.numel() for p in FluxTransformer2DModel(config).parameters())


def peak_of(arguments: list[str]) -> tuple[float, float, dict[str, float]]:
    """(peak RSS GiB, seconds, each step's peak GiB) of `difflower ARGUMENTS` run in a process of
    its own; raises on failure."""
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", EXPORT, str(HERE), *arguments], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = process.stderr.strip().splitlines()
    if process.returncode != 0 or not lines or not lines[-1].startswith("steps "):
        raise RuntimeError(f"difflower {' '.join(arguments)} failed: {lines[-3:]}")
    steps = json.loads(lines[-1].split(" ", 1)[1])
    # resetting the high-water mark resets getrusage's ru_maxrss too: the whole export's peak is its largest step's
    return max(steps["rss"].values()), seconds, steps


def _cell(measured: dict) -> str:
    if "failed" in measured:
        return "failed"
    return f"{measured['peak_gib']:.1f} GiB, {measured['seconds']:.0f} s, {measured['size_gib']:.1f} GiB written"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1x2,2x4", help="double x single blocks, comma-separated")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint: checks the script, not the figures")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="flux-memory-"))
    try:
        depths = [(2, 2)] if args.tiny else [tuple(int(x) for x in d.split("x")) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--depths: expected DOUBLExSINGLE[,...] such as 1x2,2x4, got {args.depths!r}")
    if any(len(d) != 2 or min(d) < 1 for d in depths):
        parser.error(f"--depths: each depth is DOUBLExSINGLE, both at least 1, got {args.depths!r}")
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    targets = {name: TARGETS[name] for name in args.targets}
    size = 64 if args.tiny else args.size
    python = sys.executable
    rows = []
    for double, single in depths:
        source = checkpoint(args.tiny, double, single, scratch)
        count = parameters(double, single) if not args.tiny else None
        loaded = subprocess.run([python, "-c", LOAD, str(source / "transformer")], capture_output=True, text=True)
        params, load_kib = (int(x) for x in loaded.stdout.split())
        row = {"double": double, "single": single, "parameters": params, "load_peak_gib": load_kib / 2**20}
        assert count is None or count == params
        for target, flags in targets.items():
            out = scratch / f"{target}-{double}x{single}"
            arguments = ["export", str(source), *flags, "--components", "transformer"]
            arguments += ["--static", f"1x{size}x{size}", "--out", str(out)]
            try:
                peak, seconds, steps = peak_of(arguments)
            except RuntimeError as err:  # e.g. killed for memory: recorded, the other points still measured
                row[target] = {"failed": str(err)}
                print(f"{double}x{single} {target}: {err}", flush=True)
                continue
            size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            row[target] = {"peak_gib": peak, "seconds": seconds, "size_gib": size_bytes / 2**30}
            row[target]["step_peaks_gib"] = steps["rss"]
            row[target]["step_anonymous_peaks_gib"] = steps["anonymous"]
            row[target]["anonymous_peak_gib"] = max(steps["anonymous"].values())
            print(f"{double}x{single} {target}: peak {peak:.2f} GiB, {seconds:.0f} s", flush=True)
            shutil.rmtree(out)  # the point is the memory; the next export gets the disk back
        rows.append(row)

    out = args.out or (
        Path(tempfile.gettempdir()) / "flux-export-memory-tiny.json"
        if args.tiny
        else HERE / "results" / "flux-export-memory.json"
    )
    if out.is_file():  # targets not run this time keep their earlier figures, depth by depth
        earlier = {(r["double"], r["single"]): r for r in json.loads(out.read_text())["rows"]}
        rows = [{**earlier.get((r["double"], r["single"]), {}), **r} for r in rows]
        targets = {name: TARGETS[name] for name in TARGETS if all(name in r for r in rows)}

    full = parameters(19, 38)
    fits = {}
    if len(rows) >= 2:
        (a, b) = rows[0], rows[-1]
        points = {"load_peak_gib": (a["load_peak_gib"], b["load_peak_gib"])}
        for target in targets:
            if "failed" not in a[target] and "failed" not in b[target]:
                points[target] = (a[target]["peak_gib"], b[target]["peak_gib"])
                points[f"{target}_anonymous"] = (a[target]["anonymous_peak_gib"], b[target]["anonymous_peak_gib"])
        for key, (ya, yb) in points.items():
            slope = (yb - ya) / (b["parameters"] - a["parameters"])
            fits[key] = {
                "gib_per_billion_parameters": slope * 1e9,
                "at_full_flux_gib": ya + slope * (full - a["parameters"]),
            }
    result = {
        "benchmark": f"peak RSS of exporting the FLUX.1-dev transformer (real width, random weights) at {size}x{size}",
        "rows": rows,
        "full_model_parameters": full,
        "linear_fit": fits,
        "machine": machine_info(),
        "command": "python benchmarks/flux_export_memory.py " + " ".join(sys.argv[1:]),
        "bench_dir": str(CACHE),
    }
    table = f"| blocks | parameters | load | {' | '.join(targets)} |\n|---|---|---|{'---|' * len(targets)}\n"
    table += "\n".join(
        f"| {r['double']} + {r['single']} | {r['parameters'] / 1e9:.2f} B | {r['load_peak_gib']:.1f} GiB | "
        + " | ".join(_cell(r[target]) for target in targets)
        + " |"
        for r in rows
    )
    for r in rows:
        for target in targets:
            steps, anonymous = r[target].get("step_peaks_gib"), r[target].get("step_anonymous_peaks_gib")
            if steps:
                table += f"\n\n{r['double']} + {r['single']} blocks, {target}, peak by step (RSS / anonymous):\n"
                table += "\n".join(f"- {step}: {gib:.2f} / {anonymous[step]:.2f} GiB" for step, gib in steps.items())
    if fits:
        table += "\n\n" + "\n".join(
            f"- {k}: {v['at_full_flux_gib']:.0f} GiB at {full / 1e9:.1f} B parameters" for k, v in fits.items()
        )
    write_result(out, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
