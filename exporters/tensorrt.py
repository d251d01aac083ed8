"""TensorRT: an engine per component (`<component>/model.plan`), built from our own ONNX.

Per component: the ONNX exporter writes `model.onnx` with its passes (static shapes for one
bucket, fp16 with the measured fp32 islands for `--precision fp16`); polygraphy and
onnx-graphsurgeon clean it for TensorRT's parser (graph_passes.tensorrt_sanitize); with
`--quantize fp8|int8` NVIDIA's Model Optimizer inserts Q/DQ nodes calibrated on denoiser
inputs from the repository's prompt set; then TensorRT builds the engine with one optimization
profile spanning the declared buckets (min/opt/max of every symbolic dim, the CFG doubling of
the denoiser batch included): never hard-coded limits.

Engines are cached by content: the key hashes the ONNX bytes, TensorRT's version, the GPU's
name and compute capability, the profiles, the precision and the builder flags. A matching
engine is reused; any change builds a new one. The key is in the manifest.

Everything that needs no GPU (profiles, cache keys and reuse, the ONNX clean-up, argument
checks) runs anywhere; building and running an engine needs an NVIDIA GPU with `tensorrt`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from difflower.artifact.formats import TENSORRT_FILE as FILE
from difflower.artifact.formats import require_tensorrt
from difflower.artifact.manifest import Bucket
from difflower.artifact.specs import ComponentSpec, ShapePlan
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.exporters.onnx import OnnxExporter
from difflower.graph_passes.base import PassDidNotFire, PassResult
from difflower.graph_passes.calibration import CALIBRATED, QUANTIZED_DENOISERS, denoiser_calibration
from difflower.graph_passes.tensorrt_sanitize import sanitize_for_tensorrt
from difflower.reference.loading import ModelIndex, read_vae_config

TRT_PRECISIONS = ("fp32", "fp16", "bf16")
TRT_QUANTIZE_MODES = ("fp8", "int8")
EXTRA = CALIBRATED | {"cache_dir"}

Profiles = dict[str, dict[str, list[int]]]


def optimization_profiles(spec: ComponentSpec, buckets: Sequence[Bucket], cfg: bool, vae_scale_factor: int) -> Profiles:
    """min/opt/max shape of every input over the buckets (opt: the first bucket)."""
    if not buckets:
        raise ArgumentError("--static", "TensorRT profiles come from shape buckets; give at least one BxHxW")
    plan = ShapePlan(tuple(buckets), cfg=cfg)
    per_bucket = [plan.dims(b, vae_scale_factor) for b in buckets]
    profiles: Profiles = {}
    for tensor in spec.inputs:
        shapes = [[d if isinstance(d, int) else dims[d] for d in tensor.shape] for dims in per_bucket]
        profiles[tensor.name] = {
            "min": [min(axis) for axis in zip(*shapes, strict=True)],
            "opt": shapes[0],
            "max": [max(axis) for axis in zip(*shapes, strict=True)],
        }
    return profiles


def onnx_files(folder: Path) -> list[Path]:
    """The files that make up a component's ONNX graph (graph, then external weights)."""
    return [p for p in (folder / "model.onnx", folder / "model.onnx_data") if p.exists()]


def engine_cache_key(
    files: Iterable[Path],
    *,
    tensorrt_version: str,
    gpu: str,
    compute_capability: str,
    profiles: Profiles,
    precision: str,
    flags: Sequence[str],
) -> str:
    """sha256 over everything that changes the engine TensorRT would build."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    facts = {
        "tensorrt": tensorrt_version,
        "gpu": gpu,
        "compute_capability": compute_capability,
        "profiles": profiles,
        "precision": precision,
        "flags": sorted(flags),
    }
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """$DIFFLOWER_CACHE_DIR/tensorrt, else ~/.cache/difflower/tensorrt."""
    root = os.environ.get("DIFFLOWER_CACHE_DIR") or Path.home() / ".cache" / "difflower"
    return Path(root) / "tensorrt"


def cached_engine(key: str, build: Callable[[], bytes], cache_dir: Path) -> tuple[bytes, bool]:
    """The engine for `key` from the cache, or built by `build` and stored; (bytes, was_cached)."""
    path = cache_dir / f"{key}.plan"
    if path.is_file():
        return path.read_bytes(), True
    data = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)  # a reader never sees half an engine
    return data, False


def builder_flags(precision: str, quantize: str | None) -> list[str]:
    """The TensorRT builder settings an export uses (names of trt.BuilderFlag / network flags)."""
    if quantize is not None:
        return ["FP16", quantize.upper()]  # Q/DQ layers in int8/fp8, the rest fp16
    if precision == "fp16":
        return ["STRONGLY_TYPED"]  # the fp16 ONNX carries its fp32 islands as types
    if precision == "bf16":
        return ["BF16"]
    return []


def build_engine(
    onnx_path: Path, profiles: Profiles, flags: Sequence[str], workspace_gib: float | None = None
) -> bytes:
    """Parse `onnx_path` and build a serialized engine with one optimization profile."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0
    if "STRONGLY_TYPED" in flags:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PassDidNotFire(f"tensorrt: the ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for flag in flags:
        if flag != "STRONGLY_TYPED":
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for name, shape in profiles.items():
        profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PassDidNotFire(f"tensorrt: building the engine for {onnx_path} failed (see TensorRT's log above)")
    return bytes(serialized)


def modelopt_quantize(path: Path, mode: str, dataset: list[dict[str, np.ndarray]]) -> PassResult:
    """Q/DQ nodes from NVIDIA's Model Optimizer (`fp8` or `int8`), calibrated on `dataset`; in place."""
    from modelopt.onnx.quantization import quantize

    calibration = {name: np.concatenate([s[name] for s in dataset]) for name in dataset[0]}
    target = path.with_name("model.quant.onnx")
    quantize(
        onnx_path=str(path),
        quantize_mode=mode,
        calibration_data=calibration,
        output_path=str(target),
        use_external_data_format=(path.parent / "model.onnx_data").exists(),
    )
    target.replace(path)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    qdq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if qdq == 0:
        raise PassDidNotFire(f"tensorrt {mode}: Model Optimizer inserted no Q/DQ node into {path}")
    return PassResult("modelopt_quantize", {"QuantizeLinear": qdq}, {"mode": mode, "samples": len(dataset)})


def _gpu_facts() -> tuple[str, str]:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, f"{props.major}.{props.minor}"


class TensorRTExporter:
    """BackendExporter: ONNX with our passes, cleaned, (quantized), built into a cached engine."""

    name = "tensorrt"
    static_only = True  # no --static: the checkpoint's native size at one image

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.precision not in TRT_PRECISIONS:
            raise ArgumentError(
                "--precision", f"tensorrt builds {', '.join(TRT_PRECISIONS)}; got {options.precision!r}"
            )
        options.refuse_unknown("tensorrt", EXTRA)
        if options.attention == "onnxruntime":
            raise ArgumentError("--attention", "onnxruntime's fused attention is an ORT-only operator: use sdpa")
        quantize = options.refuse_quantize_mode("tensorrt", TRT_QUANTIZE_MODES)
        if quantize is not None:
            try:
                import modelopt.onnx.quantization  # noqa: F401
            except ImportError:
                raise ArgumentError(
                    "--quantize", f"{quantize} needs NVIDIA's Model Optimizer: pip install 'nvidia-modelopt[onnx]'"
                ) from None
        for module in ("polygraphy", "onnx_graphsurgeon"):
            try:
                __import__(module)
            except ImportError:
                raise ArgumentError(
                    "--backend", f"tensorrt needs {module}: pip install 'difflower[tensorrt]'"
                ) from None
        require_tensorrt()

    def export_component(
        self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], spec: ComponentSpec, folder: Path, options
    ) -> ComponentExport:
        import tensorrt as trt

        quantize = options.extra.get("quantize")
        onnx_options = replace(options, precision="fp16" if options.precision == "fp16" else "fp32", extra={})
        written = OnnxExporter().export_component(module, inputs, spec, folder, onnx_options)
        passes = [*written.passes, sanitize_for_tensorrt(folder / "model.onnx")]
        if quantize is not None and spec.kind in QUANTIZED_DENOISERS:
            dataset = denoiser_calibration(options, spec)
            passes.append(modelopt_quantize(folder / "model.onnx", quantize, dataset))
        factor = _vae_factor(options)
        profiles = optimization_profiles(spec, options.plan.buckets, options.cfg, factor)
        flags = builder_flags(options.precision, quantize if spec.kind in QUANTIZED_DENOISERS else None)
        gpu, capability = _gpu_facts()
        key = engine_cache_key(
            onnx_files(folder),
            tensorrt_version=trt.__version__,
            gpu=gpu,
            compute_capability=capability,
            profiles=profiles,
            precision=options.precision,
            flags=flags,
        )
        cache = Path(options.extra.get("cache_dir") or default_cache_dir())
        data, hit = cached_engine(key, lambda: build_engine(folder / "model.onnx", profiles, flags), cache)
        (folder / FILE).write_bytes(data)
        notes = {
            "engine_cache_key": key,
            "engine_cache_hit": hit,
            "profiles": profiles,
            "builder_flags": flags,
            "gpu": gpu,
            "compute_capability": capability,
        }
        return ComponentExport(passes=passes, notes={**written.notes, **notes})

    def versions(self) -> dict[str, str]:
        import tensorrt

        return {"tensorrt": tensorrt.__version__, "cuda": str(torch.version.cuda)}


def _vae_factor(options: ExportOptions) -> int:
    return read_vae_config(Path(options.source_root) / "vae").downscale_factor


EXPORTER = TensorRTExporter
