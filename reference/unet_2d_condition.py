"""The conditional UNet of SD 1.x, SD 2.x and SDXL, written to be exported.

Same state-dict keys and the same `forward(sample, timestep, encoder_hidden_states,
added_cond_kwargs=...)` as diffusers' UNet2DConditionModel, restricted to the block kinds
those families use. No Python branching on tensor values: everything that selects code paths
comes from the config or from static shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

import torch
from torch import nn

from difflower.reference.activations import activation
from difflower.reference.config import require_positive
from difflower.reference.embeddings import TimestepEmbedding, Timesteps
from difflower.reference.unet_blocks import AttentionSpec, BlockSpec, DownBlock, MidBlockCrossAttn, UpBlock

DownBlockType = Literal["CrossAttnDownBlock2D", "DownBlock2D"]
UpBlockType = Literal["CrossAttnUpBlock2D", "UpBlock2D"]

UNET_CLASS_NAMES = ("UNet2DConditionModel",)

# Fields that only matter for training or for block kinds we do not build.
UNET_IGNORED_FIELDS = frozenset(
    {"dropout", "resnet_out_scale_factor", "mid_block_only_cross_attention", "addition_embed_type_num_heads"}
)
# Architecture switches of diffusers' UNet that no SD/SDXL checkpoint uses; only the default is accepted.
UNET_DEFAULT_ONLY_FIELDS = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}


@dataclass(frozen=True)
class UNetConfig:
    """diffusers' UNet2DConditionModel config fields that difflower implements."""

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: Literal["UNetMidBlock2DCrossAttn"] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[UpBlockType, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None
    # diffusers' historical misnomer: this is the number of heads per block, not the head size.
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    resnet_skip_time_act: bool = False
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    # Guidance-distilled UNets (LCM): the width of the guidance-scale embedding added to the time embedding.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        require_positive(
            self,
            "sample_size",
            "in_channels",
            "out_channels",
            "block_out_channels",
            "layers_per_block",
            "norm_num_groups",
            "cross_attention_dim",
            "attention_head_dim",
            "conv_in_kernel",
            "conv_out_kernel",
        )
        n = len(self.down_block_types)
        for name in ("up_block_types", "block_out_channels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"field '{name}' must have {n} entries, like 'down_block_types'")
        for name in (
            "only_cross_attention",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"field '{name}' must be one value or {n} entries, like 'down_block_types'")
        nested = isinstance(self.transformer_layers_per_block, tuple) and any(
            isinstance(v, tuple) for v in self.transformer_layers_per_block
        )
        if nested and self.reverse_transformer_layers_per_block is None:
            raise ValueError(
                "field 'reverse_transformer_layers_per_block' is required when 'transformer_layers_per_block' is nested"
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "addition_embed_type 'text_time' needs 'addition_time_embed_dim' and "
                "'projection_class_embeddings_input_dim'"
            )

    def block_fields(self) -> tuple[tuple, tuple, tuple, tuple, tuple]:
        """Per down block: heads, cross-attention dim, layers, only-cross flag, transformer depth."""
        names = (
            "attention_head_dim",
            "cross_attention_dim",
            "layers_per_block",
            "only_cross_attention",
            "transformer_layers_per_block",
        )
        heads, cross_dims, layers, only_cross, depth = (self.per_block(name) for name in names)
        return heads, cross_dims, layers, only_cross, depth

    def per_block(self, name: str) -> tuple:
        """A per-down-block tuple of a field that may be given as a single value."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)


def skip_shapes(config: UNetConfig, latent_height: int, latent_width: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of every skip connection of the down path, in order: the
    shapes of the ControlNet residuals a UNet (or a ControlNet) of `config` has at a latent size."""
    channels = config.block_out_channels
    layers = config.per_block("layers_per_block")
    shapes = [(channels[0], latent_height, latent_width)]
    h, w = latent_height, latent_width
    pad = 2 * config.downsample_padding or 1  # padding 0 is the asymmetric (0, 1) pad (see Downsample2D)
    for i, width in enumerate(channels):
        shapes += [(width, h, w)] * layers[i]
        if i < len(channels) - 1:  # the stride-2 3x3 conv of every block but the last
            h, w = (h + pad - 3) // 2 + 1, (w + pad - 3) // 2 + 1
            shapes.append((width, h, w))
    return shapes


class UNetOutput(NamedTuple):
    """`.sample` or `[0]`: the denoiser prediction (B, out_channels, H, W)."""

    sample: torch.Tensor


class UNetEncoder(nn.Module):
    """What a UNet and a ControlNet share: the input conv, the time (and SDXL text-time)
    embedding, the down path and the mid block, under diffusers' key names."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.encoder_config = config
        channels = config.block_out_channels
        n_blocks = len(channels)

        # 1. input conv and time embedding
        self.conv_in = nn.Conv2d(
            config.in_channels, channels[0], config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2
        )
        time_embed_dim = config.time_embedding_dim or channels[0] * 4
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(
            channels[0],
            time_embed_dim,
            act_fn=config.act_fn,
            post_act_fn=config.timestep_post_act,
            cond_proj_dim=config.time_cond_proj_dim,
        )
        self.add_time_proj: Timesteps | None
        self.add_embedding: TimestepEmbedding | None
        if config.addition_embed_type == "text_time":
            assert (
                config.addition_time_embed_dim is not None and config.projection_class_embeddings_input_dim is not None
            )
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, time_embed_dim)
        else:
            self.add_time_proj = None
            self.add_embedding = None
        self.time_embed_act = activation(config.time_embedding_act_fn) if config.time_embedding_act_fn else None

        self.block_spec = BlockSpec(
            temb_channels=time_embed_dim,
            groups=config.norm_num_groups,
            eps=config.norm_eps,
            act_fn=config.act_fn,
            time_embedding_norm=config.resnet_time_scale_shift,
            skip_time_act=config.resnet_skip_time_act,
            use_linear_projection=config.use_linear_projection,
            upcast_attention=config.upcast_attention,
        )
        spec = self.block_spec
        heads, cross_dims, layers, only_cross, depth = config.block_fields()

        def attention_spec(block_type: str, i: int, n_layers: int, block_depth: int | tuple[int, ...]):
            if not block_type.startswith("CrossAttn"):
                return None
            per_layer = block_depth if isinstance(block_depth, tuple) else (block_depth,) * n_layers
            return AttentionSpec(heads[i], cross_dims[i], per_layer, only_cross[i])

        # 2. down path
        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(
                DownBlock(
                    spec,
                    in_ch,
                    out_ch,
                    layers[i],
                    add_downsample=i < n_blocks - 1,
                    downsample_padding=config.downsample_padding,
                    attention=attention_spec(block_type, i, layers[i], depth[i]),
                )
            )

        # 3. mid block: one transformer with the last block's depth (its first entry when nested, as diffusers)
        mid_depth = depth[-1] if isinstance(depth[-1], int) else depth[-1][0]
        self.mid_block = MidBlockCrossAttn(
            spec,
            channels[-1],
            config.mid_block_scale_factor,
            AttentionSpec(heads[-1], cross_dims[-1], (mid_depth,), False),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def embed(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The time (and SDXL text-time) embedding every resnet receives: (B, time_embed_dim)."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(sample.shape[0])  # (B,)
        if self.encoder_config.time_cond_proj_dim is not None and timestep_cond is None:
            raise ValueError("this UNet is guidance-distilled (time_cond_proj_dim): pass timestep_cond")
        condition = None if timestep_cond is None else timestep_cond.to(sample.dtype)
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype), condition)  # (B, time_embed_dim)
        if self.add_embedding is not None:
            emb = emb + self._text_time_embedding(added_cond_kwargs, emb.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def _text_time_embedding(
        self, added_cond_kwargs: dict[str, torch.Tensor] | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """SDXL micro-conditioning: pooled text embeds ++ sinusoidal time_ids, through an MLP."""
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError(
                "this UNet has addition_embed_type 'text_time': "
                "pass added_cond_kwargs with 'text_embeds' and 'time_ids'"
            )
        text_embeds = added_cond_kwargs["text_embeds"]
        time_ids = added_cond_kwargs["time_ids"]
        assert self.add_time_proj is not None and self.add_embedding is not None  # built for text_time
        time_embeds = self.add_time_proj(time_ids.flatten())  # (B * 6, addition_time_embed_dim)
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, 6 * addition_time_embed_dim)
        add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(dtype)
        return self.add_embedding(add_embeds)


class UNet2DConditionModel(UNetEncoder):
    """Conditional UNet; `forward` matches diffusers' call and returns `UNetOutput`."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        self.config = config
        channels = config.block_out_channels
        n_blocks = len(channels)
        spec = self.block_spec
        heads, cross_dims, layers, only_cross, depth = config.block_fields()

        # 4. up path, mirror of the down path with one extra resnet per block
        rev_channels = list(reversed(channels))
        rev_heads = list(reversed(heads))
        rev_cross = list(reversed(cross_dims))
        rev_layers = list(reversed(layers))
        rev_only_cross = list(reversed(only_cross))
        rev_depth = (
            list(config.reverse_transformer_layers_per_block)
            if config.reverse_transformer_layers_per_block is not None
            else list(reversed(depth))
        )
        self.up_blocks = nn.ModuleList()
        out_ch = rev_channels[0]
        for i, up_type in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n_blocks - 1)]
            n_layers = rev_layers[i] + 1
            attention = None
            if up_type.startswith("CrossAttn"):
                d = rev_depth[i]
                per_layer = d if isinstance(d, tuple) else (d,) * n_layers
                attention = AttentionSpec(rev_heads[i], rev_cross[i], per_layer, rev_only_cross[i])
            self.up_blocks.append(
                UpBlock(spec, in_ch, prev_ch, out_ch, n_layers, add_upsample=i < n_blocks - 1, attention=attention)
            )

        # 5. output head
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = activation(config.act_fn)
        self.conv_out = nn.Conv2d(
            channels[0], config.out_channels, config.conv_out_kernel, padding=(config.conv_out_kernel - 1) // 2
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        timestep_cond: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> UNetOutput | tuple[torch.Tensor]:
        """sample (B, C, H, W); timestep scalar, (1,) or (B,); encoder_hidden_states (B, T, D).

        SDXL (`addition_embed_type="text_time"`) also needs `added_cond_kwargs` with
        `text_embeds` (B, pooled_dim) and `time_ids` (B, 6); a guidance-distilled UNet
        (`time_cond_proj_dim`) takes the guidance scale's embedding as `timestep_cond` (B, dim).
        A ControlNet's residuals are added, as diffusers adds them, to every skip connection of
        the down path (`down_block_additional_residuals`, one per skip) and to the mid block's
        output (`mid_block_additional_residual`).
        """
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed(sample, timestep, added_cond_kwargs, timestep_cond)
        if down_block_additional_residuals is None and mid_block_additional_residual is None:
            sample, _ = self.run_stages(sample, [], emb, encoder_hidden_states)
            return UNetOutput(sample) if return_dict else (sample,)
        mid = self.stages().index("mid_block")
        sample, skips = self.run_stages(sample, [], emb, encoder_hidden_states, stop=mid)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"got {len(down_block_additional_residuals)} down-block residuals; this UNet has {len(skips)} skips"
                )
            skips = [skip + residual for skip, residual in zip(skips, down_block_additional_residuals, strict=True)]
        sample, skips = self.run_stages(sample, skips, emb, encoder_hidden_states, start=mid, stop=mid + 1)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual
        sample, _ = self.run_stages(sample, skips, emb, encoder_hidden_states, start=mid + 1)
        return UNetOutput(sample) if return_dict else (sample,)

    # -- DeepCache: the full pass that also returns the deep feature, and the shallow pass -----------

    def deepcache_split(self, branch: int) -> tuple[int, int]:
        """DeepCache's skip branch as (down block b, layer l): fresh on a cached step are the down
        path before layer l of block b and the up path from the matching layer on. As DeepCache's
        helper: b = branch // (layers + 1), l = branch % (layers + 1) (3 for every SD/SDXL UNet)."""
        layers = self.config.per_block("layers_per_block")
        per = layers[0] + 1
        if len(set(layers)) != 1 or not 0 <= branch < per * len(self.down_blocks):
            raise ValueError(f"DeepCache branch must be in [0, {per * len(self.down_blocks)}) for this UNet")
        return branch // per, branch % per

    def forward_deepcache(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        branch: int,
        feature: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Without `feature`: the full UNet, and the deep feature DeepCache caches (the hidden state
        entering up block n-1-b at resnet (layers - l)); with it: the shallow path only, fed the
        cached feature (its prediction, None). Same numbers as DeepCache on diffusers' UNet."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed(sample, timestep, added_cond_kwargs, timestep_cond)
        b, layer = self.deepcache_split(branch)
        up = len(self.up_blocks) - 1 - b  # the up block that mirrors down block b
        n = len(cast(nn.ModuleList, self.up_blocks[up].resnets))
        j = n - 1 - layer  # its first fresh resnet on a cached step
        mid = self.stages().index("mid_block")
        if feature is None:  # the full pass: down, mid, the up blocks before `up`, its first j resnets
            hidden, skips = self.run_stages(sample, [], emb, encoder_hidden_states, stop=mid + 1 + up)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[2:]) if skips else None
            block = self.up_blocks[up]
            captured = block(hidden, block_skips[n - j :], emb, encoder_hidden_states, start=0, stop=j) if j else hidden
            deep = captured
            hidden = block(captured, block_skips[: n - j], emb, encoder_hidden_states, upsample_size, start=j)
        else:  # the shallow pass: conv_in, down blocks before b, block b's first `layer` resnets
            deep = None
            hidden, skips = self.run_stages(sample, [], emb, encoder_hidden_states, stop=1 + b)
            down = cast(DownBlock, self.down_blocks[b])
            for i in range(layer):
                hidden = down.resnets[i](hidden, emb)
                if down.attentions is not None:
                    hidden = down.attentions[i](hidden, encoder_hidden_states)
                skips.append(hidden)
            block_skips, skips = skips[-(n - j) :], skips[: -(n - j)]
            upsample_size = tuple(skips[-1].shape[2:]) if skips else None
            hidden = self.up_blocks[up](feature, block_skips, emb, encoder_hidden_states, upsample_size, start=j)
        out, _ = self.run_stages(hidden, skips, emb, encoder_hidden_states, start=mid + 2 + up)
        return out, deep

    def stages(self) -> list[str]:
        """The forward pass after the embedding, in order: `conv_in`, each down block, `mid_block`,
        each up block, `conv_out` (the head). `run_stages` runs any contiguous range of them."""
        downs = [f"down_blocks.{i}" for i in range(len(self.down_blocks))]
        ups = [f"up_blocks.{i}" for i in range(len(self.up_blocks))]
        return ["conv_in", *downs, "mid_block", *ups, "conv_out"]

    def run_stages(
        self,
        sample: torch.Tensor,
        skips: list[torch.Tensor],
        emb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stages `start:stop` of `stages()` from `sample` and the skip connections not yet
        consumed; returns the new sample and the skips still pending."""
        skips = list(skips)
        for name in self.stages()[start:stop]:
            if name == "conv_in":
                sample = self.conv_in(sample)
                skips = [sample]
            elif name.startswith("down_blocks."):
                # the down path keeps every skip connection
                sample, block_skips = self.down_blocks[int(name.rsplit(".", 1)[1])](sample, emb, encoder_hidden_states)
                skips.extend(block_skips)
            elif name == "mid_block":
                sample = self.mid_block(sample, emb, encoder_hidden_states)
            elif name.startswith("up_blocks."):
                # each up block consumes as many skips as it has resnets. Upsampling always goes
                # to the next skip's size (exactly 2x when the latent divides evenly, as diffusers
                # does only for odd sizes), so a traced graph stays valid for every latent size.
                block = self.up_blocks[int(name.rsplit(".", 1)[1])]
                n = len(cast(nn.ModuleList, block.resnets))
                block_skips, skips = skips[-n:], skips[:-n]
                upsample_size = tuple(skips[-1].shape[2:]) if skips else None
                sample = block(sample, block_skips, emb, encoder_hidden_states, upsample_size)
            else:  # the head
                sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        return sample, skips
