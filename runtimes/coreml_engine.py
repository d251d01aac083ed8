"""Engine `coreml`: a component's `model.mlpackage` run by Core ML (macOS only).

`compute_units` (ALL, CPU_AND_GPU, CPU_ONLY, CPU_AND_NE; CLI `--compute-units`) says where
Core ML may run it. On any other system, opening one is a clear error: conversion, saving,
`difflower info` and the torch-side parity work everywhere, prediction needs a Mac.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from difflower.artifact.formats import COREML_FILE as FILE
from difflower.artifact.formats import coreml_name
from difflower.artifact.manifest import ComponentRecord
from difflower.errors import ArgumentError
from difflower.runtimes.engine import Array, Engine, refuse_options

COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE")


def open_package(path: Path, compute_units: str = "ALL"):
    """The Core ML model at `path`, loaded for prediction on `compute_units`."""
    if compute_units not in COMPUTE_UNITS:
        raise ArgumentError("--compute-units", f"must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    if platform.system() != "Darwin":
        raise ArgumentError(
            "--engine",
            f"Core ML prediction needs macOS (this is {platform.system()}); here coreml artifacts can be "
            "exported, inspected with `difflower info` and checked on the torch side; generate and validate on a Mac",
        )
    import coremltools as ct

    return ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))


class ChunkedModel:
    """A component exported as chained packages (`--chunk-unet`): each package is fed the
    values it names from the component's inputs and the earlier packages' outputs; the last
    package's outputs are the component's."""

    def __init__(self, parts: list[tuple[list[str], Callable[[dict], dict]]]):
        self.parts = parts

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(feeds)
        out: dict[str, np.ndarray] = {}
        for names, predict in self.parts:
            out = predict({n: values[n] for n in names})
            values.update(out)
        return out


def open_component(folder: Path, compute_units: str = "ALL"):
    """A component folder's model: its package, or its chunks chained in order."""
    chunks = sorted(p.parent for p in Path(folder).glob(f"chunk*/{FILE}"))
    if not chunks:
        return open_package(Path(folder) / FILE, compute_units)
    models = [open_package(chunk / FILE, compute_units) for chunk in chunks]
    return ChunkedModel([([i.name for i in m.get_spec().description.input], m.predict) for m in models])


class CoreMLEngine(Engine):
    """One component's ML program behind the engine interface."""

    backend = "coreml"

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if platform.system() != "Darwin":
            return f"Core ML prediction needs macOS (this is {platform.system()}); validate it on a Mac"
        return None

    def __init__(self, record: ComponentRecord, model):
        super().__init__(record)
        self.model = model

    @classmethod
    def open(
        cls, record: ComponentRecord, folder: Path, manifest, device: str = "cpu", threads: int | None = None, **options
    ) -> CoreMLEngine:
        units = str(options.pop("compute_units", "ALL"))
        refuse_options("coreml", options)
        return cls(record, open_component(Path(folder) / record.name, units))

    def run(self, inputs: Mapping[str, Array]) -> dict[str, np.ndarray]:
        feeds = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        feeds = {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds.items()}  # no int64 in Core ML
        out = self.model.predict(feeds)
        return {t.name: np.asarray(out[coreml_name(t.name)], dtype=np.float32) for t in self.outputs}


ENGINE = CoreMLEngine
