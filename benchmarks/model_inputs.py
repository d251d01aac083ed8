"""What bringing your own model costs at real size (issue 18): single-file conversion and LoRA fusing.

    python benchmarks/model_inputs.py [--families sd15 sdxl] [--rank 64]

For each family's real config (random weights, fp32): the checkpoint written as one single file
in its authors' layout (reference.single_file.write_single_file), then `convert_single_file` back
to a diffusers folder in a child process (wall time and the child's peak RSS; the weights must
come back equal, max abs 0), then a rank --rank LoRA on every attention projection of the UNet
fused by `load_pipeline(..., loras=...)` against the same load without it. Results go to
benchmarks/results/model-inputs.json with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import CACHE, checkpoint  # noqa: E402

from difflower.reference.loading import load_components, load_text_encoder, read_model_index  # noqa: E402
from difflower.reference.lora import fuse_loras, read_lora  # noqa: E402
from difflower.reference.pipeline import load_pipeline  # noqa: E402
from difflower.reference.single_file import write_single_file  # noqa: E402
from difflower.validate.bench import machine_info, timed  # noqa: E402

LAYOUTS = {"sd15": "sd1", "sdxl": "sdxl"}
CONVERT = """
import json, resource, sys, time
from difflower.reference.single_file import convert_single_file
start = time.perf_counter()
convert_single_file(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def lora_file(source: Path, rank: int, out: Path) -> Path:
    """A kohya-layout LoRA of `rank` on every attention projection of the UNet (random weights)."""
    from safetensors.torch import save_file

    unet = load_components(source)[1]["unet"]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(out))
    return out


def components(folder: Path) -> list[str]:
    index = read_model_index(folder)
    return [name for name in index.components if name.startswith(("unet", "vae", "text_encoder"))]


def max_abs_difference(original: Path, converted: Path, name: str) -> float:
    """Largest difference between a component's weights in two folders, one component in memory
    at a time (the SDXL UNet is 10 GB in fp32); text encoders through transformers, whose file
    naming differs between versions."""
    if name.startswith("text_encoder"):
        class_name = read_model_index(original).components[name][1]
        a, b = (load_text_encoder(folder / name, class_name).state_dict() for folder in (original, converted))
        return max((a[k] - b[k]).abs().max().item() for k in a)
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:  # key -> an open file holding it (shards included)
        handles = [safe_open(str(f), "pt") for f in sorted((folder / name).glob("*.safetensors"))]
        return {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 - not a dict

    a, b = tensors(original), tensors(converted)
    assert a.keys() == b.keys(), name
    return max((a[k].get_tensor(k) - b[k].get_tensor(k)).abs().max().item() for k in a)


def fuse_figures(source: Path, loras: list) -> dict:
    """Loading with and without the LoRA, and the fuse alone: a plain load maps the weights lazily
    (the first step reads them), fusing reads the layers it touches, so the fuse is also timed on
    a UNet whose weights were read first."""
    figures = {
        "load_s": timed(lambda: load_pipeline(source)),
        "load_with_lora_s": timed(lambda: load_pipeline(source, loras=loras)),
    }
    unet = load_components(source)[1]["unet"]
    figures["read_weights_s"] = timed(lambda: sum(float(p.sum()) for p in unet.parameters()))
    figures["fuse_only_s"] = timed(lambda: fuse_loras(unet, "unet", loras))
    return figures


def family_figures(family: str, rank: int, lora_only: bool = False) -> dict:
    source = checkpoint(family)
    single = CACHE / f"{family}-single.safetensors"
    report: dict = {}
    if lora_only:
        lora = lora_file(source, rank, CACHE / f"{family}-lora-r{rank}.safetensors")
        return {"lora": fuse_figures(source, [read_lora(lora, 0.8)])}
    if not single.is_file():
        report["write_single_file_s"] = timed(lambda: write_single_file(source, LAYOUTS[family], single))
    report["single_file_gib"] = single.stat().st_size / 2**30
    out = CACHE / f"{family}-converted"
    command = [sys.executable, "-c", CONVERT, str(single), str(source), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd="/tmp")
    report["convert"] = json.loads(result.stdout.strip().splitlines()[-1])
    report["converted_max_abs"] = max(max_abs_difference(source, out, name) for name in components(source))
    lora = lora_file(source, rank, CACHE / f"{family}-lora-r{rank}.safetensors")
    start = time.perf_counter()
    loras = [read_lora(lora, 0.8)]
    report["lora"] = {"rank": rank, "file_mib": lora.stat().st_size / 2**20, "modules": loras[0].to_json()["modules"]}
    report["lora"]["read_s"] = time.perf_counter() - start
    report["lora"].update(fuse_figures(source, loras))
    print(family, json.dumps(report), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=sorted(LAYOUTS))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lora-only", action="store_true", help="the LoRA figures only, merged into --json")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "model-inputs.json")
    args = parser.parse_args()
    report = {"machine": machine_info(), "families": {}}
    if args.lora_only and args.json.is_file():
        report["families"] = json.loads(args.json.read_text())["families"]
    for family in args.families:
        figures = family_figures(family, args.rank, args.lora_only)
        entry = report["families"].setdefault(family, {})
        for stale in ("load_s", "load_with_lora_s"):  # an earlier layout of these figures, superseded
            entry.pop(stale, None)
        entry.setdefault("lora", {}).update(figures["lora"])
        if not args.lora_only:
            report["families"][family] = figures
    report["peak_rss_gib_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
