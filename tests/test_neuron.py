"""AWS Neuron backend: everything up to the compile call, tested on the CPU.

torch_neuronx (AWS's package index, inf2/trn1/trn2 instances) is not on the development
machines. Here:

- the compiler-flag mapping and the option checks are pure functions, tested as they are;
- the missing-SDK error is the real one;
- the per-process compile orchestration, the artifact layout and the engine's CFG split run
  with `cpu_stand_in_compile` IN PLACE OF `torch_neuronx.trace`: a plain `torch.jit.trace`,
  labelled as the stand-in it is. It checks what difflower does around the compiler, never
  the compiler: Neuron numerics and on-device parity are tested only where the SDK is present
  (`test_real_neuron_export_and_data_parallel_validate`, skipped elsewhere with its reason).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from dataclasses import replace

import pytest
import torch

from difflower.artifact import formats
from difflower.artifact.manifest import Manifest
from difflower.artifact.specs import ComponentSpec, UNetExport, load_export_module
from difflower.cli import main
from difflower.driver import export
from difflower.errors import ArgumentError
from difflower.exporters.neuron import (
    NeuronCompileError,
    NeuronExporter,
    cast_settings,
    compiler_args,
)
from difflower.runtimes import neuron_engine
from difflower.runtimes.engine import EngineInputError
from difflower.runtimes.neuron_engine import CfgSplit, NeuronEngine, cores_for
from difflower.validate.parity import validate_artifact

SDK_PROBLEM = formats.neuron_unavailable()


def cpu_stand_in_compile(module, inputs, args, workdir):
    """STAND-IN for torch_neuronx.trace, which is not installed here: a CPU torch.jit.trace.

    It runs in the compile's own process exactly where the Neuron compile would. A file
    `kill-<wrapper class>` in the compile cache makes it kill its own process with SIGKILL for
    that component, as the kernel's out-of-memory killer would end a compile.
    """
    if (workdir.parent.parent / f"kill-{type(module).__name__}").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, inputs, check_trace=False)


@pytest.fixture
def cpu_in_place_of_neuron(monkeypatch):
    """The SDK check passes and placing a module on a NeuronCore does nothing (the stand-in runs on the CPU)."""
    monkeypatch.setattr(formats, "neuron_unavailable", lambda: None)
    monkeypatch.setattr(neuron_engine, "place_on_core", lambda module, core: None)


def stand_in_export(checkpoint, out, cache, components, **options):
    """The export with the neuron backend whose compile is `cpu_stand_in_compile`."""
    exporter = NeuronExporter(compile_fn=cpu_stand_in_compile)
    return export(
        checkpoint,
        "neuron",
        out,
        components=components,
        progress=False,
        compile_cache=str(cache),
        exporter=exporter,
        **options,
    )


@pytest.fixture(scope="module")
def stand_in_artifact(tiny_dirs, tmp_path_factory):
    """A tiny SD neuron artifact (text encoder, UNet, VAE decoder) compiled by the CPU stand-in."""
    root = tmp_path_factory.mktemp("neuron")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats, "neuron_unavailable", lambda: None)
        patch.setattr(neuron_engine, "place_on_core", lambda module, core: None)
        manifest = stand_in_export(
            tiny_dirs["sd"], root / "art", root / "cache", ["text_encoder", "unet", "vae_decoder"]
        )
    return root / "art", root / "cache", manifest


# -- the compiler flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "flags", "expected"),
    [
        ("fp32", {}, ["--auto-cast", "none"]),
        ("fp32", {"auto_cast": "none"}, ["--auto-cast", "none"]),
        ("bf16", {}, ["--auto-cast", "matmult", "--auto-cast-type", "bf16"]),
        ("bf16", {"auto_cast": "all"}, ["--auto-cast", "all", "--auto-cast-type", "bf16"]),
        ("fp16", {"auto_cast": "matmul"}, ["--auto-cast", "matmult", "--auto-cast-type", "fp16"]),
        ("fp16", {"auto_cast_type": "tf32"}, ["--auto-cast", "matmult", "--auto-cast-type", "tf32"]),
        ("bf16", {"auto_cast": "all", "auto_cast_type": "bf16"}, ["--auto-cast", "all", "--auto-cast-type", "bf16"]),
    ],
)
def test_auto_cast_flags_map_to_neuronx_cc(precision, flags, expected):
    spec = ComponentSpec("unet", "unet", "unet", "UNet2DConditionModel", (), (), {})
    assert compiler_args(spec, cast_settings(precision, flags)) == [*expected, "--model-type", "unet-inference"]


@pytest.mark.parametrize(
    ("name", "kind", "class_name", "model_type"),
    [
        ("unet", "unet", "UNet2DConditionModel", "unet-inference"),
        ("vae_decoder", "vae_decoder", "AutoencoderKL", "unet-inference"),
        ("transformer", "transformer", "SD3Transformer2DModel", "transformer"),
        ("text_encoder", "text_encoder", "CLIPTextModel", "transformer"),
        ("text_encoder_2", "text_encoder", "CLIPTextModelWithProjection", "transformer"),
        ("text_encoder_3", "text_encoder", "T5EncoderModel", "unet-inference"),
    ],
)
def test_model_type_hint_per_component(name, kind, class_name, model_type):
    spec = ComponentSpec(name, kind, name, class_name, (), (), {})
    assert compiler_args(spec, cast_settings("fp32", {}))[-2:] == ["--model-type", model_type]


@pytest.mark.parametrize(
    ("precision", "flags", "message"),
    [
        ("fp32", {"auto_cast": "matmul"}, "--auto-cast: matmul casts fp32 operations down; pass --precision bf16"),
        ("bf16", {"auto_cast": "none"}, "--auto-cast: none keeps the reference's fp32; --precision bf16 needs"),
        ("fp32", {"auto_cast_type": "bf16"}, "--auto-cast-type: has nothing to cast with --auto-cast none"),
        ("bf16", {"auto_cast_type": "fp16"}, "--auto-cast-type: fp16 contradicts --precision bf16"),
        ("fp16", {"auto_cast": "matmult"}, "--auto-cast: must be one of none, matmul, all"),
        ("fp16", {"auto_cast_type": "fp8_e4m3"}, "--auto-cast-type: must be one of bf16, fp16, tf32"),
    ],
)
def test_contradicting_cast_flags_are_refused(precision, flags, message):
    with pytest.raises(ArgumentError, match=message):
        cast_settings(precision, flags)


# -- without the SDK ---------------------------------------------------------------------------


@pytest.mark.skipif(SDK_PROBLEM is None, reason="torch_neuronx and a NeuronCore are present: no missing-SDK error")
def test_without_the_sdk_export_stops_at_once_with_one_line(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "neuron"
    assert main(["export", str(tiny_dirs["sd"]), "--backend", "neuron", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("difflower export: error: argument --backend: neuron needs")
    if "not installed" in err[0]:  # the machine has no torch_neuronx (else: no NeuronCore)
        assert "torch-neuronx" in err[0] and "https://pip.repos.neuron.amazonaws.com" in err[0]
    assert "inf2/trn1/trn2" in err[0]
    with pytest.raises(ArgumentError, match="neuron needs"):
        export(tiny_dirs["sd"], "neuron", out, compile_cache=str(tmp_path / "cache"), auto_cast="matmul")
    assert list(tmp_path.iterdir()) == []  # no artifact, no partial folder, no compile cache


@pytest.mark.skipif(SDK_PROBLEM is None, reason="torch_neuronx and a NeuronCore are present: no missing-SDK error")
def test_without_the_sdk_the_engine_stops_with_one_line(stand_in_artifact, tmp_path, capsys):
    art, _, _ = stand_in_artifact
    image = tmp_path / "a.png"
    assert main(["generate", str(art), "--prompt", "a cat", "--steps", "2", "-o", str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflower generate: error: argument --engine: neuron needs")
    assert not image.exists()


# -- the compile orchestration and the artifact, with the CPU stand-in --------------------------


def test_stand_in_artifact_layout_and_compile_records(stand_in_artifact):
    art, cache, manifest = stand_in_artifact
    assert manifest.backend == "neuron"
    assert Manifest.read(art).shapes["buckets"] == [[1, 64, 64]]  # static: the checkpoint's size, one image
    unet = manifest.components["unet"]
    assert unet.files == ["unet/config.json", "unet/model.neuron"]
    assert [t.shape for t in unet.inputs] == [(2, 4, 8, 8), (2,), (2, 77, 32)]  # the engine takes the CFG batch
    config = unet.config
    assert config["compiler"] == f"{__name__}.cpu_stand_in_compile"
    assert config["compiler_args"] == ["--auto-cast", "none", "--model-type", "unet-inference"]
    assert config["inline_weights_to_neff"] is False
    assert config["cfg_halves"] == 2 and config["compiled_batch"] == 1  # compiled per CFG half
    assert config["compile_seconds"] > 0 and config["compile_cached"] is False
    assert manifest.components["text_encoder"].config["cfg_halves"] == 1
    assert manifest.components["text_encoder"].config["compiler_args"][-1] == "transformer"
    assert all(r.parity.passed for r in manifest.components.values())
    # the compiled module itself takes one half's batch
    compiled = torch.jit.load(str(art / "unet" / "model.neuron"))
    half = compiled(torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, 77, 32))[0]
    assert half.shape == (1, 4, 8, 8)
    # each compile sits in the cache with its log and time; the compiler's intermediates are gone
    entries = sorted(p for p in cache.iterdir())
    assert len(entries) == 3
    assert all((e / "model.neuron").is_file() and (e / "compile.json").is_file() for e in entries)
    assert not any((e / "workdir").exists() for e in entries)


def test_data_parallel_pipeline_matches_eager_at_fp32_gates(tiny_dirs, stand_in_artifact, cpu_in_place_of_neuron):
    art, _, _ = stand_in_artifact
    report = validate_artifact(art, tiny_dirs["sd"], steps=3, engine_options={"data_parallel": True})
    assert report.settings["engine"] == "neuron"
    assert report.passed and report.final_latents["max_abs"] < 1e-4
    assert report.image["psnr"] is None or report.image["psnr"] >= 40


def test_a_killed_compile_fails_clearly_and_keeps_the_others(tiny_dirs, tmp_path, cpu_in_place_of_neuron):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kill-VAEDecoderExport").touch()
    with pytest.raises(NeuronCompileError, match=r"compiling vae_decoder failed \(killed by SIGKILL, the usual sign"):
        stand_in_export(tiny_dirs["sd"], tmp_path / "out", cache, ["vae_encoder", "vae_decoder"])
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    kept = [e for e in cache.iterdir() if (e / "model.neuron").is_file()]
    assert len(kept) == 1  # the VAE encoder, compiled before the failure

    (cache / "kill-VAEDecoderExport").unlink()
    manifest = stand_in_export(tiny_dirs["sd"], tmp_path / "out", cache, ["vae_encoder", "vae_decoder"])
    assert manifest.components["vae_encoder"].config["compile_cached"] is True  # reused, not compiled again
    assert manifest.components["vae_decoder"].config["compile_cached"] is False
    assert all(r.parity.passed for r in manifest.components.values())


def test_a_compile_error_names_its_log(tiny_dirs, tmp_path, cpu_in_place_of_neuron):
    with pytest.raises(
        NeuronCompileError, match=r"compiling vae_decoder failed \(exit status 1: .*TypeError.*log .*compile\.log"
    ):
        export(
            tiny_dirs["sd"],
            "neuron",
            tmp_path / "out",
            components=("vae_decoder",),
            progress=False,
            compile_cache=str(tmp_path),
            exporter=NeuronExporter(compile_fn=_broken_compile),
        )
    assert not (tmp_path / "out").exists()


def _broken_compile(module, inputs, args, workdir):
    """A compile that raises in the child process, as a compiler error would."""
    raise TypeError("the stand-in compiler rejects this graph")


def test_export_options_are_checked_before_any_compile(tiny_dirs, tmp_path, cpu_in_place_of_neuron):
    for flags, message in [
        ({"quantize": "int8"}, "--quantize: is not an option of the neuron backend"),
        ({"auto_cast": "matmul"}, "--auto-cast: matmul casts fp32 operations down"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            export(
                tiny_dirs["sd"], "neuron", tmp_path / "out", progress=False, compile_cache=str(tmp_path / "c"), **flags
            )
    with pytest.raises(ArgumentError, match="--static: neuron traces one static shape; got 2"):
        export(tiny_dirs["sd"], "neuron", tmp_path / "out", static=["1x64x64", "2x64x64"], progress=False)
    assert list(tmp_path.iterdir()) == []


# -- the engine's CFG split over two cores, TorchScript modules standing in for NeuronCore ones --


class Recording:
    """A replica that records which thread ran it on which rows."""

    def __init__(self, module):
        self.module = module
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __call__(self, *args):
        self.calls.append((threading.current_thread().name, args[0].clone()))
        return self.module(*args)


def test_data_parallel_splits_the_cfg_batch_over_two_cores(tiny_dirs, tmp_path):
    from difflower.artifact.specs import component_specs
    from difflower.reference.loading import read_model_index

    spec = next(s for s in component_specs(read_model_index(tiny_dirs["sd"])) if s.name == "unet")
    eager = load_export_module(spec, tiny_dirs["sd"])
    assert isinstance(eager, UNetExport)
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 500.0), torch.randn(2, 77, 32, generator=gen))
    with torch.no_grad():
        expected = eager(*batch)[0]
    half = tuple(t[:1] for t in batch)
    cores = [Recording(cpu_stand_in_compile(eager, half, [], tmp_path / "c" / "w")) for _ in range(2)]  # per core

    got = CfgSplit(cores, halves=2)(*batch)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # negative prompts on core 0, positive on core 1, at the same time on two threads
    assert torch.equal(cores[0].calls[0][1], batch[0][:1]) and torch.equal(cores[1].calls[0][1], batch[0][1:])
    assert cores[0].calls[0][0] != cores[1].calls[0][0]
    # one core: both halves on it, one after the other; guidance is never dropped
    single = Recording(cores[0].module)
    torch.testing.assert_close(CfgSplit([single], halves=2)(*batch)[0], expected, atol=1e-5, rtol=0)
    assert [torch.equal(rows, batch[0][i : i + 1]) for i, (_, rows) in enumerate(single.calls)] == [True, True]
    assert not torch.allclose(got[0], got[1])  # the two halves really are different predictions


def test_engine_places_replicas_and_checks_shapes(stand_in_artifact, cpu_in_place_of_neuron, monkeypatch):
    art, _, manifest = stand_in_artifact
    placed: list[tuple[str, int]] = []
    monkeypatch.setattr(neuron_engine, "place_on_core", lambda module, core: placed.append(core))
    record = manifest.components["unet"]
    engine = NeuronEngine.open(record, art, manifest, data_parallel="true")  # as --engine-option writes it
    assert placed == [0, 1] and len(engine.module.replicas) == 2
    NeuronEngine.open(manifest.components["vae_decoder"], art, manifest, data_parallel=True)
    assert placed == [0, 1, 0]  # only the denoiser is split
    good = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.full((2,), 9.0),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }
    assert engine(good)["out_sample"].shape == (2, 4, 8, 8)
    with pytest.raises(EngineInputError, match=r"unet: input 'sample' has shape \(1, 4, 8, 8\) but the artifact"):
        engine({**good, "sample": torch.randn(1, 4, 8, 8)})
    with pytest.raises(ArgumentError, match="--engine-option data_parallel: expected true or false"):
        NeuronEngine.open(record, art, manifest, data_parallel="maybe")
    with pytest.raises(ArgumentError, match="--engine-option cores: is not an option of the neuron engine"):
        NeuronEngine.open(record, art, manifest, cores="0,1")


def test_data_parallel_refuses_an_artifact_without_cfg_doubling(stand_in_artifact):
    _, _, manifest = stand_in_artifact
    record = manifest.components["unet"]
    no_cfg = replace(record, config={**record.config, "cfg_halves": 1})
    with pytest.raises(
        ArgumentError, match="--data-parallel: the unet of this artifact was exported without classifier"
    ):
        cores_for(no_cfg, data_parallel=True)
    assert cores_for(no_cfg, data_parallel=False) == [0]
    assert cores_for(record, data_parallel=True) == [0, 1]


# -- on a Neuron instance ----------------------------------------------------------------------


@pytest.mark.skipif(SDK_PROBLEM is not None, reason=f"the real compile and on-device parity: {SDK_PROBLEM}")
def test_real_neuron_export_and_data_parallel_validate(tiny_dirs, tmp_path):
    out = tmp_path / "neuron"
    manifest = export(tiny_dirs["sd"], "neuron", out, compile_cache=str(tmp_path / "cache"), progress=False)
    assert all(r.parity.passed for r in manifest.components.values())
    assert manifest.components["unet"].config["compiler"] == "difflower.exporters.neuron.neuronx_trace"
    assert validate_artifact(out, tiny_dirs["sd"], steps=3, engine_options={"data_parallel": True}).passed


def test_cache_graphs_compile_and_run_the_references_cached_steps(tiny_dirs, tmp_path, cpu_in_place_of_neuron):
    """--cache-graphs on Neuron (CPU stand-in compile): every denoiser part is compiled per CFG half
    like the UNet, and a DeepCache run on the artifact makes the reference's decisions within the
    fp32 gates."""
    parts = ["text_encoder", "unet", "unet_shallow", "vae_decoder"]
    manifest = stand_in_export(tiny_dirs["sd"], tmp_path / "art", tmp_path / "cache", parts, cache_graphs="deepcache")
    assert manifest.components["unet_shallow"].config["cfg_halves"] == 2
    report = validate_artifact(tmp_path / "art", tiny_dirs["sd"], steps=5, cache="deepcache:interval=2")
    assert report.passed and report.cache["passed"] and report.final_latents["max_abs"] < 1e-4
    assert report.cache["full_steps"] == [True, False, True, False, True, False]


def test_flux_compiles_and_runs_its_first_block_cache(tmp_path, cpu_in_place_of_neuron):
    """A tiny FLUX.1-dev through the Neuron path (CPU stand-in compile) at a static 64x64: distilled
    guidance compiles the denoiser parts at batch 1 (no CFG halves), and a first-block run on the
    artifact makes the reference's decisions within the fp32 gates."""
    from difflower.reference.tiny import make_tiny_checkpoint

    flux = make_tiny_checkpoint(tmp_path / "flux", "flux", seed=0)
    parts = ["text_encoder", "text_encoder_2", "transformer", "transformer_first", "transformer_tail", "vae_decoder"]
    manifest = stand_in_export(flux, tmp_path / "art", tmp_path / "cache", parts, cache_graphs="first-block",
                               static=["1x64x64"])  # fmt: skip
    for name in ("transformer", "transformer_first", "transformer_tail"):
        config = manifest.components[name].config
        assert config["cfg_halves"] == 1 and config["compiler_args"][-2:] == ["--model-type", "transformer"], name
    assert all(r.parity.passed for r in manifest.components.values())
    report = validate_artifact(tmp_path / "art", flux, steps=4, cache="first-block:interval=2")
    assert report.passed and report.cache["passed"] and report.final_latents["max_abs"] < 1e-4
    assert report.cache["full_steps"] == [True, False, True, False]
