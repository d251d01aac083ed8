"""ONNX export, the onnxruntime engine in the one loop, and `validate`, on the tiny checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from parity_helpers import assert_run_matches, sample_image, sample_mask  # noqa: E402

from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.cli import main  # noqa: E402
from difflower.driver import export
from difflower.errors import ArgumentError, CheckpointError  # noqa: E402
from difflower.exporters import onnx as onnx_exporter  # noqa: E402
from difflower.exporters.common import ExportParityError  # noqa: E402
from difflower.reference.pipeline import load_pipeline  # noqa: E402
from difflower.runtimes.engine import EngineInputError  # noqa: E402
from difflower.runtimes.pipeline import load_artifact  # noqa: E402
from difflower.validate.parity import validate_artifact  # noqa: E402

FAMILIES = ("sd", "sdxl", "sd3")


@pytest.fixture(scope="session")
def onnx_dirs(tiny_dirs, tmp_path_factory):
    """{(family, "dynamic" | "static"): artifact} exported once per session."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for family in FAMILIES:
        out[(family, "dynamic")] = root / f"{family}-dynamic"
        export(tiny_dirs[family], "onnx", out[(family, "dynamic")], progress=False)
        out[(family, "static")] = root / f"{family}-static"
        export(tiny_dirs[family], "onnx", out[(family, "static")], static=["1x64x64"], progress=False)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_txt2img_on_onnxruntime_matches_eager(tiny_dirs, onnx_dirs, family, shapes):
    artifact = load_artifact(onnx_dirs[(family, shapes)])
    eager = load_pipeline(tiny_dirs[family])
    a, _ = assert_run_matches(eager, artifact, prompt="a red castle", num_inference_steps=4, progress=False)
    assert a.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_other_tasks_on_onnxruntime(tiny_dirs, onnx_dirs, family, task):
    artifact = load_artifact(onnx_dirs[(family, "dynamic")])
    eager = load_pipeline(tiny_dirs[family])
    extra = {"image": sample_image()} if task == "img2img" else {"image": sample_image(), "mask_image": sample_mask()}
    assert_run_matches(eager, artifact, prompt="a tree", num_inference_steps=4, strength=0.75, progress=False, **extra)


@pytest.mark.parametrize(("family", "scheduler"), [("sd", "dpm++2m-karras"), ("sdxl", "euler-a"), ("sd", "ddim")])
def test_swapped_schedulers_and_batches_on_onnxruntime(tiny_dirs, onnx_dirs, family, scheduler):
    artifact = load_artifact(onnx_dirs[(family, "dynamic")], scheduler=scheduler)
    eager = load_pipeline(tiny_dirs[family], scheduler=scheduler)
    assert_run_matches(
        eager,
        artifact,
        prompt=["a cat", "a dog"],
        negative_prompt=["blurry", "ugly"],
        num_images_per_prompt=2,
        num_inference_steps=3,
        height=48,
        width=80,
        progress=False,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_passes_and_reports_the_drift(tiny_dirs, onnx_dirs, tmp_path, family):
    report = validate_artifact(onnx_dirs[(family, "static")], tiny_dirs[family], steps=3)
    assert report.passed
    data = report.to_json()
    # PNDM (the tiny SD checkpoint's scheduler) repeats one timestep in its PLMS warm-up: n + 1 calls.
    assert len(data["trajectory"]) == (4 if family == "sd" else 3)
    assert all(row["max_abs"] < 1e-4 for row in data["trajectory"])
    assert set(data["components"]) == set(Manifest.read(onnx_dirs[(family, "static")]).components)
    path = tmp_path / "report.json"
    assert main(["validate", str(onnx_dirs[(family, "dynamic")]), "--reference", str(tiny_dirs[family]),
                 "--steps", "2", "--json", str(path)]) == 0  # fmt: skip
    assert json.loads(path.read_text())["passed"] is True


def test_manifest_records_shapes_hashes_and_versions(tiny_dirs, onnx_dirs):
    static = Manifest.read(onnx_dirs[("sdxl", "static")])
    assert static.shapes == {
        "graph": "static",
        "buckets": [[1, 64, 64]],
        "cfg_doubles_denoiser_batch": True,
        "t5_sequence_length": 256,
    }
    unet = static.components["unet"]
    assert [t.shape for t in unet.inputs] == [(2, 4, 8, 8), (2,), (2, 77, 64), (2, 32), (2, 6)]  # CFG: batch 2
    assert static.components["vae_decoder"].inputs[0].shape == (1, 4, 8, 8)
    dynamic = Manifest.read(onnx_dirs[("sdxl", "dynamic")])
    assert dynamic.components["unet"].inputs[0].shape == ("denoiser_batch", 4, "latent_height", "latent_width")
    assert set(dynamic.versions) >= {"torch", "onnx", "onnxruntime", "difflower"}
    import hashlib

    unet_file = tiny_dirs["sdxl"] / "unet" / "diffusion_pytorch_model.safetensors"
    assert (
        dynamic.source["files"]["unet/diffusion_pytorch_model.safetensors"]
        == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    )
    assert all(r.parity.passed for r in dynamic.components.values())


def test_static_artifact_refuses_other_sizes_before_any_work(onnx_dirs):
    artifact = load_artifact(onnx_dirs[("sd", "static")])
    with pytest.raises(ArgumentError, match=r"built for 1x64x64 \(BxHxW\); asked for 1x64x72"):
        artifact("a cat", width=72, num_inference_steps=2, progress=False)
    with pytest.raises(ArgumentError, match="guidance_scale"):
        artifact("a cat", guidance_scale=1.0, num_inference_steps=2, progress=False)


def test_engine_checks_names_dtypes_and_shapes(onnx_dirs):
    artifact = load_artifact(onnx_dirs[("sd", "static")])
    unet = artifact.unet
    good = {
        "sample": torch.zeros(2, 4, 8, 8),
        "timestep": torch.zeros(2),
        "encoder_hidden_states": torch.zeros(2, 77, 32),
    }
    assert unet(good)["out_sample"].shape == (2, 4, 8, 8)
    with pytest.raises(EngineInputError, match=r"unet: input 'sample' has shape \(2, 4, 16, 8\) but the artifact"):
        unet({**good, "sample": torch.zeros(2, 4, 16, 8)})
    with pytest.raises(EngineInputError, match="unet: input 'timestep' is float64, the artifact takes float32"):
        unet({**good, "timestep": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(EngineInputError, match=r"missing \['encoder_hidden_states'\]"):
        unet({k: v for k, v in good.items() if k != "encoder_hidden_states"})
    dynamic = load_artifact(onnx_dirs[("sd", "dynamic")]).unet
    with pytest.raises(EngineInputError, match="dim 'denoiser_batch' is 2 in one input and 3"):
        dynamic({**good, "timestep": torch.zeros(3)})


# -- broken artifacts and interrupted exports ------------------------------------------------


def test_truncated_component_is_a_clear_error(onnx_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dirs[("sd", "dynamic")], broken)
    path = broken / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"unet/model\.onnx: ONNX Runtime cannot load it.*truncated or corrupt"):
        load_artifact(broken)


def test_edited_manifest_shape_is_caught(onnx_dirs, tmp_path, tiny_dirs, capsys):
    broken = tmp_path / "edited"
    shutil.copytree(onnx_dirs[("sd", "static")], broken)
    raw = json.loads((broken / "difflower.json").read_text())
    raw["components"]["unet"]["inputs"][0]["shape"] = [2, 4, 16, 16]
    (broken / "difflower.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"difflower\.json: component 'unet' input 'sample' is \[2, 4, 16, 16\]"):
        load_artifact(broken)
    assert main(["validate", str(broken), "--reference", str(tiny_dirs["sd"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "component 'unet' input 'sample'" in err[0]


def test_missing_manifest_and_wrong_reference(onnx_dirs, tiny_dirs, tmp_path):
    with pytest.raises(CheckpointError, match=r"difflower\.json: not found"):
        load_artifact(tmp_path)
    from difflower.validate.parity import SourceMismatchError

    with pytest.raises(SourceMismatchError, match="not the checkpoint this artifact was exported from"):
        validate_artifact(onnx_dirs[("sd", "dynamic")], tiny_dirs["sdxl"])


def test_interrupted_export_leaves_no_folder(tiny_dirs, tmp_path, monkeypatch):
    from difflower import driver

    real = driver.write_component
    calls: list[str] = []

    def interrupt_second(plan, spec, out):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(plan, spec, out)

    monkeypatch.setattr(driver, "write_component", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_dirs["sd"], "onnx", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_parity_miss_fails_the_export_unless_allowed(tiny_dirs, tmp_path, monkeypatch):
    real = onnx_exporter.torch_export

    def export_perturbed(module, inputs, spec, path, dynamic, external, contrib=False):
        """Write a graph whose weights differ from the reference: the backend computes something else."""
        if spec.name != "unet":
            return real(module, inputs, spec, path, dynamic, external, contrib)
        weight = module.unet.conv_out.weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.05)
        real(module, inputs, spec, path, dynamic, external, contrib)
        with torch.no_grad():
            weight.copy_(original)

    monkeypatch.setattr(onnx_exporter, "torch_export", export_perturbed)
    with pytest.raises(ExportParityError, match=r"parity gate missed by unet .*nothing was written"):
        export(tiny_dirs["sd"], "onnx", tmp_path / "out", components=["unet"], progress=False)
    assert not (tmp_path / "out").exists()
    manifest = export(
        tiny_dirs["sd"], "onnx", tmp_path / "out", components=["unet"], allow_mismatch=True, progress=False
    )
    assert manifest.components["unet"].parity.passed is False
    assert manifest.components["unet"].parity.max_abs > 1e-2
    assert Manifest.read(tmp_path / "out").components["unet"].parity.passed is False


def test_large_components_use_one_external_data_file(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exporter, "PROTOBUF_LIMIT", 0)  # every component counts as "over 2 GB"
    manifest = export(tiny_dirs["sd"], "onnx", tmp_path / "out", components=["unet"], progress=False)
    assert manifest.components["unet"].files == ["unet/config.json", "unet/model.onnx", "unet/model.onnx_data"]
    graph = (tmp_path / "out" / "unet" / "model.onnx").stat().st_size
    weights = (tmp_path / "out" / "unet" / "model.onnx_data").stat().st_size
    assert weights > 5 * graph  # the weights live outside the protobuf (tensors under 1 KB stay inline)
    assert manifest.components["unet"].parity.passed


def test_existing_output_refused_and_component_subset(tiny_dirs, onnx_dirs, tmp_path):
    with pytest.raises(ArgumentError, match="already exists; pass --overwrite"):
        export(tiny_dirs["sd"], "onnx", onnx_dirs[("sd", "dynamic")], progress=False)
    with pytest.raises(ArgumentError, match="--components: unknown transformer; this checkpoint has text_encoder"):
        export(tiny_dirs["sd"], "onnx", tmp_path / "x", components=["transformer"], progress=False)
    with pytest.raises(ArgumentError, match="--static: expected BATCHxHEIGHTxWIDTH"):
        export(tiny_dirs["sd"], "onnx", tmp_path / "x", static=["512x512"], progress=False)
    with pytest.raises(ArgumentError, match="--static: 1x72x64: height and width must be multiples of 16"):
        export(tiny_dirs["sd3"], "onnx", tmp_path / "x", static=["1x72x64"], progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_export_generate_info(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["export", str(tiny_dirs["sd"]), "--backend", "onnx", "--out", str(out), "--static", "1x64x64"]) == 0
    assert "unet" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "a cat", "--steps", "2", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "backend onnx" in text and "sample float32[2,4,8,8]" in text
    with pytest.raises(SystemExit):
        main(["export", str(tiny_dirs["sd"]), "--backend", "tflite", "--out", str(tmp_path / "t")])
    assert "argument --backend: invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_fused_attention_variant(tiny_dirs, tmp_path, family):
    """ORT's fused MultiHeadAttention: same numbers, recorded as a pass, fewer Softmax nodes in the graph."""
    import onnx

    out = tmp_path / "fused"
    manifest = export(tiny_dirs[family], "onnx", out, attention="onnxruntime", progress=False)
    denoiser = "transformer" if family == "sd3" else "unet"
    applied = {p["component"]: p for p in manifest.passes}
    assert applied[denoiser]["name"] == "attention" and applied[denoiser]["rewrites"]["attention modules"] > 0
    graph = onnx.load(str(out / denoiser / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == applied[denoiser]["rewrites"]["attention modules"]
    assert ops.count("Softmax") == 0
    assert all(r.parity.passed for r in manifest.components.values())
    assert_run_matches(
        load_pipeline(tiny_dirs[family]), load_artifact(out), prompt="a cat", num_inference_steps=3, progress=False
    )


def test_components_carry_their_config_in_optimums_layout(tiny_dirs, onnx_dirs):
    """optimum's ORTStableDiffusionPipeline (and optimum-intel, OpenVINO GenAI) read
    <component>/config.json: the model's own config, the VAE's for both VAE halves."""
    artifact, source = onnx_dirs[("sdxl", "dynamic")], tiny_dirs["sdxl"]
    for name, record in Manifest.read(artifact).components.items():
        assert f"{name}/config.json" in record.files
        origin = "vae" if name.startswith("vae_") else name
        assert (artifact / name / "config.json").read_bytes() == (source / origin / "config.json").read_bytes()


def test_arena_settings_keep_the_images(sd_onnx):
    """`arena=shrink` / `arena=false` change where activations live, never the numbers."""
    import numpy as np

    import difflower

    def image(**options):
        pipe = difflower.load(sd_onnx, threads=1, **options)
        return pipe("a red castle", num_inference_steps=2, seed=3, output_type="np", progress=False).images

    expected = image()
    for value in ("shrink", "false"):  # as --engine-option arena=... passes them
        np.testing.assert_array_equal(image(arena=value), expected)
    with pytest.raises(ArgumentError, match="--engine-option arena: expected true, false or shrink, got 'maybe'"):
        difflower.load(sd_onnx, arena="maybe")
