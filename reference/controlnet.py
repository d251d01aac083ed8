"""The ControlNet of SD 1.x, SD 2.x and SDXL, written to be exported.

Same state-dict keys and the same `forward(sample, timestep, encoder_hidden_states,
controlnet_cond, conditioning_scale, guess_mode, added_cond_kwargs)` as diffusers'
ControlNetModel: the UNet's embedding, input conv, down path and mid block (shared with our
UNet through `UNetEncoder`), the conditioning image's small conv encoder added after the input
conv, and a zero-initialised 1x1 conv per skip connection and after the mid block.

The residuals are scaled per output by `scales` (`controlnet_scales`): the conditioning scale
for every residual, or in guess mode the conditioning scale times diffusers' log-spaced ramp
from 0.1 (the first skip) to 1.0 (the mid block). The scales are an input of the exported
graph, so one artifact serves every scale, guess mode and control-guidance window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import nn

from difflower.reference.config import require_positive
from difflower.reference.unet_2d_condition import DownBlockType, UNetConfig, UNetEncoder, UpBlockType, skip_shapes

CONTROLNET_CLASS_NAMES = ("ControlNetModel",)
CONTROLNET_IGNORED_FIELDS = frozenset({"addition_embed_type_num_heads", "sample_size", "dropout"})
# diffusers' ControlNet switches that no SD/SDXL ControlNet uses; only the default is accepted.
CONTROLNET_DEFAULT_ONLY_FIELDS = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ControlNetModel config fields that difflower implements."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: Literal["rgb", "bgr"] = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        require_positive(
            self, "in_channels", "conditioning_channels", "block_out_channels", "layers_per_block", "norm_num_groups"
        )
        require_positive(self, "cross_attention_dim", "attention_head_dim", "conditioning_embedding_out_channels")
        self.unet_view()  # the shared checks (per-block lengths, text_time fields)

    @staticmethod
    def from_unet(unet: UNetConfig, latent_channels: int, vae_scale_factor: int) -> ControlNetConfig:
        """The config of a ControlNet for `unet` (diffusers' ControlNetModel.from_unet): the
        UNet's down half, and a conditioning encoder that brings the control image down by
        the VAE's factor."""
        halvings = vae_scale_factor.bit_length() - 1
        layers = unet.per_block("layers_per_block")
        depth = unet.transformer_layers_per_block
        if len(set(layers)) != 1 or not isinstance(unet.cross_attention_dim, int):
            raise ValueError("a ControlNet needs one layers_per_block and one cross_attention_dim for every block")
        if isinstance(depth, tuple) and any(isinstance(d, tuple) for d in depth):
            raise ValueError("a ControlNet needs one transformer depth per block (not per layer)")
        return ControlNetConfig(
            in_channels=latent_channels,
            flip_sin_to_cos=unet.flip_sin_to_cos,
            freq_shift=unet.freq_shift,
            down_block_types=unet.down_block_types,
            only_cross_attention=unet.only_cross_attention,
            block_out_channels=unet.block_out_channels,
            layers_per_block=layers[0],
            downsample_padding=unet.downsample_padding,
            mid_block_scale_factor=unet.mid_block_scale_factor,
            act_fn=unet.act_fn,
            norm_num_groups=unet.norm_num_groups,
            norm_eps=unet.norm_eps,
            cross_attention_dim=unet.cross_attention_dim,
            transformer_layers_per_block=depth,  # type: ignore[arg-type]  # not nested: checked above
            attention_head_dim=unet.attention_head_dim,
            use_linear_projection=unet.use_linear_projection,
            addition_embed_type=unet.addition_embed_type,
            addition_time_embed_dim=unet.addition_time_embed_dim,
            upcast_attention=unet.upcast_attention,
            resnet_time_scale_shift=unet.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=unet.projection_class_embeddings_input_dim,
            conditioning_embedding_out_channels=(16, 32, 96, 256)[: halvings + 1],
        )

    def unet_view(self) -> UNetConfig:
        """The UNet config whose embedding, down path and mid block this ControlNet copies.
        diffusers reads `num_attention_heads` first and falls back on the misnamed
        `attention_head_dim` (which our UNet config holds as the head count)."""
        n = len(self.down_block_types)
        return UNetConfig(
            in_channels=self.in_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            down_block_types=self.down_block_types,
            up_block_types=cast(tuple[UpBlockType, ...], ("UpBlock2D",) * n),  # no up path; only the count is checked
            only_cross_attention=self.only_cross_attention,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor,
            act_fn=self.act_fn,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.num_attention_heads or self.attention_head_dim,
            use_linear_projection=self.use_linear_projection,
            addition_embed_type=self.addition_embed_type,
            addition_time_embed_dim=self.addition_time_embed_dim,
            upcast_attention=self.upcast_attention,
            resnet_time_scale_shift=self.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim,
        )

    @property
    def residual_count(self) -> int:
        """Down-block residuals it produces (one per skip connection of the down path)."""
        return len(skip_shapes(self.unet_view(), 8, 8))


class ControlNetOutput(NamedTuple):
    """diffusers' output: one residual per skip connection of the down path, and the mid block's."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


class ControlNetConditioningEmbedding(nn.Module):
    """The conditioning image's encoder: a conv, then (conv, stride-2 conv) pairs, SiLU after each,
    then a zero-initialised conv to the UNet's first width (keys `conv_in`, `blocks.N`, `conv_out`)."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for channels_in, channels_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(channels_in, channels_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, kernel_size=3, padding=1)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = nn.functional.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = nn.functional.silu(block(embedding))
        return self.conv_out(embedding)


def controlnet_scales(
    count: int, conditioning_scale: float, guess_mode: bool, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(count + 1,) float32: the factor of each down residual, then the mid residual's.

    As diffusers: the conditioning scale everywhere, or in guess mode `logspace(-1, 0)` (0.1 for
    the first skip up to 1.0 for the mid block) times the conditioning scale."""
    if guess_mode:
        return torch.logspace(-1, 0, count + 1, device=device) * conditioning_scale
    return torch.full((count + 1,), float(conditioning_scale), device=device)


class ControlNetModel(UNetEncoder):
    """A ControlNet; `forward` matches diffusers' call, `residuals` is the exported graph."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet_view())
        self.config = config
        channels = config.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        # one zero conv per skip connection, in the order the down path creates them
        widths = [shape[0] for shape in skip_shapes(self.encoder_config, 8, 8)]
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(w, w, kernel_size=1) for w in widths)
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        """sample (B, C, h, w) latents; controlnet_cond (B, 3, H, W) the control image in [0, 1]."""
        guess = guess_mode and not self.config.global_pool_conditions  # diffusers pools without the ramp
        scales = controlnet_scales(len(self.controlnet_down_blocks), conditioning_scale, guess, sample.device)
        out = self.residuals(sample, timestep, encoder_hidden_states, controlnet_cond, scales, added_cond_kwargs)
        down, mid = list(out[:-1]), out[-1]
        return ControlNetOutput(down, mid) if return_dict else (down, mid)

    def residuals(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        scales: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The scaled residuals (down ones in skip order, then the mid one); `scales` (n + 1,)."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = self.embed(sample, timestep, added_cond_kwargs)  # (B, time_embed_dim)
        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, c0, h, w)
        skips = [sample]
        for block in self.down_blocks:
            sample, block_skips = block(sample, emb, encoder_hidden_states)
            skips.extend(block_skips)
        sample = self.mid_block(sample, emb, encoder_hidden_states)
        outputs = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        outputs.append(self.controlnet_mid_block(sample))
        outputs = [residual * scales[i] for i, residual in enumerate(outputs)]
        if self.config.global_pool_conditions:
            outputs = [torch.mean(residual, dim=(2, 3), keepdim=True) for residual in outputs]
        return tuple(outputs)


def controlnet_mismatch(unet: UNetConfig, controlnet: ControlNetConfig, latent_channels: int) -> str | None:
    """Why a ControlNet cannot drive a UNet (None when it fits): its residuals must have the
    shapes of the UNet's skip connections, and it must read the same conditioning."""
    unet_cross = unet.cross_attention_dim if isinstance(unet.cross_attention_dim, int) else unet.cross_attention_dim[0]
    checks: tuple[tuple[str, Any, Any], ...] = (
        (
            "residual widths (block_out_channels, layers_per_block)",
            [shape[0] for shape in skip_shapes(unet, 64, 64)],
            [shape[0] for shape in skip_shapes(controlnet.unet_view(), 64, 64)],
        ),
        ("cross_attention_dim", unet_cross, controlnet.cross_attention_dim),
        ("addition_embed_type", unet.addition_embed_type, controlnet.addition_embed_type),
        ("latent channels (in_channels)", latent_channels, controlnet.in_channels),
    )
    for what, want, got in checks:
        if want != got:
            return f"its {what} is {got}, the UNet's {want}"
    if controlnet.addition_embed_type == "text_time" and (
        unet.projection_class_embeddings_input_dim != controlnet.projection_class_embeddings_input_dim
    ):
        return (
            f"its projection_class_embeddings_input_dim is {controlnet.projection_class_embeddings_input_dim}, "
            f"the UNet's {unet.projection_class_embeddings_input_dim}"
        )
    return None
