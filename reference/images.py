"""Images in and out of the pipeline, as diffusers' VaeImageProcessor does it.

Input images become (B, 3, H, W) float32 tensors in [-1, 1] at a size divisible by the VAE
factor (PIL images are resized with Lanczos, sizes rounded down); masks become (B, 1, H, W)
tensors of exactly 0 or 1 (1 = repaint). Decoded images go back to PIL, numpy or torch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import PIL.Image
import torch

from difflower.errors import ArgumentError

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list
OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")


def _as_list(image: ImageInput, argument: str) -> list:
    if isinstance(image, list):
        if not image:
            raise ArgumentError(argument, "is an empty list")
        return image
    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return [image]
    raise ArgumentError(argument, f"must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of the first image of an input."""
    first = _as_list(image, "image")[0]
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, torch.Tensor):
        return int(first.shape[-2]), int(first.shape[-1])
    return (
        (int(first.shape[-3]), int(first.shape[-2])) if first.ndim >= 3 else (int(first.shape[0]), int(first.shape[1]))
    )


def default_size(image: ImageInput, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """The requested size, or the image's own, rounded down to a multiple of `factor`."""
    image_height, image_width = image_size(image)
    height = image_height if height is None else height
    width = image_width if width is None else width
    return height - height % factor, width - width % factor


def preprocess_image(
    image: ImageInput,
    height: int | None,
    width: int | None,
    factor: int,
    argument: str = "image",
    normalize: bool = True,
) -> torch.Tensor:
    """Images -> (B, 3, H, W) float32 in [-1, 1] (in [0, 1] without `normalize`: ControlNet
    control images), H and W multiples of `factor`.

    PIL images are converted to RGB and resized; numpy arrays (B, H, W, 3) or (H, W, 3) and
    tensors (B, 3, H, W) are taken in [0, 1] (tensors already in [-1, 1] are kept as they are).
    """
    images = _as_list(image, argument)
    height, width = default_size(images, height, width, factor)
    if isinstance(images[0], PIL.Image.Image):
        arrays = [np.array(_resize(img.convert("RGB"), height, width)).astype(np.float32) / 255.0 for img in images]
        tensor = torch.from_numpy(np.stack(arrays, axis=0).transpose(0, 3, 1, 2))  # (B, 3, H, W)
    else:
        tensor = _array_batch(images, channels_last=isinstance(images[0], np.ndarray))
        if tuple(tensor.shape[-2:]) != (height, width):
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear")
    if tensor.shape[1] != 3:
        raise ArgumentError(argument, f"must have 3 colour channels, got {tensor.shape[1]}")
    if not normalize or tensor.min() < 0:
        return tensor.float()  # kept in [0, 1], or already in [-1, 1]
    return 2.0 * tensor.float() - 1.0


def preprocess_mask(mask: ImageInput, height: int, width: int, argument: str = "mask_image") -> torch.Tensor:
    """Masks -> (B, 1, H, W) float32 of 0 (keep) and 1 (repaint), binarised at 0.5."""
    masks = _as_list(mask, argument)
    if isinstance(masks[0], PIL.Image.Image):
        arrays = [np.array(_resize(m.convert("L"), height, width)).astype(np.float32) / 255.0 for m in masks]
        tensor = torch.from_numpy(np.stack(arrays, axis=0)[:, None])  # (B, 1, H, W)
    else:
        tensor = _array_batch(masks, channels_last=isinstance(masks[0], np.ndarray), grayscale=True)
        if tuple(tensor.shape[-2:]) != (height, width):
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear")
    tensor = tensor.float()
    return (tensor >= 0.5).to(torch.float32)


def _resize(image: PIL.Image.Image, height: int, width: int) -> PIL.Image.Image:
    return image.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)


def _array_batch(items: list, channels_last: bool, grayscale: bool = False) -> torch.Tensor:
    tensors = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in items]
    batch = torch.cat(tensors) if tensors[0].ndim == 4 else torch.stack(tensors)
    if grayscale and batch.ndim == 3:
        batch = batch[:, None] if not channels_last else batch[..., None]
    if channels_last:
        batch = batch.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    return batch


def postprocess(image: torch.Tensor, output_type: OutputType) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """Decoded (B, 3, H, W) in [-1, 1] -> PIL images, (B, H, W, 3) float numpy in [0, 1], or the tensor in [0, 1]."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(a) for a in (array * 255).round().astype("uint8")]
