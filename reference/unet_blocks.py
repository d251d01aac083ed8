"""The UNet's building blocks: the spatial transformer and the down, mid and up blocks.

Module names follow diffusers (`resnets`, `attentions`, `downsamplers`, `transformer_blocks`,
...) so a diffusers state dict loads unchanged. Unlike diffusers there is one class per block
kind used by the SD 1.x / 2.x / XL UNets, and no processors, LoRA scales or checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from difflower.reference.attention import Attention, apply_linear, feature_dim
from difflower.reference.resnet import Downsample2D, ResnetBlock2D, TimeEmbeddingNorm, Upsample2D

# How a spatial transformer's blocks hold their tokens: (B, HW, C), or (B, C, 1, HW) for the Neural Engine.
Layout = Literal["tokens", "channels"]


@dataclass(frozen=True)
class BlockSpec:
    """What every resnet/attention in one UNet block shares (derived from the UNet config)."""

    temb_channels: int
    groups: int
    eps: float
    act_fn: str
    time_embedding_norm: TimeEmbeddingNorm
    skip_time_act: bool
    use_linear_projection: bool
    upcast_attention: bool


class GEGLU(nn.Module):
    """Linear to 2x width, then value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = apply_linear(self.proj, hidden_states).chunk(2, dim=feature_dim(hidden_states))
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with diffusers' keys `net.0.proj` and `net.2` (their `net.1` is a Dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        geglu, _, out = self.net
        return apply_linear(cast(nn.Linear, out), geglu(hidden_states))


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` over the channels of (B, N, C) tokens, or of (B, C, 1, N) (axis 1, as Apple's
    LayerNormANE: the Neural Engine layout keeps channels off the last axis)."""
    if x.ndim == 3:
        return norm(x)
    mean = x.mean(dim=1, keepdim=True)
    centered = x - mean
    variance = centered.pow(2).mean(dim=1, keepdim=True)
    out = centered * torch.rsqrt(variance + norm.eps)
    return out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        cross_attention_dim: int,
        only_cross_attention: bool,
        upcast_attention: bool,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            dim,
            heads,
            head_dim,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None,
            upcast=upcast_attention,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim=cross_attention_dim, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, HW, dim), encoder_hidden_states (B, T, cross_dim); or both
        channels-first, (B, dim, 1, HW) and (B, cross_dim, 1, T) (the Neural Engine layout)."""
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = hidden_states + self.attn1(layer_norm(self.norm1, hidden_states), context)
        hidden_states = hidden_states + self.attn2(layer_norm(self.norm2, hidden_states), encoder_hidden_states)
        return hidden_states + self.ff(layer_norm(self.norm3, hidden_states))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks, project out, residual.

    The projections are 1x1 convolutions (SD 1.x) or linears (`use_linear_projection`, SD 2.x/XL).
    `layout` is "tokens" (the blocks see (B, HW, C), as diffusers) or "channels" (the blocks see
    (B, C, 1, HW) and apply every Linear as a 1x1 convolution: the Neural Engine layout of Apple's
    ml-stable-diffusion, set by graph_passes.ane_layout; same weights, same function).
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        only_cross_attention: bool,
        upcast_attention: bool,
    ):
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.layout: Layout = "tokens"
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.proj_in: nn.Linear | nn.Conv2d
        self.proj_out: nn.Linear | nn.Conv2d
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, heads, head_dim, cross_attention_dim, only_cross_attention, upcast_attention
            )
            for _ in range(num_layers)
        )

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, C, H, W) -> (B, C, H, W)."""
        if self.layout == "channels":
            return self._forward_channels(hidden_states, encoder_hidden_states)
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim)  # (B, HW, C)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states.contiguous())
        return hidden_states + residual

    def _forward_channels(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The same with the blocks on (B, C, 1, HW): no token transposes anywhere."""
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        hidden_states = hidden_states.reshape(batch, hidden_states.shape[1], 1, height * width)  # (B, C, 1, HW)
        context = encoder_hidden_states.transpose(1, 2).unsqueeze(2)  # (B, cross_dim, 1, T)
        if self.use_linear_projection:
            hidden_states = apply_linear(cast(nn.Linear, self.proj_in), hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, context)
        if self.use_linear_projection:
            hidden_states = apply_linear(cast(nn.Linear, self.proj_out), hidden_states)
        hidden_states = hidden_states.reshape(batch, -1, height, width)  # (B, C, H, W)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual


def _resnet(spec: BlockSpec, in_channels: int, out_channels: int, output_scale_factor: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels,
        out_channels,
        spec.temb_channels,
        groups=spec.groups,
        eps=spec.eps,
        act_fn=spec.act_fn,
        time_embedding_norm=spec.time_embedding_norm,
        output_scale_factor=output_scale_factor,
        skip_time_act=spec.skip_time_act,
    )


@dataclass(frozen=True)
class AttentionSpec:
    """The cross-attention settings of one block (None for blocks without attention)."""

    heads: int
    cross_attention_dim: int
    layers: tuple[int, ...]  # transformer depth per resnet
    only_cross_attention: bool


def _transformer(
    spec: BlockSpec, channels: int, heads: int, num_layers: int, cross_attention_dim: int, only_cross: bool
) -> Transformer2DModel:
    return Transformer2DModel(
        heads,
        channels // heads,
        channels,
        num_layers,
        cross_attention_dim,
        spec.groups,
        spec.use_linear_projection,
        only_cross,
        spec.upcast_attention,
    )


def _transformers(spec: BlockSpec, channels: int, attention: AttentionSpec) -> nn.ModuleList:
    """One spatial transformer per resnet of a block, with that resnet's depth."""
    return nn.ModuleList(
        _transformer(
            spec, channels, attention.heads, depth, attention.cross_attention_dim, attention.only_cross_attention
        )
        for depth in attention.layers
    )


class DownBlock(nn.Module):
    """resnets (each optionally followed by a spatial transformer), then an optional stride-2 conv.

    With `attention` this is diffusers' CrossAttnDownBlock2D, without it DownBlock2D.
    """

    def __init__(
        self,
        spec: BlockSpec,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_downsample: bool,
        downsample_padding: int,
        attention: AttentionSpec | None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(spec, in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)
        )
        self.attentions = _transformers(spec, out_channels, attention) if attention is not None else None
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)]) if add_downsample else None
        )

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (output, skip connections for the up path in order of creation)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class MidBlockCrossAttn(nn.Module):
    """resnet, then (spatial transformer, resnet) pairs: diffusers' UNetMidBlock2DCrossAttn."""

    def __init__(self, spec: BlockSpec, channels: int, output_scale_factor: float, attention: AttentionSpec):
        super().__init__()
        num_layers = len(attention.layers)
        self.resnets = nn.ModuleList(
            _resnet(spec, channels, channels, output_scale_factor) for _ in range(num_layers + 1)
        )
        self.attentions = _transformers(spec, channels, attention)

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = resnet(attn(hidden_states, encoder_hidden_states), temb)
        return hidden_states


class UpBlock(nn.Module):
    """resnets on (input ++ skip connection), each optionally followed by a spatial transformer,
    then an optional 2x upsample. With `attention` this is CrossAttnUpBlock2D, without it UpBlock2D."""

    def __init__(
        self,
        spec: BlockSpec,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        num_layers: int,
        add_upsample: bool,
        attention: AttentionSpec | None,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(_resnet(spec, resnet_in + skip_channels, out_channels))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _transformers(spec, out_channels, attention) if attention is not None else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Resnets `start:stop` (all, then the upsampler, by default); `skips` holds exactly their
        skip connections, consumed last-first. A partial run (DeepCache's split) upsamples only
        when it runs the last resnet."""
        stop = len(self.resnets) if stop is None else stop
        for i in range(start, stop):
            hidden_states = torch.cat([hidden_states, skips[-1 - (i - start)]], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = self.resnets[i](hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states)
        if self.upsamplers is not None and stop == len(self.resnets):
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states
