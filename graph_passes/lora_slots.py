"""Module-level pass: LoRA slots in the denoiser's attention projections (`export --lora-slots RANK`).

Every attention projection of the UNet or transformer (`to_q`, `to_k`, `to_v`, `to_out.0`, and the
joint attention's `add_q/k/v_proj`, `to_add_out`) computes `base(x) + (x @ down) @ up` with `down`
(in, RANK) and `up` (RANK, out) as graph inputs, named `lora_down.<module>` / `lora_up.<module>`.
At run time the engine feeds a LoRA's matrices there (zero-padded to RANK, its scale folded into
`up`; several LoRAs side by side along the rank), or zeros: one artifact switches adapters without
re-export, at the cost of two thin matmuls per projection (measured in benchmarks/lora_slots_sd15.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from difflower.artifact.manifest import TensorSpec
from difflower.artifact.specs import ComponentSpec
from difflower.graph_passes.base import PassDidNotFire
from difflower.reference.loading import read_flux_config, read_sd3_config, read_unet_config
from difflower.reference.lora import slot_layers
from difflower.reference.transformer_flux import FluxTransformer2DModel
from difflower.reference.transformer_sd3 import SD3Transformer2DModel
from difflower.reference.unet_2d_condition import UNet2DConditionModel

SLOTTED = ("unet", "transformer")  # the component kinds that get slots
DOWN, UP = "lora_down.", "lora_up."


def with_lora_slots(spec: ComponentSpec, root: Path, rank: int) -> ComponentSpec:
    """`spec` with a down and an up input per slot (built on the meta device: names and shapes only)."""
    folder = Path(root) / spec.source
    with torch.device("meta"):
        if spec.kind == "unet":
            model: nn.Module = UNet2DConditionModel(read_unet_config(folder))
        elif spec.class_name == "FluxTransformer2DModel":
            model = FluxTransformer2DModel(read_flux_config(folder))
        else:
            model = SD3Transformer2DModel(read_sd3_config(folder))
    inputs = []
    for name, layer in slot_layers(model).items():
        inputs += [
            TensorSpec(DOWN + name, "float32", (layer.in_features, rank)),
            TensorSpec(UP + name, "float32", (rank, layer.out_features)),
        ]
    if not inputs:
        raise PassDidNotFire(f"lora_slots: {spec.name} has no attention projections to slot")
    return replace(spec, inputs=(*spec.inputs, *inputs), facts={**spec.facts, "lora_slots": rank})


def slot_shapes(inputs: Sequence[TensorSpec]) -> dict[str, tuple[int, int]]:
    """module path -> (in, out) of the slots a graph with `inputs` has."""
    outs = {t.name.removeprefix(UP): int(t.shape[1]) for t in inputs if t.name.startswith(UP)}
    return {t.name.removeprefix(DOWN): (int(t.shape[0]), outs[t.name.removeprefix(DOWN)])
            for t in inputs if t.name.startswith(DOWN)}  # fmt: skip
