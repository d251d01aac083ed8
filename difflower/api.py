"""The public Python API: `difflower.load` and friends.

`load(path)` returns a pipeline for whatever the folder holds: a diffusers-format checkpoint
runs the eager reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difflower.errors import ArgumentError, CheckpointError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    scheduler: str | None = None,
    engine: str | None = None,
    threads: int | None = None,
    **engine_options: Any,
) -> Any:
    """The pipeline for whatever `path` holds.

    An artifact folder (with difflower.json) runs its backend's engines (`engine` overrides:
    "onnxruntime", "torch", ...; `engine_options` are that engine's own settings); a
    diffusers-format checkpoint runs the eager reference.
    `scheduler` swaps the scheduler by name (`euler`, `dpm++2m-karras`, ...).
    """
    from difflower.manifest import MANIFEST_NAME
    from difflower.reference.pipeline import load_pipeline

    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        from difflower.runtimes.pipeline import load_artifact

        return load_artifact(
            path, engine=engine, device=str(device), threads=threads, scheduler=scheduler, **engine_options
        )
    if (path / "model_index.json").is_file():
        return load_pipeline(path, dtype=parse_dtype(dtype), device=device, variant=variant, scheduler=scheduler)
    if not path.exists():
        raise CheckpointError(path, "not found")
    raise CheckpointError(path, "holds neither model_index.json (a diffusers checkpoint) nor difflower.json")


def export(model: str | Path, backend: str, out: str | Path, **options: Any):
    """Export a checkpoint to a backend artifact; see difflower.exporters.export."""
    from difflower.exporters import export as _export

    return _export(model, backend, out, **options)
