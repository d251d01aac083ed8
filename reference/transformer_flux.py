"""The FLUX.1 denoiser (dev and schnell), written to be exported, with diffusers' state-dict keys.

Double-stream blocks keep text and image tokens apart (own projections, norms and MLPs) but
attend jointly over [text ; image]; single-stream blocks run one sequence of both with a
parallel attention + MLP. Positions enter as 3-axis rotary embeddings of `txt_ids` / `img_ids`
(`axes_dims_rope`), and FLUX.1-dev embeds the (distilled) guidance scale beside the timestep.
The latents arrive packed: 2x2 latent patches as tokens of 64 channels (the pipeline packs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflower.reference.attention import AttentionBackend, attend, merge_heads, split_heads
from difflower.reference.config import require_positive
from difflower.reference.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    TextProjection,
    TimestepEmbedding,
    Timesteps,
)
from difflower.reference.normalization import AdaLayerNormContinuous, AdaLayerNormZero, RMSNorm
from difflower.reference.transformer_sd3 import FeedForward, TransformerOutput

FLUX_CLASS_NAMES = ("FluxTransformer2DModel",)
FLUX_IGNORED_FIELDS: frozenset[str] = frozenset()
ROPE_THETA = 10000


@dataclass(frozen=True)
class FluxConfig:
    """diffusers' FluxTransformer2DModel config fields."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self) -> None:
        require_positive(
            self,
            "in_channels",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
            "pooled_projection_dim",
        )
        if self.patch_size != 1:
            raise ValueError(f"field 'patch_size' must be 1 (the pipeline packs 2x2 patches), got {self.patch_size}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"field 'axes_dims_rope' {list(self.axes_dims_rope)} must be even sizes summing to "
                f"attention_head_dim ({self.attention_head_dim})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def channels_out(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def mlp_dim(self) -> int:
        """A single-stream block's MLP width (diffusers' mlp_ratio 4)."""
        return 4 * self.inner_dim

    @property
    def blocks_after_first(self) -> int:
        """What the first-block cache skips (0: no first block to cache from)."""
        return self.num_layers - 1 + self.num_single_layers if self.num_layers else 0


def rotary_tables(ids: torch.Tensor, axes_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (S, head_dim) of positions `ids` (S, n_axes), each axis its own frequencies.

    As diffusers' FluxPosEmbed: frequencies and angles in float64, each pair of channels sharing
    one angle (repeat-interleaved), returned in float32.
    """
    cos_parts, sin_parts = [], []
    positions = ids.float()
    for axis, dim in enumerate(axes_dims):
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        freqs = 1.0 / (ROPE_THETA**exponent)  # (dim/2,)
        angles = torch.outer(positions[:, axis], freqs)  # (S, dim/2), float64
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (B, heads, S, d) by the angles of its position (cos/sin (S, d))."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class FluxAttention(nn.Module):
    """Multi-head attention with RMS q/k norms and rotary positions; with `has_context`, the text
    stream's own projections attend jointly over [text ; image]."""

    def __init__(self, dim: int, heads: int, head_dim: int, has_context: bool, has_out: bool):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.attention_backend: AttentionBackend = "sdpa"
        # Set by graph_passes.fuse_qkv: one projection per stream for q|k|v.
        self.to_qkv: nn.Linear | None = None
        self.add_qkv: nn.Linear | None = None
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim)]) if has_out else None
        if has_context:
            self.norm_added_q = RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = RMSNorm(head_dim, eps=1e-6)
            self.add_q_proj = nn.Linear(dim, inner_dim)
            self.add_k_proj = nn.Linear(dim, inner_dim)
            self.add_v_proj = nn.Linear(dim, inner_dim)
            self.to_add_out = nn.Linear(inner_dim, dim)

    def _heads(self, x: torch.Tensor, fused: nn.Linear | None, to_q, to_k, to_v, norm_q, norm_k):
        """q, k, v of x (B, N, D) as (B, heads, N, d), q and k RMS-normed per head."""
        query, key, value = fused(x).chunk(3, dim=-1) if fused is not None else (to_q(x), to_k(x), to_v(x))
        query, key, value = (split_heads(t, self.heads) for t in (query, key, value))
        return norm_q(query), norm_k(key), value

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, N, D) [, context (B, T, D)] -> (image out, text out or None)."""
        query, key, value = self._heads(hidden_states, self.to_qkv, self.to_q, self.to_k, self.to_v, self.norm_q,
                                        self.norm_k)  # fmt: skip
        if context is not None:
            c_query, c_key, c_value = self._heads(context, self.add_qkv, self.add_q_proj, self.add_k_proj,
                                                  self.add_v_proj, self.norm_added_q, self.norm_added_k)  # fmt: skip
            query = torch.cat([c_query, query], dim=2)  # text first: (B, heads, T + N, d)
            key = torch.cat([c_key, key], dim=2)
            value = torch.cat([c_value, value], dim=2)
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        out = attend(merge_heads(query), merge_heads(key), merge_heads(value), self.heads, self.attention_backend)
        if self.to_out is None:  # a single-stream block projects after its MLP
            return out, None
        if context is None:
            return self.to_out[0](out), None
        n_text = context.shape[1]
        return self.to_out[0](out[:, n_text:]), self.to_add_out(out[:, :n_text])


class FluxTransformerBlock(nn.Module):
    """A double-stream block: adaLN-Zero modulated joint attention and an MLP per stream."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, head_dim, has_context=True, has_out=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text stream, image stream), both (B, tokens, D)."""
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_out, context_attn_out = self.attn(norm_x, rotary, norm_c)

        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        norm_x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(norm_x)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        norm_c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(norm_c)
        if encoder_hidden_states.dtype == torch.float16:  # as diffusers: keep fp16 finite
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class AdaLayerNormZeroSingle(nn.Module):
    """LayerNorm modulated by the conditioning vector: (normed x, gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


class FluxSingleTransformerBlock(nn.Module):
    """A single-stream block over [text ; image]: attention and a gelu MLP side by side, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int):
        super().__init__()
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, has_context=False, has_out=False)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor, rotary) -> torch.Tensor:
        """tokens (B, T + N, D) -> the same, updated."""
        normed, gate = self.norm(tokens, temb)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        attn_out, _ = self.attn(normed, rotary)
        tokens = tokens + gate[:, None] * self.proj_out(torch.cat([attn_out, mlp], dim=2))
        if tokens.dtype == torch.float16:
            tokens = tokens.clip(-65504, 65504)
        return tokens


class CombinedTimestepGuidanceTextProjEmbeddings(nn.Module):
    """The conditioning vector of FLUX.1-dev: timestep + guidance scale + pooled text embeddings."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.guidance_embedder = TimestepEmbedding(256, embedding_dim)
        self.text_embedder = TextProjection(pooled_projection_dim, embedding_dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        pooled = self.text_embedder(pooled_projection)
        time = self.timestep_embedder(self.time_proj(timestep).to(pooled_projection.dtype))
        scale = self.guidance_embedder(self.time_proj(guidance).to(pooled_projection.dtype))
        return time + scale + pooled


class FluxTransformer2DModel(nn.Module):
    """`forward(hidden_states=, encoder_hidden_states=, pooled_projections=, timestep=, img_ids=, txt_ids=,
    guidance=)` as diffusers: packed latents (B, N, 64) in, the packed velocity out."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        embeddings = CombinedTimestepGuidanceTextProjEmbeddings if config.guidance_embeds else None
        self.time_text_embed = (embeddings or CombinedTimestepTextProjEmbeddings)(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim, config.mlp_dim) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, config.channels_out)

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
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        """hidden_states (B, N, in_channels), encoder_hidden_states (B, T, joint_dim), pooled (B, P),
        timestep (B,) in [0, 1], img_ids (N, 3), txt_ids (T, 3), guidance (B,) on dev."""
        tokens, context, temb, rotary = self._embed(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        for block in self.transformer_blocks:
            context, tokens = block(tokens, context, temb, rotary)
        output = self._project(self._single_blocks(context, tokens, temb, rotary), temb)
        return TransformerOutput(output) if return_dict else (output,)

    def _embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        """Image tokens (B, N, D), text tokens (B, T, D), the conditioning vector (B, D) and the rotary tables."""
        tokens = self.x_embedder(hidden_states)
        temb = self._conditioning(pooled_projections, timestep, guidance, tokens.dtype)
        context = self.context_embedder(encoder_hidden_states)
        rotary = rotary_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)
        return tokens, context, temb, rotary

    def _conditioning(self, pooled_projections, timestep, guidance, dtype: torch.dtype) -> torch.Tensor:
        """The timestep (+ guidance) + pooled text vector (B, D) every block is modulated by."""
        timestep = timestep.to(dtype) * 1000
        if not self.config.guidance_embeds:
            return self.time_text_embed(timestep, pooled_projections)
        if guidance is None:
            raise ValueError("this transformer embeds the guidance scale (guidance_embeds): pass `guidance`")
        return self.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled_projections)

    def _single_blocks(self, context, tokens, temb, rotary) -> torch.Tensor:
        """The single-stream blocks over [text ; image] -> the image tokens (B, N, D)."""
        n_text = context.shape[1]
        joint = torch.cat([context, tokens], dim=1)
        for single in self.single_transformer_blocks:
            joint = single(joint, temb, rotary)
        return joint[:, n_text:]

    def _project(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Final modulation and projection: image tokens (B, N, D) -> packed output (B, N, out_channels)."""
        return self.proj_out(self.norm_out(tokens, temb))

    # -- first-block caching (diffusers' FirstBlockCache on FluxPipeline): the first double-stream
    # -- block alone, the full pass with the tail residual, and the output from the first block's
    # -- image tokens plus a cached tail residual. Tokens stay (B, N, D): N names the image size.

    def first_block(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the image tokens after the first block, that block's residual on them), both (B, N, D)."""
        tokens, context, temb, rotary = self._embed(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        _, first = self.transformer_blocks[0](tokens, context, temb, rotary)
        return first, first - tokens

    def forward_with_tail(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole transformer -> (its packed prediction, the tail residual (B, N, D): what every
        block after the first added to the image tokens, the single-stream ones included)."""
        tokens, context, temb, rotary = self._embed(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        context, tokens = self.transformer_blocks[0](tokens, context, temb, rotary)
        first = tokens
        for block in self.transformer_blocks[1:]:
            context, tokens = block(tokens, context, temb, rotary)
        tokens = self._single_blocks(context, tokens, temb, rotary)
        return self._project(tokens, temb), tokens - first

    def forward_from_cache(
        self, first_block_hidden, tail_residual, pooled_projections, timestep, guidance=None
    ) -> torch.Tensor:
        """The packed prediction from the first block's image tokens plus a cached tail residual,
        every block after the first skipped."""
        temb = self._conditioning(pooled_projections, timestep, guidance, first_block_hidden.dtype)
        return self._project(tail_residual + first_block_hidden, temb)


# -- the pipeline's side: 2x2 latent patches as tokens, and their positions


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens of 2x2 patches, as diffusers' FluxPipeline packs."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents (h, w: the latent size)."""
    batch, _, packed = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed // 4, height, width)


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, D) image tokens of an (h, w) latent -> (B, D, h/2, w/2): the first-block cache
    keeps its tensors as grids, so that its last graph's caller knows the image size."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height // 2, width // 2)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, D, h/2, w/2) -> (B, h/2 * w/2, D)."""
    return grid.flatten(2).transpose(1, 2)


def image_ids(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """The (row, column) positions of the packed tokens of an (h, w) latent: (h/2 * w/2, 3), axis 0 unused."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def text_ids(tokens: int, device: torch.device | None = None) -> torch.Tensor:
    """The text tokens' positions: all zeros, (T, 3)."""
    return torch.zeros(tokens, 3, device=device)


def packed_inputs(
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    guidance: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The transformer's inputs for the loop's (B, C, h, w) latents, by name and in the exported
    graph's order: packed tokens, t / 1000 (as FluxPipeline passes it) and the position ids."""
    height, width = sample.shape[-2:]
    inputs = {
        "hidden_states": pack_latents(sample),
        "encoder_hidden_states": encoder_hidden_states,
        "pooled_projections": pooled_projections,
        "timestep": timestep / 1000,
        "img_ids": image_ids(height, width, sample.device),
        "txt_ids": text_ids(encoder_hidden_states.shape[1], sample.device),
    }
    if guidance is not None:
        inputs["guidance"] = guidance
    return inputs


def cached_inputs(
    first: torch.Tensor,
    tail_residual: torch.Tensor,
    timestep: torch.Tensor,
    pooled_projections: torch.Tensor,
    guidance: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The inputs of `forward_from_cache` (and of its graph, in order) from the loop's grids."""
    inputs = {
        "first_block_hidden": grid_to_tokens(first),
        "tail_residual": grid_to_tokens(tail_residual),
        "pooled_projections": pooled_projections,
        "timestep": timestep / 1000,
    }
    if guidance is not None:
        inputs["guidance"] = guidance
    return inputs
