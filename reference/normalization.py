"""Normalization layers of the SD3 MMDiT (adaptive layer norms, RMS norm), diffusers' key names."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim; the mean square is taken in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Upcast the mean square: fp16 squares of activations overflow.
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states * torch.rsqrt(variance + self.eps)
        return normed.to(self.weight.dtype) * self.weight


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: LayerNorm modulated by 6 vectors from the conditioning embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, N, D), emb (B, D) -> (modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class SD35AdaLayerNormZeroX(nn.Module):
    """SD3.5 adaLN-Zero with a second modulation for the dual (self-only) attention branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 9 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2)."""
        chunks = self.linear(self.silu(emb)).chunk(9, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = chunks
        normed = self.norm(x)
        x = normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x2 = normed * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm (no affine) scaled and shifted by a projection of a conditioning vector."""

    def __init__(self, dim: int, conditioning_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), conditioning (B, C) -> (B, N, D)."""
        scale, shift = self.linear(self.silu(conditioning).to(x.dtype)).chunk(2, dim=1)  # each (B, D)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
