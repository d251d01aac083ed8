"""difflower.exporters: one backend per file, each writing an artifact folder with difflower.json.

A backend `B` lives in `difflower.exporters.<B>` and names its `BackendExporter` class
`EXPORTER`; `exporters.common.run_export` does everything the backends share.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difflower.errors import ArgumentError

# Every backend of the design; a module that is absent is a backend not built yet.
BACKENDS: tuple[str, ...] = ("onnx", "openvino", "torchscript", "neuron", "coreml", "tensorrt")
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


def export(
    model: str | Path,
    backend: str,
    out: str | Path,
    *,
    components: Sequence[str] | None = None,
    static: Sequence[Any] = (),
    precision: str | None = None,
    attention: str = "sdpa",
    fuse_qkv: bool = False,
    cfg: bool = True,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **backend_options: Any,
):
    """Export checkpoint `model` to `backend` at `out`; returns the Manifest written.

    `precision` defaults to the backend's own default (fp32; fp16 for coreml).
    `backend_options` are the backend's own settings (e.g. `quantize` for openvino); a backend
    refuses the ones it does not know.
    """
    from difflower.exporters.common import ExportOptions, parse_buckets, run_export

    exporter = get_exporter(backend)
    precision = precision or getattr(exporter, "default_precision", "fp32")
    options = ExportOptions(
        components=tuple(components or ()),
        buckets=parse_buckets(static),
        precision=precision,
        attention=attention,
        fuse_qkv=fuse_qkv,
        cfg=cfg,
        allow_mismatch=allow_mismatch,
        overwrite=overwrite,
        progress=progress,
        extra={k: v for k, v in backend_options.items() if v is not None},
    )
    return run_export(exporter, model, out, options)
