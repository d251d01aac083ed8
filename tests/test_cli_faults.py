"""The command line as a careless or hostile user meets it: every fault is one line naming the
file, field or argument with exit status 2, checked before any model is loaded where it can be,
and nothing on disk is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import PIL.Image
import pytest

import difflower.api
from difflower.cli import main

CLI = [sys.executable, "-m", "difflower.cli"]


def _one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(prefix), err[0]
    return err[0]


@pytest.fixture()
def no_load(monkeypatch):
    """difflower.load out of reach: a check that should come first must not load a model."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the argument was checked")

    monkeypatch.setattr(difflower.api, "load", fail)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "missing.png"], "argument --image: cannot read image"),
        (["--strength", "0.5"], "argument --strength: applies to img2img and inpainting"),
        (["--mask", "mask.png"], "argument --mask: needs the image to inpaint"),
        (["-o", "out.txt"], "argument -o: out.txt must end in .png"),
        (["-o", "folder.png"], "argument -o: .*folder.png is a folder, not a file"),
        (["-o", "file.png/x.png"], "argument -o: .*file.png is a file, so .* cannot be created under it"),
        (["-o", "existing.png"], "argument -o: .*existing.png already exists; pass --overwrite"),
    ],
)
def test_generate_checks_paths_and_inputs_before_loading(
    tiny_dirs, tmp_path, monkeypatch, capsys, no_load, extra, message
):
    import re

    monkeypatch.chdir(tmp_path)
    PIL.Image.new("L", (64, 64)).save("mask.png")
    PIL.Image.new("RGB", (64, 64)).save("existing.png")
    PIL.Image.new("RGB", (64, 64)).save("file.png")
    (tmp_path / "folder.png").mkdir()
    argv = ["generate", str(tiny_dirs["sd"]), "--prompt", "a", "-o", "new.png", *extra]
    assert main(argv) == 2
    line = _one_line(capsys, "difflower generate: error: ")
    assert re.search(message, line), line
    assert PIL.Image.open("existing.png").size == (64, 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "M", "--prompt", "a", "-o", "x.png", "--guidance", "inf"], "--guidance: must be a finite number"),
        (["generate", "M", "--prompt", "a", "-o", "x.png", "--guidance", "nan"], "--guidance: must be a finite number"),
        (["generate", "M", "--prompt", "a", "-o", "x.png", "--strength", "nan"], "--strength: must be a finite"),
        (["generate", "M", "--prompt", "a", "-o", "x.png", "--threads", "-3"], "--threads: must be at least 1"),
        (["generate", "M", "--prompt", "a", "-o", "x.png", "--steps", "0"], "--steps: must be at least 1"),
        (["bench", "--reference", "M", "--runs", "0"], "--runs: must be at least 1"),
        (["export", "M", "--backend", "tflite", "--out", "o"], "--backend: invalid choice: 'tflite'"),
    ],
)
def test_bad_numbers_and_choices_are_one_line_from_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    line = _one_line(capsys, f"difflower {argv[0]}: error: argument ")
    assert message in line


def test_existing_image_is_replaced_only_with_overwrite_and_it_says_so(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "cat.png"
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(out)
    base = ["generate", str(tiny_dirs["sd"]), "--prompt", "a cat", "--steps", "2", "--seed", "3", "-o", str(out)]
    assert main(base) == 2
    assert PIL.Image.open(out).size == (8, 8)
    capsys.readouterr()
    assert main([*base, "--overwrite"]) == 0
    assert f"replaced {out}" in capsys.readouterr().out
    image = PIL.Image.open(out)
    assert image.size == (64, 64)
    assert image.text["prompt"] == "a cat" and image.text["seed"] == "3"  # settings travel with the picture
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]


def test_json_report_path_is_checked_before_validating(sd_onnx, tiny_dirs, tmp_path, capsys, monkeypatch):
    import difflower.validate.parity as parity

    monkeypatch.setattr(parity, "validate_artifact", lambda *a, **k: pytest.fail("validated before the check"))
    (tmp_path / "report.json").write_text("{}")
    argv = ["validate", str(sd_onnx), "--reference", str(tiny_dirs["sd"]), "--json", str(tmp_path / "report.json")]
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in _one_line(capsys, "difflower validate: error: argument --json:")


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "expected cpu, cuda or cuda:N, got 'tpu'"), ("cuda", "sees no CUDA device; use --device cpu")],
)
def test_a_device_this_torch_lacks_is_one_line(tiny_dirs, tmp_path, capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this torch has CUDA: the refusal is for CPU-only builds")
    argv = ["generate", str(tiny_dirs["sd"]), "--prompt", "a", "--device", device, "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert message in _one_line(capsys, "difflower generate: error: argument --device:")


def test_dtype_on_an_artifact_is_refused(sd_onnx, tmp_path, capsys):
    argv = ["generate", str(sd_onnx), "--prompt", "a", "--dtype", "fp16", "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert "precision it was exported with" in _one_line(capsys, "difflower generate: error: argument --dtype:")


def test_an_engine_for_another_backend_names_the_mismatch(sd_onnx, tmp_path, capsys):
    argv = ["generate", str(sd_onnx), "--prompt", "a", "--engine", "openvino", "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    line = _one_line(capsys, "difflower generate: error: argument --engine:")
    assert "openvino cannot run this onnx artifact; its engines are onnxruntime, torch" in line


def test_a_deleted_manifest_and_a_hub_repo_id_get_their_own_messages(sd_onnx, tmp_path, capsys):
    broken = tmp_path / "art"
    shutil.copytree(sd_onnx, broken)
    (broken / "difflower.json").unlink()
    assert main(["generate", str(broken), "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    assert "looks like a difflower artifact" in _one_line(capsys, f"difflower generate: error: {broken}/difflower.json")
    assert main(["generate", "stabilityai/sd-turbo", "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    line = _one_line(capsys, "difflower generate: error: stabilityai/sd-turbo: no local folder of that name")
    assert "not in the Hub cache" in line and "HF_HUB_OFFLINE is set" in line
    assert "hf download stabilityai/sd-turbo --revision main" in line


def _edit_manifest(folder, edit):
    path = folder / "difflower.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(components={}), "field 'components' lists no component"),
        (lambda m: m["shapes"].update(buckets="1x64x64"), "field 'shapes' must hold graph"),
        (lambda m: m["components"]["unet"].update(name="../unet"), "is not a plain folder name"),
        (lambda m: m.update(files={"../../etc/passwd": "0"}), "is not a path inside the artifact"),
    ],
)
def test_a_malformed_manifest_is_one_line(sd_onnx, tmp_path, capsys, edit, message):
    broken = tmp_path / "art"
    shutil.copytree(sd_onnx, broken)
    _edit_manifest(broken, edit)
    assert main(["info", str(broken)]) == 2
    assert message in _one_line(capsys, f"difflower info: error: {broken}/difflower.json: ")


def test_an_unknown_pipeline_key_in_the_manifest_is_ignored_with_a_warning(sd_onnx, tmp_path, caplog):
    art = tmp_path / "art"
    shutil.copytree(sd_onnx, art)
    _edit_manifest(art, lambda m: m["pipeline"].update(from_the_future=1))
    assert main(["generate", str(art), "--prompt", "a", "--steps", "2", "-o", str(tmp_path / "x.png")]) == 0
    assert "unknown field 'from_the_future' ignored" in caplog.text


def test_an_artifact_without_its_tokenizer_is_one_line(sd_onnx, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(sd_onnx, art)
    shutil.rmtree(art / "tokenizer")
    assert main(["generate", str(art), "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    assert "text_encoder needs its tokenizer" in _one_line(capsys, f"difflower generate: error: {art}/tokenizer")


def test_a_partial_artifact_says_what_it_lacks_and_validates_what_it_holds(tiny_dirs, tmp_path, capsys):
    art = tmp_path / "unet-only"
    assert main(["export", str(tiny_dirs["sd"]), "--backend", "onnx", "--out", str(art), "--components", "unet"]) == 0
    capsys.readouterr()
    assert main(["info", str(art)]) == 0
    assert (
        "partial: holds unet only; cannot generate alone (lacks text_encoder, vae_decoder)" in capsys.readouterr().out
    )
    assert main(["generate", str(art), "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    line = _one_line(capsys, "difflower generate: error: ")
    assert "holds unet only; txt2img needs text_encoder, vae_decoder too" in line
    assert main(["validate", str(art), "--reference", str(tiny_dirs["sd"])]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "not measured: the artifact holds unet only" in out
    assert main(["bench", str(art), "--reference", str(tiny_dirs["sd"]), "--runs", "1", "--steps", "2"]) == 0
    assert "end to end: not run (the artifact holds unet only)" in capsys.readouterr().out


def test_export_copies_only_what_difflower_reads(tiny_dirs, sd_onnx):
    source = {str(p.relative_to(tiny_dirs["sd"])) for p in tiny_dirs["sd"].rglob("*") if p.is_file()}
    copied = {
        str(p.relative_to(sd_onnx)) for p in sd_onnx.rglob("*") if p.is_file() and "/" in str(p.relative_to(sd_onnx))
    }
    support = {f for f in copied if f.split("/")[0] in ("scheduler", "tokenizer")}
    assert support == {f for f in source if f.split("/")[0] in ("scheduler", "tokenizer")}


def test_code_next_to_a_config_is_not_copied(tiny_dirs, tmp_path):
    from difflower.driver import export

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["sd"], ckpt)
    (ckpt / "tokenizer" / "tokenization_evil.py").write_text("import os; os.system('echo pwned')\n")
    (ckpt / "scheduler" / "scheduling_evil.py").write_text("raise SystemExit\n")
    (ckpt / "notes.txt").write_text("mine")
    out = tmp_path / "art"
    export(ckpt, "onnx", out, components=["vae_decoder"], progress=False)
    names = {p.name for p in out.rglob("*")}
    assert not names & {"tokenization_evil.py", "scheduling_evil.py", "notes.txt"}


def test_verify_catches_a_changed_file(sd_onnx, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(sd_onnx, art)
    assert main(["verify", str(art)]) == 0
    assert "files match the sha256 recorded at export" in capsys.readouterr().out
    weights = art / "unet" / "model.onnx"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["verify", str(art)]) == 2
    assert "differs from what was exported" in _one_line(capsys, f"difflower verify: error: {weights}")
    (art / "unet" / "extra.bin").write_bytes(b"x")
    weights.write_bytes(bytes(data[:-100]) + bytes([data[-100] ^ 0xFF]) + bytes(data[-99:]))
    assert main(["verify", str(art)]) == 2
    assert "was not written by the export" in _one_line(capsys, f"difflower verify: error: {art}/unet/extra.bin")


def test_a_changed_torchscript_file_is_not_run(sd_torchscript, tmp_path, capsys):
    """A TorchScript file is a program: it is opened only when it is the one the export wrote."""
    art = tmp_path / "art"
    shutil.copytree(sd_torchscript, art)
    path = art / "unet" / "model.pt"
    path.write_bytes(path.read_bytes() + b"\0")
    assert main(["generate", str(art), "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    assert "differs from what was exported" in _one_line(capsys, f"difflower generate: error: {path}")


def test_onnx_weights_outside_the_artifact_are_named_as_such(sd_onnx, tmp_path, capsys):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    art = tmp_path / "art"
    shutil.copytree(sd_onnx, art)
    path = art / "unet" / "model.onnx"
    model = onnx.load(str(path))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    onnx.save_model(model, str(path))
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../w.bin"
    path.write_bytes(model.SerializeToString())
    (art / "unet" / "w.bin").rename(tmp_path / "w.bin")
    assert main(["generate", str(art), "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    assert "point to a file outside the artifact folder" in _one_line(capsys, f"difflower generate: error: {path}")


def test_no_traceback_from_a_subprocess_for_a_bad_checkpoint(tiny_dirs, tmp_path):
    """The whole process, not only main(): stderr is one line."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["sd"], ckpt)
    config = json.loads((ckpt / "text_encoder" / "config.json").read_text())
    del config["hidden_size"]
    config["num_attention_heads"] = 5  # no longer divides the width
    (ckpt / "text_encoder" / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [*CLI, "generate", str(ckpt), "--prompt", "a", "-o", str(tmp_path / "x.png")], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "text_encoder: cannot load CLIPTextModel" in lines[0], lines
