"""Timestep, text and patch embeddings (diffusers' formulas and key names)."""

from __future__ import annotations

import math

import torch
from torch import nn

from difflower.reference.activations import activation


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) timesteps -> (N, dim) fp32."""
    half_dim = dim // 2
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]  # (N, half_dim)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """Linear-act-linear MLP on a projected timestep (keys `linear_1`, `linear_2`); with
    `cond_proj_dim` (LCM-distilled UNets' `time_cond_proj_dim`) a condition, the guidance scale's
    embedding, is projected (`cond_proj`) and added to the input first."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)
        self.post_act = activation(post_act_fn) if post_act_fn is not None else None
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("a timestep condition was given to an embedding built without time_cond_proj_dim")
            sample = sample + self.cond_proj(condition)  # (B, in_channels)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sinusoidal embedding of guidance scales `w` (B,) -> (B, embedding_dim), as diffusers'
    LatentConsistencyModelPipeline computes it for a guidance-distilled UNet's `timestep_cond`."""
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]  # (B, half_dim)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)  # (B, 2 * half_dim)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))  # (B, embedding_dim)
    return emb


class TextProjection(nn.Module):
    """Pooled-text MLP of SD3 (diffusers' PixArtAlphaTextProjection with SiLU)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """SD3 conditioning vector: timestep MLP + pooled text MLP (keys `timestep_embedder`, `text_embedder`)."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.text_embedder = TextProjection(pooled_projection_dim, embedding_dim)

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        timesteps_emb = self.timestep_embedder(self.time_proj(timestep).to(pooled_projection.dtype))  # (B, D)
        return timesteps_emb + self.text_embedder(pooled_projection)


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) [sin | cos], computed in fp64 as diffusers does."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = torch.outer(positions.reshape(-1).to(torch.float64), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) fp32 2-D sin-cos table for a square grid of patches."""
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # each (G, G); w goes first
    emb_h = sincos_pos_embed_1d(embed_dim // 2, grid_w)  # diffusers' naming: grid[0] is the w grid
    emb_w = sincos_pos_embed_1d(embed_dim // 2, grid_h)
    return torch.cat([emb_h, emb_w], dim=1).float()  # (G*G, D)


class PatchEmbed(nn.Module):
    """SD3 patchify conv plus a centred crop of a (max_size x max_size) positional table."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int, pos_embed_max_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        table = sincos_pos_embed_2d(embed_dim, pos_embed_max_size, base_size=sample_size // patch_size)
        # Persistent, as in diffusers: checkpoints carry it as `pos_embed.pos_embed`.
        self.register_buffer("pos_embed", table.unsqueeze(0))  # (1, max*max, D)

    def cropped_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The centred (height x width) patch window of the table -> (1, height*width, D)."""
        if height > self.pos_embed_max_size or width > self.pos_embed_max_size:
            raise ValueError(f"latent of {height}x{width} patches exceeds pos_embed_max_size {self.pos_embed_max_size}")
        top = (self.pos_embed_max_size - height) // 2
        left = (self.pos_embed_max_size - width) // 2
        size = self.pos_embed_max_size
        table: torch.Tensor = self.pos_embed  # type: ignore[assignment]  # a registered buffer
        spatial = table.reshape(1, size, size, -1)  # (1, max, max, D)
        spatial = spatial[:, top : top + height, left : left + width, :]  # (1, h, w, D)
        return spatial.reshape(1, height * width, spatial.shape[-1])  # (1, h*w, D)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, C, H, W) -> tokens (B, H/p * W/p, D)."""
        height = latent.shape[-2] // self.patch_size
        width = latent.shape[-1] // self.patch_size
        tokens = self.proj(latent).flatten(2).transpose(1, 2)  # (B, h*w, D)
        return (tokens + self.cropped_pos_embed(height, width)).to(tokens.dtype)
