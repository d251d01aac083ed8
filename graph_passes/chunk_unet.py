"""Module-level pass: the UNet in two chained halves (`--chunk-unet`, Core ML for iOS).

iOS loads an ML program's weights more reliably when each package is under 1 GB (Apple's
ml-stable-diffusion splits its UNet's MIL program in two for that). Here the split is made on
our own module, between two stages of `UNet2DConditionModel.stages()` (conv_in, down blocks,
mid block, up blocks, head), at the stage boundary that best balances the two halves' weight
bytes. The first half computes the time embedding and runs up to the split; it hands over the
hidden states, the embedding and the skip connections still pending. The second half runs the
rest. Chained, they compute the whole UNet (the chained output's difference from the unsplit
module is recorded as the pass's parity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflower.graph_passes.base import PassDidNotFire, PassResult
from difflower.reference.unet_2d_condition import UNet2DConditionModel

PACKAGE_LIMIT = 1 << 30  # bytes of weights per package that iOS loads comfortably


class FirstHalf(nn.Module):
    """Embedding and stages [0, stop): the component's inputs -> (hidden_states, emb, *skips)."""

    def __init__(self, unet: UNet2DConditionModel, stop: int, text_time: bool):
        super().__init__()
        self.unet, self.stop, self.text_time = unet, stop, text_time

    def forward(self, sample, timestep, encoder_hidden_states, *conditions):
        if self.unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        added = {"text_embeds": conditions[0], "time_ids": conditions[1]} if self.text_time else None
        timestep_cond = conditions[-1] if self.unet.config.time_cond_proj_dim is not None else None
        emb = self.unet.embed(sample, timestep, added, timestep_cond)
        sample, skips = self.unet.run_stages(sample, [], emb, encoder_hidden_states, 0, self.stop)
        return (sample, emb, *skips)


class SecondHalf(nn.Module):
    """Stages [start, end): (hidden_states, emb, encoder_hidden_states, *skips) -> (out_sample,)."""

    def __init__(self, unet: UNet2DConditionModel, start: int):
        super().__init__()
        self.unet, self.start = unet, start

    def forward(self, hidden_states, emb, encoder_hidden_states, *skips):
        sample, _ = self.unet.run_stages(hidden_states, list(skips), emb, encoder_hidden_states, self.start)
        return (sample,)


@dataclass
class Chunk:
    """One half: its module, example inputs (by feature name), output names and weight bytes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    stages: list[str]
    weight_bytes: int

    def describe(self) -> dict:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": self.outputs,
            "stages": self.stages,
            "weight_bytes": self.weight_bytes,
        }


def _stage_bytes(unet: UNet2DConditionModel, bytes_per_weight: int) -> tuple[int, list[int]]:
    """Weight bytes of the embedding (first half) and of each stage, at `bytes_per_weight`."""

    def size(*modules: nn.Module | None) -> int:
        return sum(p.numel() for m in modules if m is not None for p in m.parameters()) * bytes_per_weight

    embedding = size(unet.time_embedding, unet.add_embedding)
    stages = []
    for name in unet.stages():
        modules = (unet.conv_norm_out, unet.conv_out) if name == "conv_out" else (unet.get_submodule(name),)
        stages.append(size(*modules))
    return embedding, stages


def balanced_split(unet: UNet2DConditionModel, bytes_per_weight: int) -> tuple[int, int, int]:
    """The stage index splitting the UNet's weights most evenly, and the two halves' bytes."""
    embedding, stages = _stage_bytes(unet, bytes_per_weight)
    total = embedding + sum(stages)
    best = None
    for stop in range(1, len(stages)):
        first = embedding + sum(stages[:stop])
        if best is None or max(first, total - first) < max(best[1], best[2]):
            best = (stop, first, total - first)
    return best


def split_unet(
    module: nn.Module, inputs: dict[str, torch.Tensor], expected, bytes_per_weight: int
) -> tuple[list[Chunk], PassResult]:
    """The export module of a UNet (exporters.specs.UNetExport) as two chained chunks, with
    example inputs for each and the chained-vs-whole parity."""
    unet = getattr(module, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise PassDidNotFire("chunk_unet: the denoiser is not a UNet; export without --chunk-unet")
    stop, first_bytes, second_bytes = balanced_split(unet, bytes_per_weight)
    names = unet.stages()
    first = FirstHalf(unet, stop, module.text_time)
    second = SecondHalf(unet, stop)
    with torch.no_grad():
        handed = first(*inputs.values())
        skips = [f"skip_{i}" for i in range(len(handed) - 2)]
        handover = dict(zip(["hidden_states", "emb", *skips], handed, strict=True))
        second_inputs = {
            "hidden_states": handover["hidden_states"],
            "emb": handover["emb"],
            "encoder_hidden_states": inputs["encoder_hidden_states"],
            **{k: handover[k] for k in skips},
        }
        got = second(*second_inputs.values())
    chunks = [
        Chunk("chunk1", first, dict(inputs), list(handover), names[:stop], first_bytes),
        Chunk("chunk2", second, second_inputs, ["out_sample"], names[stop:], second_bytes),
    ]
    parity = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    over = [c.name for c in chunks if c.weight_bytes > PACKAGE_LIMIT]
    result = PassResult(
        "chunk_unet",
        {"chunks": 2, "skip connections handed over": len(skips)},
        {
            "split_after": names[stop - 1],
            "weight_bytes": {c.name: c.weight_bytes for c in chunks},
            "over_1_gb": over,
        },
        {"max_abs_chained_vs_whole": parity},
    )
    return chunks, result
