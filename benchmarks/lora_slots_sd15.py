"""What an unfused LoRA slot costs per step (issue 18): the SD1.5 UNet exported to ONNX with a LoRA
fused into its weights against the same UNet exported with `--lora-slots` and the LoRA fed as inputs.

    python benchmarks/lora_slots_sd15.py [--rank 16] [--slots 32] [--runs 5]
    python benchmarks/lora_slots_sd15.py --tiny   # smoke test: a tiny checkpoint (seconds)

The checkpoint is SD1.5's published config with random weights (CACHE, see onnx_unet.py). The LoRA
is random, rank --rank on every attention projection (to_q/k/v/out of the 32 attention modules, 128
layers), as a peft-layout file. Both artifacts hold the UNet only (ONNX Runtime, fp32, dynamic
shapes); one CFG step (batch 2, 4x64x64 latents = 512x512 px) is timed on each, interleaved in one
process, median of --runs after warm-ups, with the slotted UNet fed the LoRA (as generate --lora
feeds it) and fed zeros (no LoRA: the cost does not depend on the values). The slotted output is
compared with the fused one (the same function, summed in another order).

Writes benchmarks/results/lora-slots-sd15.json (--tiny: a temp file) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onnx_unet import sd15_source, sd15_step_inputs, timed_result, write_result  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.driver import export  # noqa: E402
from difflower.graph_passes.lora_slots import slot_layers, slot_shapes  # noqa: E402
from difflower.reference.loading import load_unet, read_unet_config  # noqa: E402
from difflower.reference.lora import read_lora, slot_matrices  # noqa: E402
from difflower.runtimes.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from difflower.validate.bench import interleaved, machine_info  # noqa: E402
from difflower.validate.metrics import compare  # noqa: E402


def random_lora(checkpoint: Path, rank: int, path: Path) -> Path:
    """A peft-layout LoRA of `rank` on every attention projection of the UNet (no alpha: scaling 1)."""
    with torch.device("meta"):
        from difflower.reference.unet_2d_condition import UNet2DConditionModel

        layers = slot_layers(UNet2DConditionModel(read_unet_config(checkpoint / "unet")))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, layer in layers.items():
        state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.02
        state[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.02
    save_file(state, str(path))
    return path


def exported(checkpoint: Path, folder: Path, **options) -> float | None:
    if (folder / "difflower.json").is_file():
        return None  # an earlier run's export, reused
    _, seconds = timed_result(export, checkpoint, "onnx", folder, components=["unet"], overwrite=True, **options)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="the LoRA's rank")
    parser.add_argument("--slots", type=int, default=32, help="the slots' rank (--lora-slots)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="lora-slots-"))
    root, checkpoint, out = sd15_source(args.tiny, scratch, args.out, "lora-slots-sd15")
    lora = random_lora(checkpoint, args.rank, scratch / f"lora-r{args.rank}.safetensors")
    tag = "tiny" if args.tiny else "sd15"
    fused_dir, slotted_dir = (
        root / f"{tag}-onnx-unet-lora-fused-r{args.rank}",
        root / f"{tag}-onnx-unet-slots-{args.slots}",
    )
    seconds = {
        "fused": exported(checkpoint, fused_dir, lora=[(lora, 1.0)]),
        "slotted": exported(checkpoint, slotted_dir, lora_slots=args.slots),
    }
    fused = OnnxRuntimeEngine(Manifest.read(fused_dir).components["unet"], fused_dir)
    slotted = OnnxRuntimeEngine(Manifest.read(slotted_dir).components["unet"], slotted_dir)
    slots = slot_shapes(slotted.inputs)
    config = read_unet_config(checkpoint / "unet")
    with_lora = slot_matrices([read_lora(lora)], slots, args.slots, config)
    zeros = slot_matrices([], slots, args.slots, config)
    inputs = sd15_step_inputs()
    if args.tiny:  # the tiny UNet's sizes: 8x8 latents, a 32-wide text context
        inputs = {**inputs, "sample": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 77, 32)}
    runners = {
        "fused": lambda: fused(inputs)["out_sample"],
        "slotted_with_lora": lambda: slotted({**inputs, **with_lora})["out_sample"],
        "slotted_zeros": lambda: slotted({**inputs, **zeros})["out_sample"],
    }
    outputs = {name: torch.as_tensor(run()) for name, run in runners.items()}
    timings = interleaved(runners, args.runs, warmup=2)
    median = {name: t.median_s for name, t in timings.items()}
    eager = load_unet(checkpoint / "unet", torch.float32)
    with torch.no_grad():
        base = eager(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    result = {
        "benchmark": f"{tag} unet, one CFG step (batch 2), fp32, ONNX Runtime: a rank-{args.rank} LoRA fused vs fed "
        f"to rank-{args.slots} slots on {len(slots)} attention projections",
        "median_s": median,
        "slot_cost_vs_fused": {name: median[name] / median["fused"] for name in runners},
        "timings": {name: t.to_json() for name, t in timings.items()},
        "export_s": seconds,
        "slotted_vs_fused": compare(outputs["slotted_with_lora"], outputs["fused"]).to_json(),
        "lora_moves_the_output": compare(outputs["fused"], base).to_json(),
        "machine": machine_info(),
        "command": "python benchmarks/lora_slots_sd15.py " + " ".join(sys.argv[1:]),
    }
    table = "| UNet call | median s | vs fused |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {median[name]:.3f} | {median[name] / median['fused']:.3f}x |" for name in runners
    )
    write_result(out, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
