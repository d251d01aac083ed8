"""Residual blocks and the resampling layers of the UNet and the VAE (diffusers' key names)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from difflower.reference.activations import activation

TimeEmbeddingNorm = Literal["default", "scale_shift"]


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, with the time embedding added (or scale/shift) in between."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        act_fn: str = "silu",
        time_embedding_norm: TimeEmbeddingNorm = "default",
        output_scale_factor: float = 1.0,
        skip_time_act: bool = False,
        groups_out: int | None = None,
    ):
        super().__init__()
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            scale_shift = time_embedding_norm == "scale_shift"
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """input_tensor (B, C_in, H, W), temb (B, temb_channels) or None -> (B, C_out, H, W)."""
        # 1. first norm/act/conv
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))

        # 2. time conditioning
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]  # (B, C or 2C, 1, 1)
        else:
            temb = None
        if self.time_embedding_norm == "scale_shift" and temb is not None:
            time_scale, time_shift = temb.chunk(2, dim=1)
            hidden = self.norm2(hidden) * (1 + time_scale) + time_shift
        else:
            if temb is not None:
                hidden = hidden + temb
            hidden = self.norm2(hidden)

        # 3. second act/conv, then the residual
        hidden = self.conv2(self.nonlinearity(hidden))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; padding 0 means diffusers' asymmetric (0, 1, 0, 1) pad (the VAE's)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to an explicit size) followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states)
