"""Module-level pass: fuse attention projections into one matmul each (`--fuse-qkv`).

- UNet self-attention: `to_q`, `to_k`, `to_v` -> `to_qkv` (one (3*inner, dim) projection);
- UNet cross-attention: `to_k`, `to_v` -> `to_kv` (the context is projected once);
- MMDiT joint attention (SD3, and Flux's double- and single-stream blocks): `to_q/k/v` -> `to_qkv`
  and the context stream's `add_q/k/v_proj` -> `add_qkv`.

The outputs are the same function (the fused weight is the concatenation; only the summation
order inside a matmul can differ). A fused module still loads diffusers' keys: a load-state-dict
pre-hook concatenates `to_q/k/v.weight` (and biases) into the fused ones, so the unchanged
checkpoint loads into it with zero missing and zero unexpected keys. Its own state dict names the
fused projections (`to_qkv.weight`), as it holds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difflower.graph_passes.base import PassDidNotFire, PassResult
from difflower.reference.attention import Attention
from difflower.reference.transformer_flux import FluxAttention
from difflower.reference.transformer_sd3 import JointAttention

PARAMS = ("weight", "bias")


def _concat_linear(parts: Sequence[nn.Linear]) -> nn.Linear:
    first = parts[0]
    fused = nn.Linear(
        first.in_features,
        sum(p.out_features for p in parts),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(first.weight.requires_grad)


def _fuse(module: nn.Module, fused_name: str, names: Sequence[str]) -> None:
    """Replace `module.<names>` by `module.<fused_name>`, keeping the original state-dict keys."""
    parts = [getattr(module, n) for n in names]
    setattr(module, fused_name, _concat_linear(parts))
    for name in names:
        setattr(module, name, None)  # absent from the state dict; the forward uses the fused one

    def concat_on_load(mod, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for param in PARAMS:
            keys = [f"{prefix}{name}.{param}" for name in names]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused_name}.{param}"] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_load_state_dict_pre_hook(concat_on_load)


def fuse_qkv(model: nn.Module, where: str = "model") -> PassResult:
    """Fuse every attention module's projections in `model`; raises PassDidNotFire if none."""
    counts = {"self-attention q|k|v": 0, "cross-attention k|v": 0, "joint image q|k|v": 0, "joint context q|k|v": 0}
    attention_modules = 0
    for module in model.modules():
        if isinstance(module, Attention):
            attention_modules += 1
            if module.to_qkv is not None or module.to_kv is not None:
                continue  # already fused
            if module.is_cross:
                _fuse(module, "to_kv", ("to_k", "to_v"))
                counts["cross-attention k|v"] += 1
            else:
                _fuse(module, "to_qkv", ("to_q", "to_k", "to_v"))
                counts["self-attention q|k|v"] += 1
        elif isinstance(module, (JointAttention, FluxAttention)):  # Flux's: the same projection names
            attention_modules += 1
            if module.to_qkv is not None:
                continue
            _fuse(module, "to_qkv", ("to_q", "to_k", "to_v"))
            counts["joint image q|k|v"] += 1
            if hasattr(module, "add_q_proj"):
                _fuse(module, "add_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
                counts["joint context q|k|v"] += 1
    rewrites = {k: v for k, v in counts.items() if v}
    if not rewrites:
        found = f"{attention_modules} already fused" if attention_modules else "no attention modules"
        raise PassDidNotFire(f"fuse_qkv: nothing to fuse in {where} ({found})")
    return PassResult("fuse_qkv", rewrites, {"attention_modules": attention_modules})
