"""The public Python API: `difflower.load` and friends.

`load(path)` returns a pipeline for whatever the folder holds: a diffusers-format checkpoint
runs the eager reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difflower.errors import ArgumentError, CheckpointError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Component folders only an exported artifact has (a checkpoint has unet/vae, not these).
_ARTIFACT_FOLDERS = ("vae_decoder", "vae_encoder")


def parse_dtype(value: str | torch.dtype | None, argument: str = "dtype") -> torch.dtype:
    """`fp32` / `fp16` / `bf16` (or a torch dtype) -> torch dtype."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[value]
    except KeyError:
        raise ArgumentError(argument, f"must be one of {', '.join(_DTYPES)}, got {value!r}") from None


def parse_device(value: str | torch.device) -> torch.device:
    """A device this torch can run the eager reference on, or one line saying why not."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ArgumentError("device", f"expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", f"this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ArgumentError("device", f"the eager reference runs on cpu or cuda, not {device.type}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError("device", "this torch has no MPS (Apple GPU) device; use --device cpu")
    return device


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    scheduler: str | None = None,
    engine: str | None = None,
    threads: int | None = None,
    compile: bool = False,
    lora: Sequence[str | Path | tuple[str | Path, float]] | None = None,
    controlnet: Sequence[str | Path] | None = None,
    **engine_options: Any,
) -> Any:
    """The pipeline for whatever `path` holds.

    `path` is a folder, a Hugging Face Hub repo id `org/name[@revision]` (a checkpoint, fetched
    into the Hub cache by difflower.hub) or a single .safetensors checkpoint (converted once, see
    reference.single_file.resolve_model). An artifact folder (with difflower.json) runs its
    backend's engines (`engine` overrides: "onnxruntime", "torch", ...; `engine_options` are that
    engine's own settings); a diffusers-format checkpoint runs the eager reference.
    `scheduler` swaps the scheduler by name (`euler`, `dpm++2m-karras`, ...). `compile` runs a
    checkpoint's denoiser and VAE blocks under torch.compile (regional compilation). `lora` fuses
    LoRA files into a checkpoint's denoiser and text encoders: `FILE`, `FILE:SCALE` or (file, scale).
    `controlnet` (ControlNet folders or Hub repo ids) drive a checkpoint's UNet; an artifact holds
    the ControlNets it was exported with.
    """
    from difflower.artifact.manifest import MANIFEST_NAME
    from difflower.reference.lora import read_loras
    from difflower.reference.pipeline import load_pipeline
    from difflower.reference.single_file import resolve_model

    path, _ = resolve_model(path, variant)
    if (path / MANIFEST_NAME).is_file():
        from difflower.runtimes.pipeline import load_artifact

        if dtype is not None:
            raise ArgumentError("dtype", "an artifact computes in the precision it was exported with; drop --dtype")
        if compile:
            raise ArgumentError("compile", "compiles the eager reference; an artifact is compiled at export (aoti)")
        if controlnet:
            raise ArgumentError(
                "--controlnet", "an artifact holds the ControlNets it was exported with (difflower info lists them)"
            )
        return load_artifact(
            path,
            engine=engine,
            device=str(device),
            threads=threads,
            scheduler=scheduler,
            loras=read_loras(lora),  # through its LoRA slots; refused by one without them
            **engine_options,
        )
    if (path / "model_index.json").is_file():
        found = [name for name in _ARTIFACT_FOLDERS if (path / name).is_dir()]
        if found:
            raise CheckpointError(
                path / MANIFEST_NAME,
                f"missing: this folder looks like a difflower artifact (it has {', '.join(found)}) whose manifest "
                "is gone; re-export it",
            )
        if engine is not None or engine_options:
            raise ArgumentError("--engine", "engines run exported artifacts; a checkpoint runs the eager reference")
        return load_pipeline(
            path,
            dtype=parse_dtype(dtype),
            device=parse_device(device),
            variant=variant,
            scheduler=scheduler,
            compile=compile,
            loras=read_loras(lora),
            controlnets=tuple(controlnet or ()),
        )
    if not path.exists():
        raise CheckpointError(path, "not found")
    raise CheckpointError(path, "holds neither model_index.json (a diffusers checkpoint) nor difflower.json")


def export(model: str | Path, backend: str, out: str | Path, **options: Any):
    """Export a checkpoint to a backend artifact; see difflower.driver.export."""
    from difflower.driver import export as _export

    return _export(model, backend, out, **options)
