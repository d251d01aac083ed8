"""The engine interface: one exported component, called with a dict of named arrays.

`engine(inputs) -> outputs` checks names, dtypes and shapes against the manifest before it
calls the backend, so a wrong shape is a clear error naming the component, the tensor and
what the artifact was built for, never a backend crash deep in a graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflower.artifact.manifest import ComponentRecord, TensorSpec
from difflower.artifact.precision import Precision
from difflower.errors import ArgumentError, DifflowerError

Array = np.ndarray | torch.Tensor

_DTYPES = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (None, torch.bfloat16),
    "int64": (np.int64, torch.int64),
    "int32": (np.int32, torch.int32),
}


def refuse_options(backend: str, options: Mapping[str, Any], allowed: tuple[str, ...] = ()) -> None:
    """ArgumentError naming the first engine option (outside `allowed`) the `backend` engine does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ArgumentError(f"--engine-option {unknown[0]}", f"is not an option of the {backend} engine")


def flag_option(value: Any, name: str) -> bool:
    """A boolean engine option, from Python (True) or the command line ("true", "0", ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ArgumentError(f"--engine-option {name}", f"expected true or false, got {value!r}")


class EngineInputError(DifflowerError):
    """Inputs that do not fit what the artifact was built for."""


def dtype_name(x: Array) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return str(x.dtype)


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name][1]


class Engine:
    """Base class: `__call__` checks, `run` executes (backend-specific)."""

    backend = "base"
    # Whether the files this engine opens are programs (checked against the export's sha256 first).
    executes_code = False
    # What the engine computes in when an engine option takes it below the artifact's precision
    # (OpenVINO's inference_precision=bf16); None: the artifact's own. validate judges by it.
    compute_precision: Precision | None = None

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        """Why this engine cannot run on `device` on this machine (one line), or None when it can."""
        return None

    @classmethod
    def export_check_options(cls, record: ComponentRecord, folder: Path) -> dict[str, Any]:
        """The engine options the export's parity check opens a just-written component with."""
        return {}

    def __init__(self, record: ComponentRecord):
        self.record = record
        self.name = record.name

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.record.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.record.outputs

    def __call__(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.check(inputs)
        return self.run(inputs)

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        raise NotImplementedError

    def check(self, inputs: Mapping[str, Array]) -> dict[str, int]:
        """Raise EngineInputError unless `inputs` fit the manifest; returns the symbolic dims' values."""
        expected = {t.name for t in self.inputs}
        if set(inputs) != expected:
            missing, extra = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
            raise EngineInputError(
                f"{self.name}: inputs must be {sorted(expected)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        symbols: dict[str, int] = {}
        for spec in self.inputs:
            value = inputs[spec.name]
            if dtype_name(value) != spec.dtype:
                raise EngineInputError(
                    f"{self.name}: input '{spec.name}' is {dtype_name(value)}, the artifact takes {spec.dtype}"
                )
            shape = tuple(value.shape)
            if len(shape) != len(spec.shape):
                raise EngineInputError(
                    f"{self.name}: input '{spec.name}' has shape {shape}, the artifact takes rank {len(spec.shape)} "
                    f"{tuple(spec.shape)}"
                )
            for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
                if isinstance(want, int) and got != want:
                    raise EngineInputError(
                        f"{self.name}: input '{spec.name}' has shape {shape} but the artifact was built for "
                        f"{tuple(spec.shape)} (axis {axis}); export it for this size (--static) or with dynamic shapes"
                    )
                if isinstance(want, str):
                    if symbols.setdefault(want, got) != got:
                        raise EngineInputError(
                            f"{self.name}: dim '{want}' is {symbols[want]} in one input and {got} in "
                            f"'{spec.name}'; they must agree"
                        )
        return symbols


def to_numpy(x: Array, dtype: str) -> np.ndarray:
    """A contiguous numpy view (zero-copy for contiguous CPU tensors of the right dtype)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch_dtype(dtype)).contiguous().numpy()
    return np.ascontiguousarray(x)


def describe(engine: Engine) -> dict[str, Any]:
    return {"component": engine.name, "backend": engine.backend}
