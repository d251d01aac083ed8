"""AWS Neuron: every component compiled by `torch_neuronx.trace`, saved as `<component>/model.neuron`.

A Neuron-compiled module is a TorchScript module whose graph the Neuron compiler (neuronx-cc)
replaced, so this backend is the TorchScript one (same wrapper modules, same static bucket,
same manifest) with another compile call:

- `torch_neuronx.trace(wrapper, example_inputs, compiler_args=..., inline_weights_to_neff=False)`:
  the weights stay outside the compiled graph (NEFF), so `torch_neuronx.replace_weights` can
  swap them without a recompile;
- compiler flags from `--precision` and `--auto-cast` / `--auto-cast-type` (`compiler_args`),
  plus neuronx-cc's model-type hint per component;
- the denoiser is compiled at the batch of one classifier-free-guidance half, as AWS's own
  Stable Diffusion samples do: the engine runs the two halves one after the other on one
  NeuronCore, or at the same time on two (`data_parallel`), from the same artifact;
- each compile runs in its own process, which rebuilds the wrapper from the checkpoint (forked
  from a fork server that imported torch once, never from the exporting process, so it holds
  none of that process's memory or threads): a compiler crash or an out-of-memory kill ends
  that process only and is reported with its log. Each compiled module goes first to a
  compile cache (`compile_cache`, default ~/.cache/difflower/neuron-compile), keyed by all that
  determines it (component weights and config, shapes, flags, compiler, library versions): a
  failed export keeps what was compiled before the failure, and the next run reuses it. The
  artifact's file is a hard link to the cached one where both share a filesystem.

`torch_neuronx` comes from AWS's package index and runs on inf2/trn1/trn2 instances; without
it (or without a NeuronCore, which the parity check needs) `--backend neuron` stops in
`check_options`, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from difflower.artifact import formats
from difflower.artifact.formats import NEURON_FILE as FILE
from difflower.artifact.manifest import lora_records, sha256_file
from difflower.artifact.specs import DENOISERS, ComponentSpec, load_export_module
from difflower.errors import ArgumentError, DifflowerError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.exporters.torchscript import check_traced_options
from difflower.graph_passes.attention_variant import apply_attention_variant
from difflower.reference.loading import ModelIndex
from difflower.reference.lora import Lora

log = logging.getLogger(__name__)

# `--auto-cast` as difflower spells it -> neuronx-cc's spelling.
AUTO_CAST = {"none": "none", "matmul": "matmult", "all": "all"}
AUTO_CAST_TYPES = ("bf16", "fp16", "tf32")
OPTIONS = ("auto_cast", "auto_cast_type", "compile_cache")
DEFAULT_CACHE = Path.home() / ".cache" / "difflower" / "neuron-compile"

# (module, example inputs, compiler args, work folder) -> the compiled TorchScript module
CompileFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], list[str], Path], torch.jit.ScriptModule]


class NeuronCompileError(DifflowerError):
    """A component's compile process failed; what was compiled before it stays in the compile cache."""


@dataclass(frozen=True)
class CastSettings:
    """What neuronx-cc may cast the fp32 model to: `auto_cast` none | matmul | all, and to which type."""

    auto_cast: str
    auto_cast_type: str | None = None


def cast_settings(precision: str, extra: dict[str, Any]) -> CastSettings:
    """The cast for `--precision` and the `--auto-cast` / `--auto-cast-type` flags; refuses contradictions.

    `--precision` names the parity gates the compiled model is held to, so it must agree with
    the cast: fp32 casts nothing (the default, `--auto-cast none`); bf16 and fp16 cast the
    matrix multiplications (`matmul`, the default) or everything (`all`) to that type, or to
    tf32, which is closer to fp32 than either and so is held to the same gates.
    """
    auto_cast = extra.get("auto_cast") or ("none" if precision == "fp32" else "matmul")
    cast_type = extra.get("auto_cast_type")
    if auto_cast not in AUTO_CAST:
        raise ArgumentError("--auto-cast", f"must be one of {', '.join(AUTO_CAST)}, got {auto_cast!r}")
    if cast_type is not None and cast_type not in AUTO_CAST_TYPES:
        raise ArgumentError("--auto-cast-type", f"must be one of {', '.join(AUTO_CAST_TYPES)}, got {cast_type!r}")
    if auto_cast == "none":
        if precision != "fp32":
            raise ArgumentError(
                "--auto-cast", f"none keeps the reference's fp32; --precision {precision} needs matmul or all"
            )
        if cast_type is not None:
            raise ArgumentError("--auto-cast-type", "has nothing to cast with --auto-cast none (the fp32 default)")
        return CastSettings("none")
    if precision == "fp32":
        raise ArgumentError(
            "--auto-cast",
            f"{auto_cast} casts fp32 operations down; pass --precision bf16 or fp16, the parity gates it is held to",
        )
    cast_type = cast_type or precision
    if cast_type not in (precision, "tf32"):
        raise ArgumentError("--auto-cast-type", f"{cast_type} contradicts --precision {precision}; use {precision}")
    return CastSettings(auto_cast, cast_type)


def model_type(spec: ComponentSpec) -> str:
    """neuronx-cc's `--model-type` hint, as optimum-neuron picks it for diffusers' components."""
    if spec.kind.startswith("transformer") or spec.class_name.startswith("CLIP"):
        return "transformer"
    return "unet-inference"  # UNet, VAE and (as optimum-neuron found best) the T5 encoder


def compiler_args(spec: ComponentSpec, cast: CastSettings) -> list[str]:
    """neuronx-cc's flags for one component (auto-cast always explicit: its default changed across SDKs)."""
    args = ["--auto-cast", AUTO_CAST[cast.auto_cast]]
    if cast.auto_cast_type is not None:
        args += ["--auto-cast-type", cast.auto_cast_type]
    return [*args, "--model-type", model_type(spec)]


def cfg_halves(spec: ComponentSpec, options: ExportOptions) -> int:
    """2 for a denoiser whose batch CFG doubles (compiled per half), else 1."""
    return 2 if spec.kind in DENOISERS and options.cfg else 1


def neuronx_trace(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], args: list[str], workdir: Path
) -> torch.jit.ScriptModule:
    """The Neuron compile: `torch_neuronx.trace` with the weights kept out of the compiled graph."""
    import torch_neuronx

    return torch_neuronx.trace(
        module, inputs, compiler_args=args, compiler_workdir=str(workdir), inline_weights_to_neff=False
    )


@dataclass(frozen=True)
class CompileJob:
    """One component's compile, everything a fresh process needs to do it."""

    spec: ComponentSpec
    root: Path  # the checkpoint folder the child rebuilds the wrapper from
    attention: str
    args: tuple[str, ...]
    compile_fn: CompileFn
    entry: Path  # its compile-cache folder: inputs.pt, compile.log, workdir/, then model.neuron and compile.json
    loras: tuple[Lora, ...] = ()  # fused before compiling, as write_component fuses them

    @property
    def compiler(self) -> str:
        return f"{self.compile_fn.__module__}.{self.compile_fn.__qualname__}"


def cache_key(job: CompileJob, inputs: Sequence[torch.Tensor]) -> str:
    """Hash of everything that determines the compiled module."""
    folder = job.root / job.spec.source
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    versions = {name: _version(name) for name in ("torch", "torch-neuronx", "neuronx-cc", "difflower")}
    payload = {
        "component": [job.spec.name, job.spec.class_name],
        "files": files,
        "inputs": [[list(t.shape), str(t.dtype)] for t in inputs],
        "args": list(job.args),
        "attention": job.attention,
        "compiler": job.compiler,
        "loras": lora_records(job.loras),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _compile_child(job: CompileJob) -> None:
    """In a fresh process: rebuild the wrapper from the checkpoint, compile it, save model.neuron."""
    os.setpgid(0, 0)  # its own process group: an interrupted export ends the compiler's processes too
    # The compiler's output goes to compile.log, which a failure names.
    with open(job.entry / "compile.log", "a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    module = load_export_module(job.spec, job.root, job.loras)
    if job.spec.kind != "text_encoder" and job.attention != "sdpa":  # as write_component did to the reference
        apply_attention_variant(module, job.attention, where=job.spec.name)
    inputs = tuple(torch.load(job.entry / "inputs.pt"))
    with torch.no_grad():
        compiled = job.compile_fn(module, inputs, list(job.args), job.entry / "workdir")
    partial = job.entry / f"{FILE}.partial"
    torch.jit.save(compiled, str(partial))
    partial.replace(job.entry / FILE)


def compile_in_child(job: CompileJob) -> float:
    """Run `job` in its own process: its wall time, or NeuronCompileError naming the cause and the log."""
    # A fork server that imported torch and difflower once, then forks a fresh process per compile:
    # no re-import per component, and none of this process's threads or memory in the child.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["difflower.exporters.neuron"])
    process = context.Process(target=_compile_child, args=(job,), name=f"difflower-neuron-{job.spec.name}")
    start = time.perf_counter()
    process.start()
    try:
        process.join()
    except BaseException:  # interrupted: the compile must not outlive the export
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:  # interrupted before the child made its group
            process.terminate()
        process.join()
        raise
    seconds = time.perf_counter() - start
    if process.exitcode == 0 and (job.entry / FILE).is_file():
        return seconds
    if process.exitcode is not None and process.exitcode < 0:
        name = signal.Signals(-process.exitcode).name
        cause = f"killed by {name}" + (", the usual sign of running out of memory" if name == "SIGKILL" else "")
    else:
        cause = f"exit status {process.exitcode}: {_last_line(job.entry / 'compile.log')}"
    raise NeuronCompileError(
        f"neuron export: compiling {job.spec.name} failed ({cause}); log {job.entry / 'compile.log'}. "
        f"Nothing was written; the components compiled before it stay in {job.entry.parent} for the next run"
    )


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link the cached file into the artifact (no second copy on one filesystem), else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class NeuronExporter:
    """BackendExporter for Neuron-compiled modules; `compile_fn` is the compile (torch_neuronx.trace)."""

    name = "neuron"
    static_only = True  # the compiled graph has the shapes it was compiled at

    def __init__(self, compile_fn: CompileFn = neuronx_trace):
        self.compile_fn = compile_fn

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        problem = formats.neuron_unavailable()
        if problem:
            raise ArgumentError("--backend", f"neuron {problem}")
        check_traced_options(options, self.name)
        options.refuse_unknown("neuron", OPTIONS)
        cast_settings(options.precision, options.extra)

    def export_component(
        self,
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        spec: ComponentSpec,
        folder: Path,
        options: ExportOptions,
    ) -> ComponentExport:
        # 1. the compile's inputs: the denoiser's at one CFG half (negative prompts), the others' as they are
        halves = cfg_halves(spec, options)
        example = tuple(t.chunk(halves)[0].contiguous() for t in inputs.values())
        args = compiler_args(spec, cast_settings(options.precision, options.extra))
        cache = Path(options.extra.get("compile_cache") or DEFAULT_CACHE)
        job = CompileJob(
            spec, Path(options.source_root), options.attention, tuple(args), self.compile_fn, cache, options.loras
        )
        job = replace(job, entry=cache / cache_key(job, example))

        # 2. compile in a child process, unless an earlier run already did
        record = job.entry / "compile.json"
        cached = (job.entry / FILE).is_file() and record.is_file()
        if cached:
            seconds = json.loads(record.read_text())["seconds"]
            log.info("neuron: %s compiled before, reusing %s", spec.name, job.entry)
        else:
            shutil.rmtree(job.entry, ignore_errors=True)  # a failed earlier attempt
            job.entry.mkdir(parents=True)
            torch.save(list(example), job.entry / "inputs.pt")
            log.info("neuron: compiling %s (%s) in its own process; log %s", spec.name, " ".join(args), job.entry)
            seconds = compile_in_child(job)
            record.write_text(json.dumps({"seconds": seconds, "compiler": job.compiler, "args": args}) + "\n")
            shutil.rmtree(job.entry / "workdir", ignore_errors=True)  # the compiler's intermediates
            log.info("neuron: compiled %s in %.1f s", spec.name, seconds)

        # 3. the artifact's file
        _link_or_copy(job.entry / FILE, folder / FILE)
        return ComponentExport(
            notes={
                "compiler": job.compiler,
                "compiler_args": args,
                "inline_weights_to_neff": False,
                "cfg_halves": halves,
                "compiled_batch": example[0].shape[0],
                "compile_seconds": round(seconds, 2),
                "compile_cached": cached,
            }
        )

    def versions(self) -> dict[str, str]:
        found = {name: _version(name) for name in ("torch-neuronx", "neuronx-cc")}
        return {name: version for name, version in found.items() if version is not None}


EXPORTER = NeuronExporter
