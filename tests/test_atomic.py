"""Outputs are written so that nothing difflower did not write is ever deleted and nothing
half-written ever looks complete: replace rules, races, signals, killed writers, full disks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difflower.atomic import (
    TargetChangedError,
    atomic_directory,
    atomic_file,
    owner_token,
    remove_stale,
)
from difflower.errors import ArgumentError

CLI = [sys.executable, "-m", "difflower.cli"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write(folder: Path, text: str = "x") -> None:
    (folder / "f.txt").write_text(text)


def test_new_folder_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        _write(tmp)
        assert not out.exists()
        assert tmp.name.startswith(".out.partial-")
    assert (out / "f.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_only_what_the_check_accepts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, "user's")
    with pytest.raises(ArgumentError, match="already exists; pass --overwrite"):
        with atomic_directory(out):
            pass
    with pytest.raises(ArgumentError, match="will not replace .* not mine"):
        with atomic_directory(out, overwrite=True, replaceable=lambda p: "not mine"):
            pass
    assert (out / "f.txt").read_text() == "user's"
    with atomic_directory(out, overwrite=True, replaceable=lambda p: None) as tmp:
        _write(tmp, "new")
    assert (out / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("where", "relation"), [("src", "is"), (".", "contains"), ("src/unet", "lies inside")])
def test_the_source_is_protected(tmp_path, where, relation):
    source = tmp_path / "src"
    (source / "unet").mkdir(parents=True)
    with pytest.raises(ArgumentError, match=f"{relation} the source"):
        with atomic_directory(tmp_path / where, overwrite=True, replaceable=lambda p: None, protected=[source]):
            pass
    assert (source / "unet").is_dir()


def test_a_folder_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="is a file, so .* cannot be created under it"):
        with atomic_directory(tmp_path / "file" / "out"):
            pass


def test_a_target_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TargetChangedError, match="appeared while"):
        with atomic_directory(out) as tmp:
            _write(tmp, "ours")
            out.mkdir()  # another program (or export) writes there meanwhile
            _write(out, "theirs")
    assert (out / "f.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_writers_to_one_target_the_later_fails(tmp_path):
    out = tmp_path / "out"
    first, second = atomic_directory(out), atomic_directory(out)
    first_tmp = first.__enter__()
    second_tmp = second.__enter__()  # begun before the first finished: out was free then
    _write(first_tmp, "first")
    first.__exit__(None, None, None)  # the first lands
    _write(second_tmp, "second")
    with pytest.raises(TargetChangedError, match="appeared while"):
        second.__exit__(None, None, None)
    assert (out / "f.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_replaced_target_that_changed_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, "earlier artifact")
    with pytest.raises(TargetChangedError, match="changed while"):
        with atomic_directory(out, overwrite=True, replaceable=lambda p: None) as tmp:
            _write(tmp, "ours")
            shutil.rmtree(out)
            out.mkdir()
            _write(out, "someone else's, written meanwhile")
    assert (out / "f.txt").read_text() == "someone else's, written meanwhile"


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.partial-{owner_token(_dead_pid())}.1a2b"
    alive = tmp_path / f".out.partial-{owner_token()}.1a2b"  # this process: still writing
    foreign = tmp_path / ".out.partial-not-a-difflower-name"
    for folder in (dead, alive, foreign):
        folder.mkdir()
        _write(folder)
    stale_file = tmp_path / f".out.partial-{owner_token(_dead_pid())}"
    stale_file.write_text("x")  # a name difflower never makes (no unique part): left alone
    removed = remove_stale(out)
    assert removed == [dead]
    assert alive.is_dir() and foreign.is_dir() and stale_file.is_file()


def test_an_earlier_artifact_moved_aside_by_a_killed_writer_is_restored(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{owner_token(_dead_pid())}.1a2b"
    old.mkdir()
    _write(old, "earlier artifact")
    partial = tmp_path / f".out.partial-{owner_token(_dead_pid())}.3c4d"
    partial.mkdir()
    remove_stale(out)
    assert (out / "f.txt").read_text() == "earlier artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_never_replaces_without_overwrite(tmp_path):
    out = tmp_path / "report.json"
    with atomic_file(out) as tmp:
        tmp.write_text("1")
    with pytest.raises(ArgumentError, match="already exists"):
        with atomic_file(out):
            pass
    with atomic_file(out, overwrite=True) as tmp:
        tmp.write_text("2")
    assert out.read_text() == "2"
    other = tmp_path / "other.json"
    with pytest.raises(TargetChangedError):
        with atomic_file(other) as tmp:
            tmp.write_text("ours")
            other.write_text("theirs")
    assert other.read_text() == "theirs"
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "failed.png") as tmp:
            tmp.write_text("half")
            raise RuntimeError("the encoder failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "report.json"]


def _start_export(tiny_dirs, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "export", str(tiny_dirs["sd"]), "--backend", "onnx", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_partial(parent: Path, child: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in parent.iterdir() if ".partial-" in p.name]
        if found and any(found[0].iterdir()):
            return found[0]
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    raise AssertionError("the export never started writing")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_stops_like_ctrl_c_and_leaves_nothing(tiny_dirs, tmp_path, signum):
    out = tmp_path / "art"
    child = _start_export(tiny_dirs, out)
    _wait_for_partial(tmp_path, child)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum
    assert err.strip().splitlines()[-1].endswith("nothing half-written was left")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_export_is_cleaned_up_by_the_next_run(tiny_dirs, tmp_path):
    out = tmp_path / "art"
    child = _start_export(tiny_dirs, out)
    partial = _wait_for_partial(tmp_path, child)
    child.kill()
    child.wait()
    assert partial.is_dir()  # kill -9 cannot clean up ...
    result = subprocess.run(
        [*CLI, "tiny", str(tmp_path / "art"), "--family", "sd"], capture_output=True, text=True, check=True
    )
    assert "wrote tiny" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # ... the next write to that name does


def _unshare_tmpfs(script: str, tmp_path: Path, options: str) -> subprocess.CompletedProcess:
    """Run `script` (with $D a fresh tmpfs mounted with `options`) in a user+mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are off on this machine: cannot mount a small tmpfs without root")
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "D": str(tmp_path / "mnt")}
    command = f'mount -t tmpfs -o {options} tmpfs "$D" && {script}'
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=env)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    cli = " ".join(CLI)
    result = _unshare_tmpfs(f'{cli} tiny "$D/ckpt" --family sd; echo "rc=$?"; ls -A "$D"', tmp_path, "size=256k")
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "rc=2", result.stderr
    assert lines[1:] == []  # no half-written folder on the full disk
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("difflower tiny: error:")
    assert "No space left on device" in message[0]


def test_a_read_only_folder_is_one_line(tmp_path):
    cli = " ".join(CLI)
    result = _unshare_tmpfs(f'{cli} tiny "$D/ckpt" --family sd; echo "rc=$?"', tmp_path, "ro")
    assert result.stdout.strip() == "rc=2", result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "Read-only file system" in message[0]
