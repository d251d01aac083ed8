"""How much memory a request's activations need, estimated before any work.

A 100000x100000 request used to allocate for minutes and die out of memory; a 4096x4096 one
on the tiny model climbed for minutes without a word. The estimate here is a bound from the
sizes of the largest live activations, measured on the reference modules (fp32, CPU):

- the VAE decoder holds, at full resolution, tensors of its widest full-resolution channel
  count; its peak was 3.4 such tensors (tiny SD VAE at 1024 and 2048 px: 0.46 and 1.82 GiB
  over the weights); counted as 4;
- the denoiser holds its first block's width at latent resolution for the CFG-doubled batch,
  plus attention over those tokens; its peak was about 28 such tensors (tiny SD UNet at
  2048 px, batch 2: 0.47 GiB); counted as 32.

The estimate is compared with the memory available when the run starts; a request over it is
refused naming the size and the estimate (`check_memory=False`, `--no-memory-check`, forces
it), and one far past the model's native size gets a warning that it will be slow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from difflower.errors import ArgumentError
from difflower.machine import memory_available_bytes
from difflower.reference.request import GenerateRequest
from difflower.reference.spec import PipelineSpec

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4  # activations are estimated in fp32, the widest the loop computes in
VAE_LIVE_TENSORS = 4
DENOISER_LIVE_TENSORS = 32
# A request this many times the model's native pixel count gets a "this will be slow" warning.
SLOW_FACTOR = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the largest stage of a request needs beyond the weights."""

    vae_decoder: int
    denoiser: int

    @property
    def peak(self) -> int:
        return max(self.vae_decoder, self.denoiser)


def estimate(spec: PipelineSpec, request: GenerateRequest) -> MemoryEstimate | None:
    """The request's activation bound, or None when the spec lacks the widths (older manifests)."""
    if spec.vae_full_resolution_channels is None or spec.denoiser_channels is None:
        return None
    pixels = request.height * request.width
    vae = request.batch * pixels * spec.vae_full_resolution_channels * FLOAT_BYTES * VAE_LIVE_TENSORS
    latent_pixels = pixels // spec.vae_scale_factor**2
    denoiser_batch = request.batch * (2 if request.do_cfg else 1)
    denoiser = denoiser_batch * latent_pixels * spec.denoiser_channels * FLOAT_BYTES * DENOISER_LIVE_TENSORS
    return MemoryEstimate(vae, denoiser)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def check_memory(spec: PipelineSpec, request: GenerateRequest, available: int | None = None) -> MemoryEstimate | None:
    """Refuse a request whose estimate exceeds the available memory; warn about a slow one."""
    bound = estimate(spec, request)
    if bound is None:
        return None
    available = memory_available_bytes() if available is None else available
    size = f"{request.batch}x{request.height}x{request.width}"
    stage = "VAE decoder" if bound.vae_decoder >= bound.denoiser else "denoiser"
    if available is not None and bound.peak > available:
        raise ArgumentError(
            "height",
            f"{size} (images x height x width) needs about {_gib(bound.peak)} for the {stage}'s activations, "
            f"and {_gib(available)} is available; choose a smaller size (--no-memory-check runs it anyway)",
        )
    native = spec.native_size**2
    if request.height * request.width > SLOW_FACTOR * native:
        logger.warning(
            "%s is %.0fx the %dx%d pixels this model was made for: expect a slow run (about %s for the %s)",
            size,
            request.height * request.width / native,
            spec.native_size,
            spec.native_size,
            _gib(bound.peak),
            stage,
        )
    return bound
