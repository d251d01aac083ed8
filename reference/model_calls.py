"""How the one loop reaches the models: the `ModelCalls` protocol.

The eager reference implements it over torch modules (`pipeline.TorchModelCalls`); runtimes
implement it over an artifact's engines. The loop, the latent preparation and the pipeline
see only this.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from difflower.reference.prompts import Conditioning, TextEncoderOutput
from difflower.reference.request import GenerateRequest


class Residuals(NamedTuple):
    """ControlNet residuals for the UNet: one per skip connection of its down path, and the mid block's."""

    down: list[torch.Tensor]
    mid: torch.Tensor


class ModelCalls(Protocol):
    """How the loop reaches the models; the reference uses torch modules, runtimes use engines."""

    def has_component(self, name: str) -> bool: ...

    def prepare_run(self, request: GenerateRequest) -> None:
        """Raise before any work when this request cannot be served (a static shape, a missing component)."""
        ...

    def text_encoder(self, name: str, input_ids: torch.Tensor) -> TextEncoderOutput: ...

    def denoiser(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, residuals: Residuals | None = None
    ) -> torch.Tensor:
        """The model prediction for `sample` (B, C, h, w) at `timestep` (B,), with ControlNet
        `residuals` added to the UNet's skip connections when given."""
        ...

    def denoiser_deepcache(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        branch: int,
        feature: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DeepCache: without `feature` the whole UNet and the deep feature of skip `branch`;
        with it the shallow path only (the prediction, None)."""
        ...

    def first_block(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First-block cache: the transformer's first block alone -> (the image tokens after it,
        its residual), each (B, D, h, w)."""
        ...

    def denoiser_with_tail(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First-block cache: the whole transformer -> (its prediction, the tail residual (B, D, h, w)
        the blocks after the first added)."""
        ...

    def denoiser_from_cache(
        self, first: torch.Tensor, tail_residual: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """First-block cache: the prediction from the first block's tokens plus a cached tail residual."""
        ...

    def controlnet(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        image: torch.Tensor,
        conditioning_scale: float,
        guess_mode: bool,
    ) -> Residuals:
        """ControlNet `name`'s scaled residuals for `sample` (B, C, h, w) and its control image
        (B, 3, H, W) in [0, 1]."""
        ...

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2C, h, w)."""
        ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        ...
