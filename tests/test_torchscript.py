"""TorchScript export, the torchscript engine in the one loop, and `validate`, on the tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflower.artifact.manifest import Manifest
from difflower.artifact.specs import example_inputs, load_export_module, spec_for_record
from difflower.cli import main
from difflower.driver import export
from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.pipeline import load_pipeline
from difflower.runtimes.engine import EngineInputError
from difflower.runtimes.pipeline import load_artifact
from difflower.runtimes.torchscript_engine import TorchScriptEngine
from difflower.validate.metrics import compare
from difflower.validate.parity import validate_artifact

FAMILIES = ("sd", "sdxl", "sd3")


@pytest.fixture(scope="session")
def ts_dirs(tiny_dirs, tmp_path_factory):
    """{family: artifact} traced once per session at the default bucket (no --static)."""
    root = tmp_path_factory.mktemp("torchscript")
    for family in FAMILIES:
        export(tiny_dirs[family], "torchscript", root / family, progress=False)
    return {family: root / family for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_passes_at_the_fp32_gates(tiny_dirs, ts_dirs, family):
    """Components, the drift of every step and the final image vs the eager pipeline, same seed."""
    report = validate_artifact(ts_dirs[family], tiny_dirs[family], steps=3)
    assert report.passed
    assert report.settings["engine"] == "torchscript"
    assert [report.settings[k] for k in ("batch", "height", "width")] == [1, 64, 64]  # the artifact's bucket
    assert all(c.passed for c in report.components.values())
    assert report.final_latents["gate"] == "|a - e| <= 1e-4 + 1e-2 |e|" and report.final_latents["passed"]
    assert report.final_latents["max_abs"] < 1e-4
    assert report.image["passed"] and (report.image["psnr"] is None or report.image["psnr"] >= 40)


def test_manifest_records_the_default_bucket_with_concrete_shapes(ts_dirs):
    manifest = Manifest.read(ts_dirs["sdxl"])
    assert manifest.backend == "torchscript"
    # no --static: the checkpoint's native size (sample_size 8 x VAE factor 8) at one image
    assert manifest.shapes["graph"] == "static" and manifest.shapes["buckets"] == [[1, 64, 64]]
    unet = manifest.components["unet"]
    assert [t.shape for t in unet.inputs] == [(2, 4, 8, 8), (2,), (2, 77, 64), (2, 32), (2, 6)]  # CFG: batch 2
    assert unet.outputs[0].shape == (2, 4, 8, 8)
    assert manifest.components["vae_decoder"].inputs[0].shape == (1, 4, 8, 8)
    assert unet.files == ["unet/config.json", "unet/model.pt"] and unet.config["traced_on"] == "cpu"
    assert all(r.parity.passed and r.parity.max_abs <= 1e-5 for r in manifest.components.values())
    # model.pt alone: positional inputs in the manifest's order, a tuple of outputs, the reference's numbers
    traced = torch.jit.load(str(ts_dirs["sdxl"] / "unet" / "model.pt"))
    inputs = example_inputs(spec_for_record(unet), dict.fromkeys(("height", "width"), 64), seed=2)
    reference = load_export_module(spec_for_record(unet), manifest.source["path"])
    with torch.no_grad():
        (got,), (want,) = traced(*inputs.values()), reference(*inputs.values())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    transformer = Manifest.read(ts_dirs["sd3"]).components["transformer"]
    assert transformer.inputs[1].shape == (2, 77 + 256, 64)  # CLIP + T5 tokens, joint_attention_dim


def test_explicit_bucket_is_traced_and_other_sizes_are_refused(tiny_dirs, tmp_path):
    out = tmp_path / "wide"
    manifest = export(tiny_dirs["sd"], "torchscript", out, static=["1x64x96"], components=["unet"], progress=False)
    assert manifest.shapes["buckets"] == [[1, 64, 96]]
    assert manifest.components["unet"].inputs[0].shape == (2, 4, 8, 12)
    assert manifest.components["unet"].parity.passed
    unet = load_artifact(out).unet
    good = {
        "sample": torch.randn(2, 4, 8, 12),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }
    assert unet(good)["out_sample"].shape == (2, 4, 8, 12)
    with pytest.raises(
        EngineInputError, match=r"unet: input 'sample' has shape \(2, 4, 8, 8\) but the artifact was built"
    ):
        unet({**good, "sample": torch.zeros(2, 4, 8, 8)})
    with pytest.raises(EngineInputError, match="unet: input 'timestep' is float64, the artifact takes float32"):
        unet({**good, "timestep": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(EngineInputError, match=r"missing \['encoder_hidden_states'\]"):
        unet({"sample": good["sample"], "timestep": good["timestep"]})  # fmt: skip


def test_pipeline_refuses_other_sizes_before_any_work(ts_dirs):
    artifact = load_artifact(ts_dirs["sd"])
    with pytest.raises(ArgumentError, match=r"built for 1x64x64 \(BxHxW\); asked for 1x64x80"):
        artifact("a cat", width=80, num_inference_steps=2, progress=False)
    with pytest.raises(ArgumentError, match="guidance_scale"):
        artifact("a cat", guidance_scale=1.0, num_inference_steps=2, progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"static": ["1x64x64", "1x64x96"]}, "--static: torchscript traces one static shape; got 2"),
        ({"precision": "fp16"}, "--precision: torchscript traces the fp32 reference"),
        ({"attention": "onnxruntime"}, "--attention: 'onnxruntime' is ONNX Runtime's own operator"),
        ({"quantize": "int8"}, "--quantize: is not an option of the torchscript backend"),
        ({"device": "tpu"}, "--device: expected cpu or cuda"),
    ],
)
def test_export_refuses_what_it_cannot_trace_before_writing(tiny_dirs, tmp_path, options, message):
    with pytest.raises(ArgumentError, match=message):
        export(tiny_dirs["sd"], "torchscript", tmp_path / "out", progress=False, **options)
    assert list(tmp_path.iterdir()) == []


def test_engine_refuses_another_device_and_unknown_options(ts_dirs):
    manifest = Manifest.read(ts_dirs["sd"])
    record = manifest.components["unet"]
    with pytest.raises(
        ArgumentError,
        match=r"traced on cpu and a traced graph keeps its device; re-export it traced on cuda .*device='cuda'",
    ):
        TorchScriptEngine.open(record, ts_dirs["sd"], manifest, device="cuda")  # fmt: skip
    with pytest.raises(
        ArgumentError, match="--engine-option data_parallel: is not an option of the torchscript engine"
    ):
        load_artifact(ts_dirs["sd"], data_parallel=True)


def test_damaged_model_pt_is_a_clear_error(ts_dirs, tmp_path):
    import json
    import shutil

    from difflower.artifact.manifest import sha256_file

    broken = tmp_path / "broken"
    shutil.copytree(ts_dirs["sd"], broken)
    path = broken / "unet" / "model.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"unet/model\.pt: differs from what was exported"):
        load_artifact(broken)  # changed after export: not opened at all
    manifest = json.loads((broken / "difflower.json").read_text())
    manifest["files"]["unet/model.pt"] = sha256_file(path)  # as if the export itself had written it broken
    (broken / "difflower.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"unet/model\.pt: TorchScript cannot load it .*re-export"):
        load_artifact(broken)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"unet/model\.pt: is missing"):
        load_artifact(broken)


def test_cli_export_generate_validate_info(tiny_dirs, ts_dirs, tmp_path, capsys):
    out = tmp_path / "art"
    command = ["export", str(tiny_dirs["sd"]), "--backend", "torchscript", "--out", str(out), "--components", "unet"]
    assert main(command) == 0
    assert "torchscript, fp32, static shapes" in capsys.readouterr().out
    image = tmp_path / "a.png"
    assert main(["generate", str(ts_dirs["sd"]), "--prompt", "a cat", "--steps", "2", "-o", str(image)]) == 0
    import PIL.Image

    pixels = np.asarray(PIL.Image.open(image))
    eager = load_pipeline(tiny_dirs["sd"])("a cat", num_inference_steps=2, seed=0, output_type="np", progress=False)
    assert compare(pixels.astype(np.float32), np.round(eager.images[0] * 255)).max_abs <= 1
    assert main(["validate", str(ts_dirs["sd"]), "--reference", str(tiny_dirs["sd"]), "--steps", "2"]) == 0
    assert main(["info", str(ts_dirs["sd"])]) == 0
    assert "backend torchscript" in capsys.readouterr().out
    assert main(["export", str(tiny_dirs["sd"]), "--backend", "torchscript", "--out", str(tmp_path / "x"),
                 "--static", "1x64x64", "--static", "1x32x32"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--static: torchscript traces one static shape" in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this torch sees none")
def test_cuda_traced_artifact_matches_eager(tiny_dirs, tmp_path):
    out = tmp_path / "cuda"
    manifest = export(tiny_dirs["sd"], "torchscript", out, device="cuda", progress=False)
    assert all(r.config["traced_on"] == "cuda" and r.parity.passed for r in manifest.components.values())
    assert validate_artifact(out, tiny_dirs["sd"], steps=2, device="cuda").passed
