"""difflower: lower Stable-Diffusion-family models to accelerator backends, with proven parity."""

from difflower.api import export, load, validate
from difflower.errors import ArgumentError, CheckpointError, DifflowerError

__version__ = "0.1.0"

__all__ = ["ArgumentError", "CheckpointError", "DifflowerError", "__version__", "export", "load", "validate"]
