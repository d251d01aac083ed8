"""difflower.exporters: one backend per file, each writing its components' files.

A backend `B` lives in `difflower.exporters.<B>` and names its `BackendExporter` class
`EXPORTER`; `exporters.common` does what the backends share. The export itself (the atomic
folder, parity through the runtime engine, the manifest) is `difflower.driver.export`.
"""

from __future__ import annotations

import importlib
import importlib.util

from difflower.errors import ArgumentError

# Every backend of the design; a module that is absent is a backend not built yet.
BACKENDS: tuple[str, ...] = ("onnx", "openvino", "torchscript", "neuron", "coreml", "tensorrt", "aoti")
# The pip extra that brings each backend's library.
EXTRAS = {"onnx": "onnx", "openvino": "openvino", "coreml": "coreml", "tensorrt": "tensorrt", "neuron": "neuron"}


def available_backends() -> tuple[str, ...]:
    """The backends this difflower has an exporter module for."""
    return tuple(b for b in BACKENDS if importlib.util.find_spec(f"difflower.exporters.{b}") is not None)


def get_exporter(backend: str):
    """The BackendExporter of `backend`, or one clear line saying why there is none."""
    if backend not in available_backends():
        raise ArgumentError(
            "--backend", f"{backend!r} is not available; this difflower exports to {available_backends()}"
        )
    try:
        module = importlib.import_module(f"difflower.exporters.{backend}")
    except ModuleNotFoundError as err:
        extra = EXTRAS.get(backend, backend)
        raise ArgumentError(
            "--backend", f"{backend} needs the {err.name!r} package: pip install 'difflower[{extra}]'"
        ) from None
    return module.EXPORTER()
