"""ControlNet conditioning in the one loop, as diffusers' ControlNet pipelines do it.

`ControlInputs` is the checked control part of a request: one control image per ControlNet,
each ControlNet's conditioning scale and guidance window, and guess mode. `prepare_control`
turns the images into the (B or 2B, 3, H, W) tensors in [0, 1] the ControlNets read; the loop's
`ControlRun` calls the ControlNets each step.

ControlNets are components named as diffusers' MultiControlNetModel saves them: `controlnet`,
`controlnet_1`, `controlnet_2`, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import PIL.Image
import torch

from difflower.errors import ArgumentError
from difflower.reference.images import ImageInput, image_size, preprocess_image
from difflower.reference.prompts import finite


def controlnet_name(index: int) -> str:
    """The component name of the `index`-th ControlNet (diffusers' MultiControlNetModel folders)."""
    return "controlnet" if index == 0 else f"controlnet_{index}"


def controlnet_names(has_component: Any) -> list[str]:
    """The ControlNet components present, in order (`has_component(name) -> bool`)."""
    names: list[str] = []
    while has_component(controlnet_name(len(names))):
        names.append(controlnet_name(len(names)))
    return names


@dataclass(frozen=True)
class ControlInputs:
    """The control part of a request, checked: per ControlNet its image, scale and window."""

    images: tuple[ImageInput, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool

    @staticmethod
    def build(
        count: int,
        control_image: ImageInput | Sequence[ImageInput] | None,
        conditioning_scale: float | Sequence[float] | None,
        guess_mode: bool,
        start: float | Sequence[float],
        end: float | Sequence[float],
        default_scale: float,
    ) -> ControlInputs | None:
        """None without ControlNets; every mismatch refused in one line naming the argument."""
        if count == 0:
            for name, value in (
                ("control_image", control_image),
                ("controlnet_conditioning_scale", conditioning_scale),
            ):
                if value is not None:
                    raise ArgumentError(name, "this pipeline has no ControlNet; load or export it with one")
            if guess_mode:
                raise ArgumentError("guess_mode", "this pipeline has no ControlNet; load or export it with one")
            return None
        if control_image is None:
            what = "a control image" if count == 1 else f"{count} control images, one per ControlNet"
            raise ArgumentError("control_image", f"this pipeline has {count} ControlNet(s): pass {what}")
        if count == 1:
            images: tuple[ImageInput, ...] = (cast(ImageInput, control_image),)  # a list: a batch of images
        else:
            if not isinstance(control_image, (list, tuple)) or len(control_image) != count:
                raise ArgumentError(
                    "control_image",
                    f"this pipeline has {count} ControlNets: give {count} control images, one each, in order",
                )
            images = tuple(control_image)
        if not isinstance(guess_mode, bool):
            raise ArgumentError("guess_mode", f"must be True or False, got {guess_mode!r}")
        scales = _per_net(default_scale if conditioning_scale is None else conditioning_scale, count, "scale")
        starts = _per_net(start, count, "start")
        ends = _per_net(end, count, "end")
        for s, e in zip(starts, ends, strict=True):
            if not 0.0 <= s < e <= 1.0:
                argument = "control_guidance_start" if not 0.0 <= s < 1.0 else "control_guidance_end"
                raise ArgumentError(argument, f"start {s} and end {e}: need 0 <= start < end <= 1 for every ControlNet")
        return ControlInputs(images, scales, starts, ends, guess_mode)

    def size(self, factor: int) -> tuple[int, int]:
        """The first control image's size rounded down to `factor`: the default image size."""
        first = self.images[0]
        height, width = image_size(first[0] if isinstance(first, (list, tuple)) else first)
        return height - height % factor, width - width % factor


def _per_net(value: float | Sequence[float], count: int, what: str) -> tuple[float, ...]:
    """One float per ControlNet: a single value is shared, a list must have one per net."""
    argument = "controlnet_conditioning_scale" if what == "scale" else f"control_guidance_{what}"
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            wanted = "one value" if count == 1 else f"one value, or {count}: one per ControlNet"
            raise ArgumentError(argument, f"has {len(value)} values for {count} ControlNet(s); give {wanted}")
        return tuple(finite(v, argument) for v in value)
    return (finite(cast(float, value), argument),) * count


def prepare_control(
    control: ControlInputs,
    height: int,
    width: int,
    batch: int,
    images_per_prompt: int,
    duplicate_for_cfg: bool,
    factor: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Per ControlNet, its image as (B or 2B, 3, H, W) in [0, 1] (diffusers' prepare_image):
    resized, one image repeated for the whole batch (several: each for its prompt's images),
    and doubled for classifier-free guidance unless in guess mode."""
    prepared = []
    for k, image in enumerate(control.images):
        argument = "control_image" if len(control.images) == 1 else f"control_image[{k}]"
        pixels = preprocess_image(image, height, width, factor, argument=argument, normalize=False)
        if pixels.shape[0] not in (1, batch // images_per_prompt, batch):
            raise ArgumentError(argument, f"has {pixels.shape[0]} images for {batch} to make; give 1 or one per prompt")
        pixels = pixels.repeat_interleave(batch if pixels.shape[0] == 1 else images_per_prompt, dim=0)
        if duplicate_for_cfg:
            pixels = torch.cat([pixels] * 2)
        prepared.append(pixels.to(device, dtype))
    return prepared


def edge_pattern(height: int, width: int, count: int = 1) -> PIL.Image.Image | list[PIL.Image.Image]:
    """Deterministic control images (white edges on black: a grid and a diagonal) that
    `validate` and `bench` feed an artifact's ControlNets: one image for one ControlNet, a list
    of different ones for several."""
    images = []
    y, x = np.mgrid[0:height, 0:width]
    for k in range(count):
        period = 8 * (k + 2)
        edges = ((x % period) < 2) | ((y % (period + 4)) < 2) | (np.abs(x - y) < 2)
        images.append(PIL.Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB"))
    return images[0] if count == 1 else images
