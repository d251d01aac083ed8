"""Multi-head attention shared by the UNet, the VAE and the MMDiT.

Every attention module projects its inputs and calls `attend(q, k, v, heads, backend)` on the
merged (B, N, heads * d) layout. The backend is an attribute of each module,
`attention_backend`, switched on a whole model by `set_attention_backend`:

- "sdpa" (default): `torch.nn.functional.scaled_dot_product_attention`;
- "math": plain matmul/softmax, for converters that cannot take SDPA;
- "onnxruntime": the same math in torch, exported to ONNX as ONNX Runtime's fused
  `com.microsoft::MultiHeadAttention` (CPU and CUDA providers; measured 15% faster for a whole
  SD1.5 UNet step on a 2-core CPU). Other ONNX consumers do not know that operator;
- "split-einsum": one einsum pair per head, the layout Apple's Neural Engine runs well
  (ml-stable-diffusion's SPLIT_EINSUM, on our modules instead of a forked UNet);
- "split-einsum-v2": the same with the queries cut into at most 4 chunks per head, so no
  (Nq, Nk) score matrix is ever whole (SPLIT_EINSUM_V2).

All compute the same thing; they differ by float rounding only.

Layouts: the modules take tokens as (B, N, C) (the reference's layout) or, when a spatial
transformer runs in the Neural Engine layout (graph_passes.ane_layout), as (B, C, 1, N): every
Linear is then applied as a 1x1 convolution of the same weight, and the split-einsum backends
take Apple's channels-first per-head einsums. The input's rank says which (4 = channels-first).
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

AttentionBackend = Literal["sdpa", "math", "onnxruntime", "split-einsum", "split-einsum-v2"]
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = ("sdpa", "math", "onnxruntime", "split-einsum", "split-einsum-v2")
QUERY_CHUNKS = 4  # split-einsum-v2


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    backend: AttentionBackend = "sdpa",
    upcast: bool = False,
) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v over heads; q, k, v are (B, heads, N, d).

    `upcast` computes in fp32 when the inputs are fp16/bf16 (the `upcast_attention` flag of
    SD 2.1-style checkpoints, whose attention logits overflow fp16).
    """
    out_dtype = query.dtype
    if upcast and out_dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    if backend == "math":
        scale = query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, heads, Nq, Nk)
        out = torch.matmul(scores.softmax(dim=-1), value)  # (B, heads, Nq, d)
    elif backend in ("sdpa", "onnxruntime"):
        out = _sdpa(query, key, value)
    elif backend in ("split-einsum", "split-einsum-v2"):
        out = _split_einsum(query, key, value, chunked=backend == "split-einsum-v2")
    else:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
    return out.to(out_dtype)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention, or the same math where this torch build refuses it.

    torch 2.13's bf16/fp16 flash attention on a CPU with AMX packs its operands with an AVX-512
    routine; with the vector dispatch held below AVX-512 (ATEN_CPU_CAPABILITY=default or avx2)
    it raises "pack_vnni2 is only supported when avx512 is supported" from 64 tokens on.
    """
    try:
        return F.scaled_dot_product_attention(query, key, value)
    except RuntimeError as err:
        if "pack_vnni2" not in str(err):
            raise
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5  # (B, heads, Nq, Nk)
    return torch.matmul(scores.softmax(dim=-1), value)  # (B, heads, Nq, d)


def _split_einsum(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunked: bool) -> torch.Tensor:
    """Per-head einsums (heads and chunk counts come from shapes fixed by the config/bucket)."""
    scale = query.shape[-1] ** -0.5
    tokens = query.shape[2]
    size = -(-tokens // QUERY_CHUNKS) if chunked else tokens
    heads = []
    for h in range(query.shape[1]):
        q, k, v = query[:, h], key[:, h], value[:, h]  # (B, N, d)
        parts = []
        for start in range(0, tokens, size):
            weights = torch.einsum("bqd,bkd->bqk", q[:, start : start + size], k) * scale
            parts.append(torch.einsum("bqk,bkd->bqd", weights.softmax(dim=-1), v))
        heads.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.stack(heads, dim=1)  # (B, heads, N, d)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear's weight on (B, N, in) tokens, or as a 1x1 convolution on (B, in, 1, N)."""
    if x.ndim == 4:
        return F.conv2d(x, weight[:, :, None, None], bias)
    return F.linear(x, weight, bias)


def apply_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` in either layout (see `linear`)."""
    return layer(x) if x.ndim == 3 else linear(x, layer.weight, layer.bias)


def feature_dim(x: torch.Tensor) -> int:
    """The channel axis: last for (B, N, C) tokens, 1 for (B, C, 1, N)."""
    return 1 if x.ndim == 4 else -1


def _attend_channels(query, key, value, heads: int, backend: AttentionBackend, upcast: bool) -> torch.Tensor:
    """`attend` on the channels-first layout: (B, H*d, 1, Nq), (B, H*d, 1, Nk) x2 -> (B, H*d, 1, Nq)."""
    if backend not in ("split-einsum", "split-einsum-v2"):
        q, k, v = (x.flatten(2).transpose(1, 2) for x in (query, key, value))  # (B, N, H*d)
        out = attend(q, k, v, heads, "sdpa" if backend == "onnxruntime" else backend, upcast)
        return out.transpose(1, 2).unsqueeze(2)  # (B, H*d, 1, Nq)
    out_dtype = query.dtype
    if upcast and out_dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    head_dim = query.shape[1] // heads
    scale = head_dim**-0.5
    tokens = query.shape[3]
    size = -(-tokens // QUERY_CHUNKS) if backend == "split-einsum-v2" else tokens
    key = key.transpose(1, 3)  # (B, Nk, 1, H*d)
    outs = []
    for h in range(heads):
        channels = slice(h * head_dim, (h + 1) * head_dim)
        q, k, v = query[:, channels], key[..., channels], value[:, channels]  # (B,d,1,Nq) (B,Nk,1,d) (B,d,1,Nk)
        parts = []
        for start in range(0, tokens, size):
            weights = torch.einsum("bchq,bkhc->bkhq", q[..., start : start + size], k) * scale  # (B, Nk, 1, q)
            parts.append(torch.einsum("bkhq,bchk->bchq", weights.softmax(dim=1), v))  # (B, d, 1, q)
        outs.append(torch.cat(parts, dim=3) if len(parts) > 1 else parts[0])
    return torch.cat(outs, dim=1).to(out_dtype)


class _OnnxRuntimeMultiHeadAttention(torch.autograd.Function):
    """SDPA in torch; ONNX Runtime's fused MultiHeadAttention operator when exported to ONNX."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        out = multi_head_attention(split_heads(query, heads), split_heads(key, heads), split_heads(value, heads))
        return merge_heads(out)

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads)
        out.setType(query.type())  # (B, Nq, heads * d), as the query
        return out


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    backend: AttentionBackend = "sdpa",
    upcast: bool = False,
) -> torch.Tensor:
    """Attention over merged projections: (B, Nq, H*d), (B, Nk, H*d), (B, Nk, H*d) -> (B, Nq, H*d);
    or the same channels-first, (B, H*d, 1, N) each (the Neural Engine layout)."""
    if query.ndim == 4:
        return _attend_channels(query, key, value, heads, backend, upcast)
    if backend == "onnxruntime" and not (upcast and query.dtype in (torch.float16, torch.bfloat16)):
        return _OnnxRuntimeMultiHeadAttention.apply(query, key, value, heads)
    q, k, v = split_heads(query, heads), split_heads(key, heads), split_heads(value, heads)
    return merge_heads(multi_head_attention(q, k, v, "sdpa" if backend == "onnxruntime" else backend, upcast))


class Attention(nn.Module):
    """Self- or cross-attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.upcast = upcast
        self.is_cross = cross_attention_dim is not None
        self.attention_backend: AttentionBackend = "sdpa"
        # Set by graph_passes.fuse_qkv: one projection for q|k|v (self) or k|v (cross).
        self.to_qkv: nn.Linear | None = None
        self.to_kv: nn.Linear | None = None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        # A list so the state-dict key is diffusers' `to_out.0` (their index 1 is a Dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, N, query_dim), context (B, M, context_dim) or None for self-attention;
        or both channels-first, (B, query_dim, 1, N) and (B, context_dim, 1, M)."""
        query, key, value = self._project(hidden_states, context)
        out = attend(query, key, value, self.heads, self.attention_backend, self.upcast)
        return apply_linear(cast(nn.Linear, self.to_out[0]), out)

    def _project(self, hidden_states: torch.Tensor, context: torch.Tensor | None):
        dim = feature_dim(hidden_states)
        if self.to_qkv is not None:
            if context is None:
                return apply_linear(self.to_qkv, hidden_states).chunk(3, dim=dim)
            # a fused self-attention module used for cross-attention: split the one weight
            inner = self.to_qkv.out_features // 3
            q_weight, kv_weight = self.to_qkv.weight.split([inner, 2 * inner])
            q_bias, kv_bias = (None, None) if self.to_qkv.bias is None else self.to_qkv.bias.split([inner, 2 * inner])
            query = linear(hidden_states, q_weight, q_bias)
            return (query, *linear(context, kv_weight, kv_bias).chunk(2, dim=dim))
        context = hidden_states if context is None else context
        if self.to_kv is not None:
            return (apply_linear(self.to_q, hidden_states), *apply_linear(self.to_kv, context).chunk(2, dim=dim))
        return tuple(
            apply_linear(p, x) for p, x in ((self.to_q, hidden_states), (self.to_k, context), (self.to_v, context))
        )


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> int:
    """Switch every attention module in `model` to `backend`; returns how many were switched."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
    count = 0
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            setattr(module, "attention_backend", backend)  # noqa: B010 - any module with the attribute
            count += 1
    return count
