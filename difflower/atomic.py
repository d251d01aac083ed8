"""Writing outputs so that nothing half-written ever looks complete and nothing difflower did
not write is ever deleted.

Everything goes into a hidden temporary sibling of the destination, named after the process
that writes it (`.<name>.partial-<owner>`), and is renamed into place only when the caller's
block finished without an exception. The final rename never replaces what appeared at the
destination meanwhile (a no-replace rename, serialised between difflower processes by a lock
on the parent folder); `overwrite` replaces only what the caller's `replaceable` check accepts
(an earlier difflower artifact, never a folder of the user's). A process killed mid-write
leaves its temporary behind; the next write to the same destination removes it once its
owner process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from difflower.errors import ArgumentError, DifflowerError

PARTIAL = "partial"
OLD = "old"
# A check that returns None when `path` may be replaced, else the reason it may not.
Replaceable = Callable[[Path], "str | None"]


class TargetChangedError(DifflowerError):
    """The destination changed while the output was being written; nothing was replaced."""


# -- who owns a temporary ------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of the whole line


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_token(pid: int | None = None) -> str:
    """`<host>.<pid>.<start>`: names the process that writes a temporary."""
    pid = os.getpid() if pid is None else pid
    return f"{_host()}.{pid}.{_start_ticks(pid) or 0}"


def _owner_gone(token: str) -> bool:
    """True when `token` (`owner_token()`, then `.` and a random part) names a process of this
    host that no longer runs."""
    try:
        host, pid_text, start_text, _unique = token.split(".")
        pid, start = int(pid_text), int(start_text)
    except ValueError:
        return False  # not a name difflower made: leave it alone
    if host != _host():
        return False  # another machine's (a shared folder): only it can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    current = _start_ticks(pid)
    return current is not None and start != 0 and current != start  # the pid was reused


def temporary_name(out: Path, kind: str = PARTIAL) -> Path:
    """`.<name>.<kind>-<owner>.<random>`: unique even between threads of one process."""
    return out.with_name(f".{out.name}.{kind}-{owner_token()}.{secrets.token_hex(4)}")


def remove_stale(out: Path) -> list[Path]:
    """Clean up after killed writers of `out`: their temporaries go; an earlier artifact they had
    moved aside but not yet replaced goes back in place. Returns what was removed or restored."""
    parent = out.parent
    if not parent.is_dir():
        return []
    done = []
    names = sorted(p.name for p in parent.iterdir())
    for kind in (OLD, PARTIAL):  # restore an earlier artifact before anything else is judged
        prefix = f".{out.name}.{kind}-"
        for name in names:
            if not name.startswith(prefix) or not _owner_gone(name[len(prefix) :]):
                continue
            path = parent / name
            with contextlib.suppress(OSError):  # another process may be cleaning up the same
                if kind == OLD and not out.exists() and not out.is_symlink():
                    path.rename(out)  # its writer died between moving it aside and renaming the new one in
                elif path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                done.append(path)
    return done


# -- renames that never replace ------------------------------------------------------------------


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`; FileExistsError if `target` exists, atomically where the OS
    offers it (Linux renameat2), else checked just before an ordinary rename."""
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    # No atomic no-replace here: the parent lock keeps difflower processes out; what another
    # program creates between the check and the rename is, at worst, an empty folder (a
    # non-empty one makes the rename fail).
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    source.rename(target)


@contextlib.contextmanager
def parent_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` held by this process (flock; a no-op where there is none)."""
    try:
        import fcntl
    except ImportError:  # Windows: renames there never replace anyway
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- checks before any work -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    """What `out` was when the write began: absent, or this folder (device, inode, and the
    change time, which also moves when an entry is added to or removed from it)."""

    exists: bool
    device: int = 0
    inode: int = 0
    changed_ns: int = 0

    @staticmethod
    def of(path: Path) -> _Identity:
        try:
            stat = path.lstat()
        except FileNotFoundError:
            return _Identity(False)
        return _Identity(True, stat.st_dev, stat.st_ino, stat.st_ctime_ns)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(
    out: Path,
    *,
    overwrite: bool,
    argument: str,
    replaceable: Replaceable | None = None,
    protected: Sequence[Path] = (),
    what: str = "folder",
) -> Path:
    """`out` made absolute (its parent resolved), after every check that can fail before work:
    not a file's child, not overlapping a `protected` path, and existing only with `overwrite`
    and `replaceable`'s consent."""
    out = Path(out).expanduser()
    out = out.parent.resolve() / out.name if out.name not in ("", ".", "..") else out.resolve()
    for ancestor in out.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ArgumentError(argument, f"{ancestor} is a file, so {out} cannot be created under it")
            break
    for source in protected:
        source = Path(source).resolve()
        resolved = out.resolve()
        if _inside(resolved, source) or _inside(source, resolved):
            relation = "is" if resolved == source else ("lies inside" if _inside(resolved, source) else "contains")
            raise ArgumentError(
                argument, f"{out} {relation} the source {source}; write the output to a folder of its own"
            )
    if what == "file" and out.is_dir():
        raise ArgumentError(argument, f"{out} is a folder, not a file; name a file")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ArgumentError(argument, f"{out} already exists; pass --overwrite to replace it")
        if what == "folder" and (out.is_symlink() or not out.is_dir()):
            raise ArgumentError(
                argument, f"{out} is a file or a link, not a folder difflower wrote; remove it yourself"
            )
        reason = replaceable(out) if replaceable is not None else None
        if reason is not None:
            raise ArgumentError(argument, f"--overwrite will not replace {out}: {reason}")
    return out


# -- the writers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(
    out: Path | str,
    overwrite: bool = False,
    argument: str = "--out",
    *,
    replaceable: Replaceable | None = None,
    protected: Sequence[Path] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes `out`, on any exception (Ctrl-C and
    SIGTERM included) it is deleted.

    An existing `out` is refused unless `overwrite` and `replaceable(out)` returns None; it is
    then replaced only after the new folder is complete, and only if it is still the folder that
    was checked. `protected` paths (the source of the output) may neither be, contain nor lie
    inside `out`. `argument` names the CLI flag in error messages.
    """
    out = check_destination(out, overwrite=overwrite, argument=argument, replaceable=replaceable, protected=protected)
    before = _Identity.of(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArgumentError(argument, f"cannot create {out.parent} ({err.strerror})") from None
    remove_stale(out)
    tmp = temporary_name(out)
    try:
        tmp.mkdir()
    except OSError as err:
        raise ArgumentError(argument, f"cannot write in {out.parent} ({err.strerror})") from None
    try:
        yield tmp
        _replace(tmp, out, before, replaceable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path, before: _Identity, replaceable: Replaceable | None) -> None:
    """Rename the finished `tmp` to `out`, replacing only the folder checked at the start."""
    with parent_lock(out.parent):
        now = _Identity.of(out)
        if now != before or (now.exists and replaceable is not None and replaceable(out) is not None):
            appeared = "appeared" if not before.exists else "changed"
            raise TargetChangedError(
                f"{out} {appeared} while this output was being written (another export, or a program, wrote "
                "there); nothing was replaced. Run again, or choose another folder"
            )
        old = None
        if now.exists:
            old = temporary_name(out, OLD)
            out.rename(old)
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            if old is not None:  # something took the name in between: keep the earlier artifact
                with contextlib.suppress(OSError):
                    rename_noreplace(old, out)
            raise TargetChangedError(
                f"{out} appeared while this output was being written; nothing was replaced. Run again"
            ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: Path | str, overwrite: bool = False, argument: str = "-o") -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it becomes `out` (replacing an existing
    file only with `overwrite`), on any exception it is deleted."""
    out = check_destination(out, overwrite=overwrite, argument=argument, what="file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArgumentError(argument, f"cannot create {out.parent} ({err.strerror})") from None
    remove_stale(out)
    tmp = temporary_name(out)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise TargetChangedError(f"{out} appeared while it was being written; it was not replaced") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
