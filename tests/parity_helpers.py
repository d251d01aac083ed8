"""Helpers shared by the backend test modules."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from difflower.validate.metrics import compare


def assert_run_matches(eager, artifact, seed: int = 11, **kwargs):
    """Same seed through both pipelines: final latents within DESIGN's fp32 trajectory gate
    (|a - e| <= 1e-4 + 1e-2 |e|) and image PSNR >= 40 dB; returns both outputs."""
    a = artifact(generator=torch.Generator().manual_seed(seed), output_type="np", return_trajectory=True, **kwargs)
    e = eager(generator=torch.Generator().manual_seed(seed), output_type="np", return_trajectory=True, **kwargs)
    torch.testing.assert_close(a.trajectory[-1], e.trajectory[-1], atol=1e-4, rtol=1e-2)
    psnr = compare(a.images, e.images).psnr
    assert psnr is None or psnr >= 40
    return a, e


def diffusers_run(pipe, prompt: str, steps: int, **kwargs):
    """A diffusers pipeline's images (np) and the latents after every step."""
    pipe.set_progress_bar_config(disable=True)
    latents = []

    def capture(_pipe, _i, _t, tensors):
        latents.append(tensors["latents"].clone())
        return tensors

    out = pipe(prompt, num_inference_steps=steps, callback_on_step_end=capture, output_type="np", **kwargs)
    return out.images, latents


def ours_run(pipe, prompt: str, steps: int, **kwargs):
    """Our pipeline's run with its trajectory, in the form diffusers_run returns."""
    return pipe(prompt, num_inference_steps=steps, output_type="np", return_trajectory=True, progress=False, **kwargs)


def assert_same_as_diffusers(ours, images, latents):
    """Latents after every step within 1e-4 of diffusers', images within 1e-3 (DESIGN's gates)."""
    assert len(ours.trajectory) == len(latents) > 0
    for a, e in zip(ours.trajectory, latents, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=0)
    assert np.abs(ours.images - images).max() <= 1e-3


def sample_image(h: int = 64, w: int = 64) -> PIL.Image.Image:
    """A deterministic colourful picture for img2img and inpainting."""
    y, x = np.mgrid[0:h, 0:w]
    return PIL.Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def sample_mask(h: int = 64, w: int = 64) -> PIL.Image.Image:
    """Repaint the right half."""
    m = np.zeros((h, w), np.uint8)
    m[:, w // 2 :] = 255
    return PIL.Image.fromarray(m)
