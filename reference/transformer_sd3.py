"""The SD3 / SD3.5 MMDiT denoiser, written to be exported, with diffusers' state-dict keys.

Image tokens and text tokens get their own projections and norms but attend jointly; the last
block is `context_pre_only` (its text stream is not updated). SD3.5 adds RMS q/k norms
(`qk_norm="rms_norm"`) and, in `dual_attention_layers`, a second self-attention over image
tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from difflower.reference.attention import AttentionBackend, attend, merge_heads, split_heads
from difflower.reference.config import require_positive
from difflower.reference.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from difflower.reference.normalization import AdaLayerNormContinuous, AdaLayerNormZero, RMSNorm, SD35AdaLayerNormZeroX

SD3_CLASS_NAMES = ("SD3Transformer2DModel",)
SD3_IGNORED_FIELDS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SD3Config:
    """diffusers' SD3Transformer2DModel config fields."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Literal["rms_norm"] | None = None

    def __post_init__(self) -> None:
        require_positive(
            self,
            "sample_size",
            "patch_size",
            "in_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
            "pooled_projection_dim",
            "out_channels",
            "pos_embed_max_size",
        )
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"field 'caption_projection_dim' ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def blocks_after_first(self) -> int:
        """What the first-block cache skips."""
        return self.num_layers - 1


class FeedForward(nn.Module):
    """Linear-gelu(tanh)-linear MLP with diffusers' keys `net.0.proj` and `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([_GeluProj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate="tanh")


class JointAttention(nn.Module):
    """Attention over [image tokens ; text tokens] with separate projections per stream.

    With `has_context=False` it is plain self-attention over image tokens (SD3.5's `attn2`).
    """

    def __init__(
        self, dim: int, heads: int, head_dim: int, qk_norm: str | None, has_context: bool, context_pre_only: bool
    ):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.context_pre_only = context_pre_only
        self.attention_backend: AttentionBackend = "sdpa"
        # Set by graph_passes.fuse_qkv: one projection per stream for q|k|v.
        self.to_qkv: nn.Linear | None = None
        self.add_qkv: nn.Linear | None = None
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim)])
        rms = qk_norm == "rms_norm"
        self.norm_q = RMSNorm(head_dim, eps=1e-6) if rms else None
        self.norm_k = RMSNorm(head_dim, eps=1e-6) if rms else None
        if has_context:
            self.add_q_proj = nn.Linear(dim, inner_dim)
            self.add_k_proj = nn.Linear(dim, inner_dim)
            self.add_v_proj = nn.Linear(dim, inner_dim)
            self.to_add_out = None if context_pre_only else nn.Linear(inner_dim, dim)
            self.norm_added_q = RMSNorm(head_dim, eps=1e-6) if rms else None
            self.norm_added_k = RMSNorm(head_dim, eps=1e-6) if rms else None

    def _qkv(self, x: torch.Tensor, fused: nn.Linear | None, to_q, to_k, to_v, norm_q, norm_k):
        """Projections in the merged (B, N, heads * d) layout, RMS-normed per head when configured."""
        query, key, value = fused(x).chunk(3, dim=-1) if fused is not None else (to_q(x), to_k(x), to_v(x))
        if norm_q is not None:
            query = merge_heads(norm_q(split_heads(query, self.heads)))  # norm over each head's d
            key = merge_heads(norm_k(split_heads(key, self.heads)))
        return query, key, value

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, N, D), encoder_hidden_states (B, T, D) -> (image out, text out or None)."""
        projections = (self.to_qkv, self.to_q, self.to_k, self.to_v)
        query, key, value = self._qkv(hidden_states, *projections, self.norm_q, self.norm_k)
        n_image = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = self._qkv(
                encoder_hidden_states,
                self.add_qkv,
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.norm_added_q,
                self.norm_added_k,
            )
            query = torch.cat([query, c_query], dim=1)  # (B, N + T, inner)
            key = torch.cat([key, c_key], dim=1)
            value = torch.cat([value, c_value], dim=1)
        out = attend(query, key, value, self.heads, self.attention_backend)  # (B, N [+ T], inner)
        context_out = None
        if encoder_hidden_states is not None:
            out, context_out = out[:, :n_image], out[:, n_image:]
            if self.to_add_out is not None:
                context_out = self.to_add_out(context_out)
        return self.to_out[0](out), context_out


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-Zero modulated joint attention and MLPs for both streams."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, qk_norm: str | None, dual: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.dual = dual
        self.norm1 = SD35AdaLayerNormZeroX(dim) if dual else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, has_context=True, context_pre_only=context_pre_only)
        self.attn2 = (
            JointAttention(dim, heads, head_dim, qk_norm, has_context=False, context_pre_only=False) if dual else None
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (text stream or None for the last block, image stream); all (B, tokens, D)."""
        # 1. modulation of both streams
        if self.dual:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_x2, gate_msa2 = self.norm1(hidden_states, temb)
        else:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)

        # 2. joint attention (and SD3.5's image-only attention)
        attn_out, context_attn_out = self.attn(norm_x, norm_c)
        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        if self.attn2 is not None:
            attn2_out, _ = self.attn2(norm_x2)
            hidden_states = hidden_states + gate_msa2[:, None] * attn2_out

        # 3. image MLP
        norm_x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(norm_x)

        # 4. text MLP (skipped by the last block, whose text output nobody reads)
        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        norm_c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(norm_c)
        return encoder_hidden_states, hidden_states


class TransformerOutput(NamedTuple):
    """`.sample` or `[0]`: the velocity prediction (B, out_channels, H, W)."""

    sample: torch.Tensor


class SD3Transformer2DModel(nn.Module):
    """MMDiT; `forward(hidden_states=, encoder_hidden_states=, pooled_projections=, timestep=)` as diffusers."""

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(
            config.sample_size, config.patch_size, config.in_channels, dim, config.pos_embed_max_size
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(
                dim,
                config.num_attention_heads,
                config.attention_head_dim,
                context_pre_only=i == config.num_layers - 1,
                qk_norm=config.qk_norm,
                dual=i in config.dual_attention_layers,
            )
            for i in range(config.num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, config.patch_size * config.patch_size * config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        return_dict: bool = True,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        """hidden_states (B, C, H, W), encoder_hidden_states (B, T, joint_dim), pooled (B, P), timestep (B,)."""
        height, width = hidden_states.shape[-2:]
        tokens, context, temb = self._embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        for block in self.transformer_blocks:
            context, tokens = block(tokens, context, temb)
        output = self._unpatchify(tokens, temb, height, width)
        return TransformerOutput(output) if return_dict else (output,)

    def _embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """Image patches (B, h*w, D), text tokens (B, T, D) and the conditioning vector (B, D)."""
        tokens = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        return tokens, self.context_embedder(encoder_hidden_states), temb

    def _unpatchify(self, tokens: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final modulation and projection of the image tokens (B, h*w, D) -> (B, C, H, W)."""
        p = self.config.patch_size
        tokens = self.proj_out(self.norm_out(tokens, temb))  # (B, h*w, p*p*C)
        batch, channels = tokens.shape[0], self.config.out_channels
        tokens = tokens.reshape(batch, height // p, width // p, p, p, channels)  # (B, h, w, p, p, C)
        tokens = tokens.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return tokens.reshape(batch, channels, height, width)

    # -- first-block caching: the first block alone, the full pass with the tail residual, and the
    # -- output from the first block plus a cached tail residual. Token tensors cross these calls in
    # -- a (B, D, h, w) grid so that a graph of one part knows the image size (h = H / patch_size).

    def first_block(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the image tokens after the first block, that block's residual), both (B, D, h, w)."""
        tokens, context, temb = self._embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        _, first = self.transformer_blocks[0](tokens, context, temb)
        grid = self._grid_size(hidden_states)
        return _to_grid(first, grid), _to_grid(first - tokens, grid)

    def forward_with_tail(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole transformer -> (its prediction (B, C, H, W), the tail residual (B, D, h, w): what
        the blocks after the first added to the image tokens), as diffusers' FirstBlockCache keeps it."""
        height, width = hidden_states.shape[-2:]
        tokens, context, temb = self._embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        context, tokens = self.transformer_blocks[0](tokens, context, temb)
        first = tokens
        for block in self.transformer_blocks[1:]:
            context, tokens = block(tokens, context, temb)
        output = self._unpatchify(tokens, temb, height, width)
        return output, _to_grid(tokens - first, self._grid_size(hidden_states))

    def forward_from_cache(self, first, tail_residual, pooled_projections, timestep) -> torch.Tensor:
        """The prediction from the first block's tokens plus a cached tail residual (both (B, D, h, w)),
        the blocks after the first skipped."""
        p = self.config.patch_size
        temb = self.time_text_embed(timestep, pooled_projections)
        tokens = (tail_residual + first).flatten(2).transpose(1, 2)  # (B, h*w, D)
        return self._unpatchify(tokens, temb, first.shape[2] * p, first.shape[3] * p)

    def _grid_size(self, hidden_states: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


def _to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens (B, h*w, D) -> (B, D, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
