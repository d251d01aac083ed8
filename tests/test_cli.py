"""The command line: commands run, and user mistakes are one clear line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

from difflower.cli import main


def test_tiny_command(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "ckpt"), "--family", "sd3", "--seed", "2"]) == 0
    assert "wrote tiny sd3 checkpoint" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "transformer" / "config.json").is_file()


def test_user_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "difflower.cli", "tiny", str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("difflower tiny: error: argument DIR:")
    assert "--overwrite" in lines[0]
