"""Compiled eager: `torch.compile` on the repeated blocks of our models (regional compilation).

Compiling a whole UNet or MMDiT takes minutes before the first image; its blocks repeat (the
same transformer block, the same resnet block, many times), so compiling each block's forward
compiles a few distinct graphs that every repetition reuses, as diffusers' optimization guide
recommends. Shapes are static (`dynamic=False`): one size compiles once, another size compiles
again. The numbers are the eager reference's within the fp32 gates (tested); the modules load
the unchanged checkpoint as before.
"""

from __future__ import annotations

import torch
from torch import nn

from difflower.errors import ArgumentError
from difflower.reference.autoencoder_kl import VAEAttention
from difflower.reference.resnet import ResnetBlock2D
from difflower.reference.transformer_sd3 import JointTransformerBlock
from difflower.reference.unet_blocks import BasicTransformerBlock

# The blocks our models repeat: attention and transformer blocks, resnet blocks.
REGIONS: tuple[type[nn.Module], ...] = (BasicTransformerBlock, JointTransformerBlock, ResnetBlock2D, VAEAttention)


def compile_regions(model: nn.Module, where: str = "model") -> int:
    """`torch.compile` every repeated block of `model` in place; returns how many were compiled."""
    count = 0
    for module in model.modules():
        if isinstance(module, REGIONS):
            module.compile(dynamic=False)
            count += 1
    if count == 0:
        raise ArgumentError("compile", f"{where} has no block difflower compiles regionally; load it without compile")
    # Every instance of a block class shares one forward, and dynamo keeps one graph per shape of
    # it up to `recompile_limit` (8), then runs the rest eagerly with a warning: SD1.5's UNet
    # has resnet blocks of 14 distinct input shapes. Allow one graph per compiled block.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, count)
    return count
