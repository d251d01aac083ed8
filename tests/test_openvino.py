"""OpenVINO: export from the reference modules, the openvino engine in the one loop, reshape,
cache, and nncf compression, on the tiny checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("nncf", reason="the openvino extra is not installed")

from parity_helpers import assert_run_matches  # noqa: E402

import difflower  # noqa: E402
from difflower.artifact.manifest import Manifest  # noqa: E402
from difflower.errors import ArgumentError, CheckpointError  # noqa: E402
from difflower.reference.pipeline import load_pipeline  # noqa: E402
from difflower.runtimes.pipeline import load_artifact  # noqa: E402

FAMILIES = ("sd", "sdxl", "sd3")


@pytest.fixture(scope="session")
def ov_dirs(tiny_dirs, tmp_path_factory):
    """{(family, "dynamic" | "static"): artifact}, exported once per session: every family
    dynamic, SD static at export too (the others go static by reshaping at load)."""
    root = tmp_path_factory.mktemp("openvino")
    out = {}
    for family, shapes in [*((f, "dynamic") for f in FAMILIES), ("sd", "static")]:
        out[(family, shapes)] = root / f"{family}-{shapes}"
        static = ["1x64x64"] if shapes == "static" else []
        difflower.export(tiny_dirs[family], "openvino", out[(family, shapes)], static=static, progress=False)
    return out


@pytest.fixture(scope="session")
def compressed_dirs(tiny_dirs, tmp_path_factory):
    """The tiny SD checkpoint with int8 weights, hybrid int8, and fp16 weight storage."""
    root = tmp_path_factory.mktemp("openvino-compressed")
    out = {
        "int8-weight": root / "int8-weight",
        "int8": root / "int8",
        "fp16": root / "fp16",
    }
    difflower.export(tiny_dirs["sd"], "openvino", out["int8-weight"], quantize="int8-weight", progress=False)
    difflower.export(
        tiny_dirs["sd"], "openvino", out["int8"], quantize="int8", calibration_prompts=3, calibration_steps=4,
        progress=False,
    )  # fmt: skip
    difflower.export(tiny_dirs["sd"], "openvino", out["fp16"], precision="fp16", progress=False)
    return out


@pytest.mark.parametrize(
    ("family", "shapes"),
    [("sd", "dynamic"), ("sdxl", "dynamic"), ("sd3", "dynamic"), ("sd", "static"), ("sdxl", "reshaped"),
     ("sd3", "reshaped")],
)  # fmt: skip
def test_openvino_matches_eager_and_validates(tiny_dirs, ov_dirs, family, shapes):
    """fp32 gates, dynamic and static: static at export (sd) or reshaped at load (sdxl, sd3)."""
    artifact = ov_dirs[(family, "static" if shapes == "static" else "dynamic")]
    manifest = Manifest.read(artifact)
    assert manifest.backend == "openvino" and all(r.parity.passed for r in manifest.components.values())
    assert all((artifact / name / "openvino_model.xml").is_file() for name in manifest.components)
    options = {"static": (1, 64, 64)} if shapes == "reshaped" else {}
    assert_run_matches(load_pipeline(tiny_dirs[family]), load_artifact(artifact, **options), prompt="a red castle",
                       num_inference_steps=3, progress=False)  # fmt: skip
    report = difflower.validate(artifact, tiny_dirs[family], steps=3, engine_options=options)
    assert report.passed, report.to_json()


def test_every_task_and_a_swapped_scheduler(tiny_dirs, ov_dirs):
    import PIL.Image

    pixels = np.stack([*np.meshgrid(np.arange(64), np.arange(64)), np.full((64, 64), 30)], -1) * 3
    image = PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    mask = PIL.Image.fromarray(((np.arange(64)[None, :] > 32) * 255).repeat(64, 0).astype(np.uint8))
    eager = load_pipeline(tiny_dirs["sdxl"], scheduler="dpm++2m")
    artifact = load_artifact(ov_dirs[("sdxl", "dynamic")], scheduler="dpm++2m")
    for extra in ({"image": image}, {"image": image, "mask_image": mask}):
        assert_run_matches(eager, artifact, prompt="a tree", num_inference_steps=4, strength=0.75, progress=False,
                           **extra)  # fmt: skip


def test_static_artifact_refuses_other_sizes(ov_dirs):
    artifact = load_artifact(ov_dirs[("sd", "static")])
    with pytest.raises(ArgumentError, match=r"built for 1x64x64 \(BxHxW\); asked for 1x48x64"):
        artifact("a cat", height=48, num_inference_steps=1, progress=False)
    with pytest.raises(ArgumentError, match="built static for 1x64x64; it cannot be reshaped to 1x48x48"):
        load_artifact(ov_dirs[("sd", "static")], static=(1, 48, 48))


def test_dynamic_artifact_reshaped_at_load(tiny_dirs, ov_dirs):
    reshaped = difflower.load(ov_dirs[("sd3", "dynamic")], static=(1, 64, 64))
    assert reshaped.transformer.record.inputs[0].shape == (2, 16, 8, 8)  # CFG-doubled batch, 8x8 latents
    assert_run_matches(load_pipeline(tiny_dirs["sd3"]), reshaped, prompt="a cat", num_inference_steps=2,
                       progress=False)  # fmt: skip
    with pytest.raises(ArgumentError, match=r"built for 1x64x64 \(BxHxW\); asked for 1x96x64"):
        reshaped("a cat", height=96, num_inference_steps=1, progress=False)


def test_compiled_model_cache_skips_compilation(ov_dirs, tmp_path):
    cache = tmp_path / "ov-cache"
    first = load_artifact(ov_dirs[("sd", "dynamic")], cache_dir=str(cache))
    assert not first.unet.loaded_from_cache
    assert any(cache.iterdir())
    second = load_artifact(ov_dirs[("sd", "dynamic")], cache_dir=str(cache))
    assert second.unet.loaded_from_cache and second.vae_decoder.loaded_from_cache


def test_int8_weights_pass_int8_gates_and_shrink(tiny_dirs, ov_dirs, compressed_dirs):
    manifest = Manifest.read(compressed_dirs["int8-weight"])
    fp32 = Manifest.read(ov_dirs[("sd", "dynamic")])
    assert manifest.precision == "int8"
    assert manifest.components["unet"].size_bytes < 0.6 * fp32.components["unet"].size_bytes
    # the tiny text encoder's embeddings and norms stay float, a large share at this width
    assert manifest.components["text_encoder"].size_bytes < 0.8 * fp32.components["text_encoder"].size_bytes
    compressed = {p["component"]: p for p in manifest.passes}
    assert set(compressed) == {"unet", "text_encoder"}  # the VAE keeps its weights
    assert compressed["unet"]["rewrites"]["int8 weight tensors"] > 0
    report = difflower.validate(compressed_dirs["int8-weight"], tiny_dirs["sd"], steps=3)
    assert report.passed, report.to_json()
    assert report.image["gate"] == "PSNR >= 25 dB"


def test_hybrid_int8_quantizes_denoiser_activations(tiny_dirs, compressed_dirs):
    manifest = Manifest.read(compressed_dirs["int8"])
    passes = {p["component"]: p for p in manifest.passes}
    assert passes["unet"]["rewrites"]["int8 activation quantizers"] > 0
    # 3 prompts x 5 denoiser calls (4 PNDM steps: its PLMS warm-up repeats one timestep)
    assert passes["unet"]["settings"]["calibration_samples"] == 3 * 5
    assert "int8 activation quantizers" not in passes["vae_decoder"]["rewrites"]  # weight-only
    report = difflower.validate(compressed_dirs["int8"], tiny_dirs["sd"], steps=3)
    assert report.passed, report.to_json()


def test_fp16_weight_storage(tiny_dirs, ov_dirs, compressed_dirs):
    manifest = Manifest.read(compressed_dirs["fp16"])
    fp32 = Manifest.read(ov_dirs[("sd", "dynamic")])
    assert manifest.precision == "fp16"
    assert manifest.components["unet"].size_bytes < 0.6 * fp32.components["unet"].size_bytes
    assert all(r.parity.passed for r in manifest.components.values())  # fp16 gates at export
    report = difflower.validate(compressed_dirs["fp16"], tiny_dirs["sd"], steps=3)
    # The tiny random UNet sits on the fp16 cosine bound (0.9990 on the export's inputs, 0.99897 on
    # validate's); its PSNR, the trajectory and the image clear their fp16 gates with margin.
    assert all(m.psnr >= 35 for c in report.components.values() for m in c.outputs.values())
    assert report.final_latents["passed"] and report.image["passed"]


def test_bad_options_are_one_line_errors(tiny_dirs, ov_dirs, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ArgumentError, match="--quantize: openvino offers int8-weight, int4-weight, int8"):
        difflower.export(tiny_dirs["sd"], "openvino", out, quantize="int2", progress=False)
    with pytest.raises(ArgumentError, match="--attention: onnxruntime's fused attention"):
        difflower.export(tiny_dirs["sd"], "openvino", out, attention="onnxruntime", progress=False)
    with pytest.raises(ArgumentError, match="--precision: openvino stores weights as fp32 or fp16"):
        difflower.export(tiny_dirs["sd"], "openvino", out, precision="bf16", progress=False)
    with pytest.raises(ArgumentError, match="--auto-cast: is not an option of the openvino backend"):
        difflower.export(tiny_dirs["sd"], "openvino", out, auto_cast="all", progress=False)
    assert not out.exists()
    with pytest.raises(ArgumentError, match="--device: openvino runs on cpu, gpu, npu, auto"):
        load_artifact(ov_dirs[("sd", "dynamic")], device="tpu")
    with pytest.raises(ArgumentError, match="--engine-option color"):
        load_artifact(ov_dirs[("sd", "dynamic")], color="blue")


def test_truncated_ir_is_a_clear_error(ov_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ov_dirs[("sd", "dynamic")], broken)
    xml = broken / "unet" / "openvino_model.xml"
    xml.write_text(xml.read_text()[:2000])
    with pytest.raises(CheckpointError, match=r"unet/openvino_model\.xml: OpenVINO cannot read it"):
        load_artifact(broken)


def test_tokenizers_are_also_written_as_openvino_models(ov_dirs):
    """optimum-intel's layout, read by OpenVINO GenAI: tokenizer/openvino_tokenizer.xml and the
    detokenizer, which tokenize a prompt to the same ids as the transformers tokenizer."""
    pytest.importorskip("openvino_tokenizers", reason="openvino-tokenizers (the openvino extra) is not installed")
    import openvino as ov
    import transformers

    artifact = ov_dirs[("sdxl", "dynamic")]
    manifest = Manifest.read(artifact)
    for suffix in ("", "_2"):
        folder = artifact / f"tokenizer{suffix}"
        assert (
            manifest.components[f"text_encoder{suffix}"].config["openvino_tokenizer"].endswith("openvino_tokenizer.xml")
        )
        assert (folder / "openvino_detokenizer.xml").is_file()
        assert f"tokenizer{suffix}/openvino_tokenizer.bin" in manifest.files  # hashed like every file
        compiled = ov.Core().compile_model(str(folder / "openvino_tokenizer.xml"), "CPU")
        got = compiled(["a red castle"])["input_ids"][0].tolist()
        expected = transformers.AutoTokenizer.from_pretrained(folder)("a red castle").input_ids
        assert got[: len(expected)] == expected


def test_validate_judges_by_the_lowest_of_stored_and_computed_precision():
    from types import SimpleNamespace

    from difflower.validate.parity import judged_precision

    def engine(computes):
        return SimpleNamespace(compute_precision=computes)

    assert judged_precision("fp32", [engine(None), engine(None)]) == "fp32"
    assert judged_precision("fp32", [engine(None), engine("bf16")]) == "bf16"
    assert judged_precision("fp16", [engine("bf16")]) == "fp16"  # the same row of the gates
    assert judged_precision("int8", [engine("bf16")]) == "int8"  # already judged lower


BF16_UNITS = any(flag in Path("/proc/cpuinfo").read_text().split() for flag in ("avx512_bf16", "amx_bf16"))


@pytest.mark.skipif(not BF16_UNITS, reason="OpenVINO's bf16 float ops need a CPU with AVX512-BF16 or AMX")
def test_validate_judges_bf16_float_ops_by_the_half_precision_gates(tiny_dirs, ov_dirs):
    """An fp32 IR run with OpenVINO's bf16 float ops computes in bf16: validate holds it to the
    bf16 gates (the fp32 ones would fail it for rounding it was asked to do), and says so."""
    artifact = ov_dirs[("sd", "static")]
    options = {"inference_precision": "bf16"}
    engines = load_artifact(artifact, **options).engines
    assert {e.compute_precision for e in engines.values()} == {"bf16"}
    report = difflower.validate(artifact, tiny_dirs["sd"], steps=2, engine_options=options)
    assert report.precision == "bf16" and "the artifact is fp32" in report.settings["judged_as"]
    assert report.final_latents["gate"] == "PSNR >= 30 dB"  # the half-precision row, not fp32's tolerance
    plain = difflower.validate(artifact, tiny_dirs["sd"], steps=2)
    assert plain.precision == "fp32" and "judged_as" not in plain.settings
