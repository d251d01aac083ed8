"""`difflower generate --prompts FILE --out-dir DIR [--ray]`: a prompt file to a folder, resumable.

Each image must be byte for byte the one `difflower generate --prompt P --seed S` writes, a rerun
must skip what is there (and never replace a file), and the Ray Data path must write the same bytes.
"""

from __future__ import annotations

import importlib.util

import pytest

from difflower.cli import main

PROMPTS = "a red castle\n\n# a comment line\na blue lake at dawn\n  the third prompt  \n"


def _run(model, prompts, out_dir, *extra):
    return main(["generate", str(model), "--prompts", str(prompts), "--out-dir", str(out_dir), "--steps", "2",
                 "--seed", "7", "--threads", "1", *extra])  # fmt: skip


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prompt_file_gives_generates_images_and_resumes(tiny_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a file difflower did not write stays as it is
    assert _run(tiny_dirs["sd"], prompts, out) == 0
    assert "wrote the images of 3 prompts" in capsys.readouterr().out
    files = _files(out)
    names = sorted(n for n in files if n.endswith(".png"))
    assert [n[:6] for n in names] == ["00000-", "00001-", "00002-"]
    assert "a-blue-lake-at-dawn" in names[1] and "the-third-prompt" in names[2]

    # prompt i is `generate --prompt P --seed 7 + i`: the same bytes, PNG text included
    for i, prompt in enumerate(["a red castle", "a blue lake at dawn", "the third prompt"]):
        single = tmp_path / f"single-{i}.png"
        argv = ["generate", str(tiny_dirs["sd"]), "--prompt", prompt, "--steps", "2", "--seed", str(7 + i)]
        assert main([*argv, "--threads", "1", "-o", str(single)]) == 0
        assert single.read_bytes() == files[names[i]], prompt

    # a rerun skips every prompt; with one image gone, only that one is made again
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / names[1]).unlink()
    capsys.readouterr()
    assert _run(tiny_dirs["sd"], prompts, out) == 0
    out_text = capsys.readouterr().out
    assert "wrote the images of 1 prompts" in out_text and "2 already there" in out_text
    assert _files(out) == files
    assert all((out / n).stat().st_mtime_ns == stamps[n] for n in (names[0], names[2]))

    # other settings write other names beside the old images
    assert _run(tiny_dirs["sd"], prompts, out, "--guidance", "3.5") == 0
    after = _files(out)
    assert {n: after[n] for n in files} == files and len(after) == len(files) + 3
    assert after["notes.txt"] == b"mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_prompt_file_mistakes_are_one_line(tiny_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n", encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    model = str(tiny_dirs["sd"])
    cases = [
        (["--prompts", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o")], "--prompts: ", "not found"),
        (["--prompts", str(empty), "--out-dir", str(tmp_path / "o")], "--prompts: ", "holds no prompts"),
        (["--prompts", str(binary), "--out-dir", str(tmp_path / "o")], "--prompts: ", "is not UTF-8 text"),
        (["--prompts", str(prompts)], "--out-dir: ", "is required with --prompts"),
        (["--prompts", str(prompts), "--out-dir", str(a_file)], "--out-dir: ", "is a file, not a folder"),
        (["--prompts", str(prompts), "--prompt", "x", "--out-dir", str(tmp_path / "o")], "--prompt: ", "does not go"),
        (["--prompts", str(prompts), "--out-dir", str(tmp_path / "o"), "--overwrite"], "--overwrite: ", "never"),
        (["--prompts", str(prompts), "--out-dir", str(tmp_path / "o"), "--workers", "2"], "--workers: ", "needs --ray"),
        (["--prompt", "x", "--out-dir", str(tmp_path / "o")], "--out-dir: ", "goes with --prompts"),
        (["--prompt", "x"], "-o: ", "is required"),
    ]
    for argv, flag, words in cases:
        assert main(["generate", model, *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and words in err, (argv, err)
    assert not (tmp_path / "o").exists() and a_file.read_text() == "x"


@pytest.mark.skipif(not importlib.util.find_spec("ray"), reason="Ray is not installed: pip install 'difflower[ray]'")
def test_ray_data_workers_write_the_same_images(sd_onnx, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    here, spread = tmp_path / "here", tmp_path / "ray"
    assert _run(sd_onnx, prompts, here) == 0
    expected = _files(here)
    # one image already there: the Ray run makes only the other two, on two workers
    spread.mkdir()
    first = sorted(expected)[0]
    (spread / first).write_bytes(expected[first])
    capsys.readouterr()
    assert _run(sd_onnx, prompts, spread, "--ray", "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "wrote the images of 2 prompts" in out and "1 already there" in out
    assert _files(spread) == expected
