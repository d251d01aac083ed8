"""TorchScript on CUDA (issue 8's GPU path): tiny sd / sdxl / sd3 traced on the GPU, then
generated and validated there against the eager reference at the fp32 gates.

    python benchmarks/gpu_torchscript.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from pathlib import Path

import torch

from difflower.driver import export
from difflower.reference.tiny import make_tiny_checkpoint
from difflower.validate.bench import machine_info
from difflower.validate.parity import validate_artifact

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu-torchscript.json")
    args = parser.parse_args()
    machine = machine_info()
    report: dict = {"gpu": machine.get("gpu"), "torch": torch.__version__, "machine": machine, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd", "sdxl", "sd3"):
            try:
                source = make_tiny_checkpoint(Path(tmp) / family, family, seed=0)
                artifact = Path(tmp) / f"{family}-ts"
                manifest = export(source, "torchscript", artifact, device="cuda", progress=False)
                result = validate_artifact(artifact, source, steps=4, device="cuda")
                report["families"][family] = {
                    "export_parity": {n: r.parity.summary for n, r in manifest.components.items()},
                    "traced_on": {n: r.config.get("traced_on") for n, r in manifest.components.items()},
                    "validate_passed": result.passed,
                    "validate": result.to_json(),
                }
            except Exception:
                report["families"][family] = {"error": traceback.format_exc()[-2000:]}
            print(family, json.dumps(report["families"][family])[:400], flush=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
