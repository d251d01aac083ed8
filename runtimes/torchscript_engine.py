"""Engine `torchscript`: a traced `<component>/model.pt` called with positional inputs.

Inputs go in the manifest's order, after the base class checked their names, dtypes and
(static) shapes; outputs come back by the manifest's names. A traced graph runs on the device
type it was traced on (see difflower.exporters.torchscript), so a CPU-traced artifact asked to
run on CUDA is refused with the export setting that fixes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflower.artifact.formats import TORCHSCRIPT_FILE as FILE
from difflower.artifact.formats import load_traced
from difflower.artifact.manifest import ComponentRecord
from difflower.errors import ArgumentError
from difflower.runtimes.engine import refuse_options
from difflower.runtimes.torch_engine import TorchEngine


def engine_device(record: ComponentRecord, device: str) -> torch.device:
    """`device` as a torch.device, refused unless it is the type the component was traced on."""
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError("--device", f"expected cpu or cuda[:N], got {device!r}") from None
    traced_on = record.config.get("traced_on", "cpu")
    if wanted.type != traced_on:
        raise ArgumentError(
            "--device",
            f"component '{record.name}' was traced on {traced_on} and a traced graph keeps its device; "
            f"re-export it traced on {wanted.type} (export(..., backend='torchscript', device={wanted.type!r}))",
        )
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device", "cuda was asked for but this torch sees no CUDA device")
    return wanted


class TorchScriptEngine(TorchEngine):
    """One component's traced module; `run` (positional inputs in manifest order) is TorchEngine's."""

    backend = "torchscript"
    # A TorchScript file is a program (a scripted __setstate__ runs on load): its bytes are
    # checked against the sha256 the export recorded before it is opened.
    executes_code = True

    @classmethod
    def open(
        cls, record: ComponentRecord, folder: Path, manifest, device: str = "cpu", threads: int | None = None, **options
    ) -> TorchScriptEngine:
        refuse_options("torchscript", options)
        target = engine_device(record, device)
        if threads:
            torch.set_num_threads(threads)
        return cls(record, load_traced(Path(folder) / record.name / FILE, target), str(target))


ENGINE = TorchScriptEngine
