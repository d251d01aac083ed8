"""Module-level pass: choose how every attention module computes (and is exported).

`sdpa` (the default), `math` (plain matmul/softmax for converters without SDPA) or
`onnxruntime` (ONNX Runtime's fused MultiHeadAttention operator in exported graphs). The
modules keep their weights and state-dict keys; only the attention kernel changes, and all
variants compute the same function (see difflower.reference.attention).
"""

from __future__ import annotations

from torch import nn

from difflower.errors import ArgumentError
from difflower.graph_passes.base import PassDidNotFire, PassResult
from difflower.reference.attention import ATTENTION_BACKENDS, AttentionBackend, set_attention_backend


def apply_attention_variant(model: nn.Module, variant: AttentionBackend, where: str = "model") -> PassResult:
    """Switch every attention module of `model` to `variant`; raises PassDidNotFire if there is none."""
    if variant not in ATTENTION_BACKENDS:
        raise ArgumentError("--attention", f"must be one of {', '.join(ATTENTION_BACKENDS)}, got {variant!r}")
    count = set_attention_backend(model, variant)
    if count == 0:
        raise PassDidNotFire(f"attention pass: {where} has no attention modules to switch to {variant!r}")
    return PassResult("attention", {"attention modules": count}, {"variant": variant})
