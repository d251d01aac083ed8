"""User-facing errors.

Every error a user can cause (a bad path, a malformed checkpoint, a wrong argument) is a
`DifflowerError`: the CLI prints its message as one line and exits non-zero, without a
traceback. Messages name the file, field or argument and say what to do next.
"""

from __future__ import annotations

from pathlib import Path


class DifflowerError(Exception):
    """An error caused by the user's input, reported as one clear line."""


class CheckpointError(DifflowerError):
    """A checkpoint folder, file or config field that difflower cannot use."""

    def __init__(self, path: Path | str, message: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class ArgumentError(DifflowerError):
    """A call argument (CLI flag or Python keyword) with an unusable value."""

    def __init__(self, name: str, message: str):
        self.name = name
        self.detail = message
        super().__init__(f"argument {name}: {message}")


def reason_line(err: BaseException) -> str:
    """The line of a wrapped failure's text that says why (the last `...Error: ...` line, e.g. of
    a Ray worker's or replica's traceback), else its last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    ours = [line for line in lines if "Error:" in line]
    return (ours or lines or [type(err).__name__])[-1]
