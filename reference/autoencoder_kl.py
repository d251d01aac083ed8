"""The KL autoencoder (VAE) of the SD families, with diffusers' state-dict keys.

`encode(x)` returns the distribution parameters (mean ++ logvar, what an exporter wants as a
plain tensor) wrapped so that `.latent_dist.sample(generator)` works as in diffusers;
`decode(z)` returns the image. `scaling_factor` / `shift_factor` are the pipeline's business
(latents = (mean - shift) * scale) and are exposed on the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from difflower.reference.attention import AttentionBackend, attend
from difflower.reference.config import require_positive
from difflower.reference.resnet import Downsample2D, ResnetBlock2D, Upsample2D

VAE_CLASS_NAMES = ("AutoencoderKL",)
VAE_IGNORED_FIELDS = frozenset({"sample_size"})
VAE_DEFAULT_ONLY_FIELDS: dict[str, object] = {}


@dataclass(frozen=True)
class VAEConfig:
    """diffusers' AutoencoderKL config fields."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[Literal["DownEncoderBlock2D"], ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[Literal["UpDecoderBlock2D"], ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # Per-channel latent statistics some SDXL-style VAEs normalise with instead of a plain scale.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # The VAE overflows in fp16 (SDXL's notably): keep it in fp32 when fp16 is asked for.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        require_positive(
            self,
            "in_channels",
            "out_channels",
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "norm_num_groups",
        )
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"field '{name}' must have {n} entries, like 'block_out_channels'")

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (8 for every SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels with GroupNorm and a residual (the VAE mid block's)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.attention_backend: AttentionBackend = "sdpa"
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = self.group_norm(hidden_states)
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(hidden_states), self.to_k(hidden_states), self.to_v(hidden_states)
        out = self.to_out[0](attend(q, k, v, 1, self.attention_backend))  # (B, HW, C)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return out + residual


class VAEMidBlock(nn.Module):
    """resnet, (attention, resnet): diffusers' UNetMidBlock2D without time embedding."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, None, groups=groups, eps=1e-6, act_fn=act_fn) for _ in range(2)
        )
        self.attentions = nn.ModuleList([VAEAttention(channels, groups, eps=1e-6)]) if add_attention else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, None)
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        return self.resnets[1](hidden_states, None)


class EncoderBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: resnets, then an optional stride-2 conv (asymmetric pad)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, downsample: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6, act_fn)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class DecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: resnets, then an optional 2x upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6, act_fn)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2 * latent_channels, H/f, W/f) before quant_conv."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block,
                groups,
                config.act_fn,
                downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.mid_block = VAEMidBlock(channels[-1], groups, config.act_fn, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) after post_quant_conv -> image (B, 3, h*f, w*f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        rev_channels = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, rev_channels[0], kernel_size=3, padding=1)
        self.mid_block = VAEMidBlock(rev_channels[0], groups, config.act_fn, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                rev_channels[max(i - 1, 0)],
                rev_channels[i],
                config.layers_per_block + 1,
                groups,
                config.act_fn,
                upsample=i < len(rev_channels) - 1,
            )
            for i in range(len(rev_channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, rev_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev_channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) described by the encoder's moments (B, 2C, h, w)."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn on the generator's device as diffusers' randn_tensor does."""
        device = generator.device if generator is not None else self.parameters.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise.to(self.parameters.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class EncoderOutput(NamedTuple):
    """`[0]` / `.latent_parameters`: the moments tensor; `.latent_dist`: the distribution over it."""

    latent_parameters: torch.Tensor

    @property
    def latent_dist(self) -> DiagonalGaussian:
        return DiagonalGaussian(self.latent_parameters)


class DecoderOutput(NamedTuple):
    """`[0]` / `.sample`: the decoded image in [-1, 1] (B, 3, H, W)."""

    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    """Encoder, decoder and the 1x1 quant convs; `encode` / `decode` as in diffusers."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple[torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> distribution parameters (B, 2 * latent_channels, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return EncoderOutput(moments) if return_dict else (moments,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents (B, latent_channels, h, w), already unscaled -> image (B, 3, h*f, w*f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)
        return DecoderOutput(image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """Reconstruct an image through the posterior mode (diffusers' default forward)."""
        posterior = self.encode(sample, return_dict=True)
        assert isinstance(posterior, EncoderOutput)
        decoded = self.decode(posterior.latent_dist.mode(), return_dict=True)
        assert isinstance(decoded, DecoderOutput)
        return decoded.sample
