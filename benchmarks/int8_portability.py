"""Do the int8 artifacts meet their gates on a CPU without AVX-512 and VNNI?

int8 kernels differ with the instruction set: on x86 CPUs without VNNI, ONNX Runtime's and
OpenVINO's u8 x s8 products go through `vpmaddubsw`, whose 16-bit sums saturate when both
pairs of products are large (two 255 x 127 products overflow 32767). An artifact built on an
AVX-512 VNNI machine can therefore meet its gates there and miss them on an AVX2-only one.

This script exports the tiny SD checkpoint's int8 artifacts here (`--allow-mismatch`, so the
numbers are kept whatever they are), then measures every component's parity against the
reference twice: natively, and under `qemu-x86_64 -cpu EPYC-Rome` (user-mode emulation of an
AVX2-only AMD EPYC: CPUID says no AVX-512 and no VNNI, so every library picks its AVX2
kernels). Needs Debian's qemu-user; the emulated run takes minutes.

    python benchmarks/int8_portability.py [--json benchmarks/results/int8-portability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EMULATED_CPU = "EPYC-Rome"
ARTIFACTS = {
    "onnx int8-weight": ("onnx", {"quantize": "int8-weight"}),
    "onnx int8 (static QDQ)": ("onnx", {"quantize": "int8", "calibration_prompts": 2, "calibration_steps": 3}),
    "openvino int8 (hybrid)": ("openvino", {"quantize": "int8", "calibration_prompts": 3, "calibration_steps": 4}),
}

# Run by this same file in a child process (natively or under qemu): component parity as JSON.
MEASURE = """
import json, sys, torch
from difflower.validate.parity import validate_artifact
report = validate_artifact(sys.argv[1], sys.argv[2], steps=2)
cpu = torch.backends.cpu.get_cpu_capability()
print(json.dumps({"cpu": cpu, "components": {n: min((o.psnr if o.psnr is not None else 999.0)
    for o in c.outputs.values()) for n, c in report.components.items()},
    "passed": {n: c.passed for n, c in report.components.items()},
    "image_psnr": report.image.get("psnr"), "all_passed": report.passed}))
"""


def export_all(root: Path) -> dict[str, Path]:
    from difflower.driver import export
    from difflower.reference.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(root / "tiny-sd", "sd", seed=0)
    out = {}
    for name, (backend, options) in ARTIFACTS.items():
        path = root / name.replace(" ", "-").replace("(", "").replace(")", "")
        export(checkpoint, backend, path, allow_mismatch=True, progress=False, **options)
        out[name] = path
    return {"checkpoint": checkpoint, **out}


def measure(artifact: Path, checkpoint: Path, emulated: bool) -> dict:
    command = [sys.executable, "-c", MEASURE, str(artifact), str(checkpoint)]
    if emulated:
        command = ["qemu-x86_64", "-cpu", EMULATED_CPU, *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # run from a neutral folder: from the repository, `python -c` would import its difflower/ folder
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--native-only", action="store_true", help="skip the emulated AVX2 run")
    args = parser.parse_args()
    if not args.native_only and shutil.which("qemu-x86_64") is None:
        sys.exit("needs qemu-x86_64 (Debian's qemu-user) for the AVX2-only run, or --native-only")
    from difflower.artifact.manifest import Manifest
    from difflower.validate.bench import machine_info

    with tempfile.TemporaryDirectory(prefix="int8-portability-") as scratch:
        paths = export_all(Path(scratch))
        checkpoint = paths.pop("checkpoint")
        report = {"machine": machine_info(), "emulated_cpu": EMULATED_CPU, "artifacts": {}}
        for name, path in paths.items():
            manifest = Manifest.read(path)
            row = {"export_parity": {n: c.parity.summary for n, c in manifest.components.items()}}
            row["native"] = measure(path, checkpoint, emulated=False)
            if not args.native_only:
                row["avx2_emulated"] = measure(path, checkpoint, emulated=True)
            report["artifacts"][name] = row
            print(name, json.dumps({k: v for k, v in row.items() if k != "export_parity"}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
