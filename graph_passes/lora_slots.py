"""Module-level pass: LoRA slots in the denoiser's attention projections (`export --lora-slots RANK`).

Every attention projection of the UNet or transformer (`to_q`, `to_k`, `to_v`, `to_out.0`, and the
joint attention's `add_q/k/v_proj`, `to_add_out`) computes `base(x) + (x @ down) @ up` with `down`
(in, RANK) and `up` (RANK, out) as graph inputs, named `lora_down.<module>` / `lora_up.<module>`.
At run time the engine feeds a LoRA's matrices there (zero-padded to RANK, its scale folded into
`up`; several LoRAs side by side along the rank), or zeros: one artifact switches adapters without
re-export, at the cost of two thin matmuls per projection (measured in benchmarks/lora_slots_sd15.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from difflower.artifact.manifest import TensorSpec
from difflower.artifact.specs import ComponentSpec
from difflower.graph_passes.base import PassDidNotFire
from difflower.reference.loading import read_flux_config, read_sd3_config, read_unet_config
from difflower.reference.transformer_flux import FluxTransformer2DModel
from difflower.reference.transformer_sd3 import SD3Transformer2DModel
from difflower.reference.unet_2d_condition import UNet2DConditionModel

TARGETS = re.compile(r"\.attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
SLOTTED = ("unet", "transformer")  # the component kinds that get slots
DOWN, UP = "lora_down.", "lora_up."


def slot_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The projections that get a slot, by module path in diffusers' names."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and TARGETS.search(name)
    }


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


class LoraSlot(nn.Module):
    """A Linear plus a low-rank update whose matrices arrive per call (set by LoraSlotted)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.down is None or self.up is None:
            return out
        return out + torch.matmul(torch.matmul(x, self.down), self.up)


class LoraSlotted(nn.Module):
    """An export wrapper whose projections take their LoRA matrices as its trailing inputs."""

    def __init__(self, wrapper: nn.Module):
        super().__init__()
        self.wrapper = wrapper
        self.slots: list[LoraSlot] = []
        for name, layer in slot_layers(wrapper).items():
            parent_name, _, child = name.rpartition(".")
            slot = LoraSlot(layer)
            setattr(wrapper.get_submodule(parent_name), child, slot)
            self.slots.append(slot)

    def forward(self, *inputs: torch.Tensor):
        count = len(inputs) - 2 * len(self.slots)
        matrices = inputs[count:]
        for k, slot in enumerate(self.slots):
            slot.down, slot.up = matrices[2 * k], matrices[2 * k + 1]
        try:
            return self.wrapper(*inputs[:count])
        finally:
            for slot in self.slots:
                slot.down = slot.up = None
