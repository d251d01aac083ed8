"""difflower: lower Stable-Diffusion-family models to accelerator backends, with proven parity.

`difflower.load`, `difflower.export` and `difflower.validate` are imported on first use, so
`import difflower` (and the command line's start-up) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from difflower.errors import ArgumentError, CheckpointError, DifflowerError
from difflower.version import __version__

__all__ = ["ArgumentError", "CheckpointError", "DifflowerError", "__version__", "export", "load", "validate"]


def __getattr__(name: str) -> Any:
    if name in ("load", "export"):
        return getattr(importlib.import_module("difflower.api"), name)
    if name == "validate":  # the package is callable: difflower.validate(artifact, reference)
        return importlib.import_module("difflower.validate")
    raise AttributeError(f"module 'difflower' has no attribute {name!r}")
