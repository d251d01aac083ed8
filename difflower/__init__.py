"""difflower: lower Stable-Diffusion-family models to accelerator backends, with proven parity."""

from difflower import validate  # the package is callable: difflower.validate(artifact, reference)
from difflower.api import export, load
from difflower.errors import ArgumentError, CheckpointError, DifflowerError

__version__ = "0.1.0"

__all__ = ["ArgumentError", "CheckpointError", "DifflowerError", "__version__", "export", "load", "validate"]
