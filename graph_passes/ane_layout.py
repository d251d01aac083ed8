"""Module-level pass: the Neural Engine layout of the UNet's spatial transformers (Core ML).

Apple's ml-stable-diffusion keeps the transformer blocks' activations as (B, C, 1, S) and runs
every Linear as a 1x1 convolution, layer norms over axis 1: the Neural Engine wants 4-D tensors
with the long axis last, and the (B, S, C) layout costs a transpose around every block. Here
each `Transformer2DModel` switches to that layout (`layout = "channels"`); the Linears keep
their parameters and state-dict keys, so the unchanged checkpoint loads, and the function is
the same (measured: `parity` against the module before the pass).

The MMDiT of SD3 has no such blocks: the pass applies to UNets (the exporter asks for it only
there) and fails loudly on a module without spatial transformers.
"""

from __future__ import annotations

from torch import nn

from difflower.graph_passes.base import PassDidNotFire, PassResult
from difflower.reference.unet_blocks import Transformer2DModel


def apply_ane_layout(model: nn.Module, where: str = "model") -> PassResult:
    """Switch every spatial transformer of `model` to the (B, C, 1, S) layout."""
    transformers = [m for m in model.modules() if isinstance(m, Transformer2DModel)]
    if not transformers:
        raise PassDidNotFire(f"ane_layout: {where} has no spatial transformer blocks to lay out as (B, C, 1, S)")
    linears = 0
    for transformer in transformers:
        transformer.layout = "channels"
        blocks = transformer.transformer_blocks.modules()
        linears += sum(isinstance(m, nn.Linear) for m in blocks)
        linears += 2 * transformer.use_linear_projection  # proj_in / proj_out
    rewrites = {
        "spatial transformers": len(transformers),
        "transformer blocks": sum(len(t.transformer_blocks) for t in transformers),
        "linears as 1x1 convolutions": linears,
    }
    return PassResult("ane_layout", rewrites, {"layout": "(B, C, 1, S)", "layer_norm": "over axis 1"})
