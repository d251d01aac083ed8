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


def test_generate_writes_the_eager_image(tiny_dirs, tmp_path, capsys):
    import numpy as np
    import PIL.Image
    import torch

    from difflower.reference.pipeline import load_pipeline

    out = tmp_path / "images" / "cat.png"
    # the same thread count as the in-process run below: float sums depend on how work is split
    threads = str(torch.get_num_threads())
    argv = ["generate", str(tiny_dirs["sd"]), "--prompt", "a cat", "--steps", "3", "--seed", "4", "-o", str(out)]
    assert main([*argv, "--threads", threads]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = load_pipeline(tiny_dirs["sd"])("a cat", num_inference_steps=3, seed=4, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))


def test_generate_img2img_and_several_images(tiny_dirs, tmp_path):
    import PIL.Image

    init = tmp_path / "init.png"
    PIL.Image.new("RGB", (64, 48), (200, 30, 30)).save(init)
    out = tmp_path / "out.png"
    argv = ["generate", str(tiny_dirs["sdxl"]), "--prompt", "a red castle", "--image", str(init), "--strength", "0.7"]
    assert main([*argv, "--steps", "3", "--num-images", "2", "-o", str(out)]) == 0
    sizes = [PIL.Image.open(tmp_path / f"out-{i}.png").size for i in range(2)]
    assert sizes == [(64, 48), (64, 48)]


def test_generate_bad_arguments_are_one_line(tiny_dirs, tmp_path, capsys):
    base = ["generate", str(tiny_dirs["sd"]), "--prompt", "a", "--steps", "1", "-o", str(tmp_path / "x.png")]
    assert main([*base, "--scheduler", "warp-drive"]) == 2
    assert "error: argument --scheduler" in capsys.readouterr().err
    assert main([*base, "--image", str(tmp_path / "missing.png")]) == 2
    assert "error: argument --image: cannot read image" in capsys.readouterr().err
    assert main([*base, "--height", "60"]) == 2
    assert "error: argument --height: must be a positive multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
