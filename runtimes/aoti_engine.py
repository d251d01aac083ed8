"""Engine `aoti`: a component's AOTInductor package (`<component>/model.pt2`) loaded once and run.

The package holds compiled kernels and the weights; loading it compiles nothing. It runs on the
device type it was compiled for and only with the torch version that compiled it (the package's
ABI is that version's), so either mismatch is one line naming the export setting that fixes it.
The package is native code: like TorchScript's, its files are checked against the sha256 the
export recorded before it is opened.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from difflower.artifact.formats import AOTI_FILE as FILE
from difflower.artifact.manifest import ComponentRecord
from difflower.errors import ArgumentError, CheckpointError
from difflower.runtimes.engine import refuse_options
from difflower.runtimes.torch_engine import TorchEngine


class _Package(torch.nn.Module):
    """A loaded package behind the module call the torch engine makes (positional in, tuple out)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Compiled kernels index inputs with the strides they were compiled for (contiguous); the
        # loop's timestep is an expanded (stride 0) tensor, read past its one element otherwise.
        return tuple(self.runner(*(a.contiguous() for a in args)))


# Opens a package in a child process; the child's exit status is the verdict.
LOAD_CHECK = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
_loader_checked: set[tuple[str, str]] = set()


def check_loader(path: Path, device_type: str) -> None:
    """Open the package at `path` in a child process before this process does, once per torch
    version and device type: a loader that crashes takes the child down, not the user's process.

    torch 2.11.0+cu130's AOTInductor loader segfaulted on the H200 machine lent to this project
    opening every CUDA package, one nn.Linear's too (benchmarks/results/aoti-gpu-h200.json): in
    process that is a dead interpreter and no message. A child that fails with a Python error is
    left to the load in this process, which reports it as a CheckpointError."""
    key = (torch.__version__, device_type)
    if key in _loader_checked:
        return
    result = subprocess.run(
        [sys.executable, "-c", LOAD_CHECK, str(path)], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise CheckpointError(
            path,
            f"torch {torch.__version__}'s AOTInductor loader crashed ({name}) opening this {device_type} package in a "
            "check process; this torch build cannot run aoti packages here. Use another torch build, or run the "
            "checkpoint with --compile, or export --backend torchscript",
        )
    if result.returncode == 0:
        _loader_checked.add(key)


def load_package(path: Path) -> _Package:
    """The package at `path`, loaded; a damaged one is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(path, "not found; the artifact is incomplete, re-export it")
    try:
        return _Package(torch._inductor.aoti_load_package(str(path)))
    except (RuntimeError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(path, f"AOTInductor cannot load it ({first}); re-export the artifact") from None


class AotiEngine(TorchEngine):
    """One component's AOTInductor package; `run` (positional inputs in manifest order) is TorchEngine's."""

    backend = "aoti"
    executes_code = True  # generated kernels in a shared library: checked against the export's sha256

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            return "an aoti package compiled for CUDA runs on a GPU; this torch sees no CUDA device"
        return None

    @classmethod
    def open(
        cls, record: ComponentRecord, folder: Path, manifest, device: str = "cpu", threads: int | None = None, **options
    ) -> AotiEngine:
        refuse_options("aoti", options)
        compiled_on, compiled_by = record.config.get("compiled_on", "cpu"), record.config.get("torch")
        try:
            wanted = torch.device(device)
        except (RuntimeError, TypeError):
            raise ArgumentError("--device", f"expected cpu or cuda[:N], got {device!r}") from None
        if wanted.type != compiled_on:
            raise ArgumentError(
                "--device",
                f"component '{record.name}' was compiled for {compiled_on}; a package runs where it was compiled "
                f"for: re-export it with --device {wanted.type}",
            )
        if compiled_by != torch.__version__:
            raise ArgumentError(
                "--engine",
                f"component '{record.name}' was compiled by torch {compiled_by}; this is torch {torch.__version__}, "
                "whose AOTInductor cannot load it: re-export the artifact with this torch",
            )
        problem = cls.unavailable(device)
        if problem:
            raise ArgumentError("--device", problem)
        if threads:
            torch.set_num_threads(threads)
        path = Path(folder) / record.name / FILE
        if wanted.type == "cuda" and path.is_file():
            check_loader(path, wanted.type)
        return cls(record, load_package(path), str(wanted))


ENGINE = AotiEngine
