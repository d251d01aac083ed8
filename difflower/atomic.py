"""Writing output folders so that an interrupted write never leaves a complete-looking folder.

Everything goes into a hidden temporary sibling of the destination, which is renamed into
place only when the caller's block finished without an exception.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from difflower.errors import ArgumentError


@contextlib.contextmanager
def atomic_directory(out: Path | str, overwrite: bool = False, argument: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `out`, on error it is deleted.

    An existing `out` is refused unless `overwrite`; then it is removed only after the new
    folder is complete. `argument` names the CLI flag in the error message.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ArgumentError(argument, f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ArgumentError(argument, f"{out} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
