"""AOTInductor: every component through `torch.export` and AOTInductor into `<component>/model.pt2`.

The supported ahead-of-time path of PyTorch (TorchScript's `torch.jit.trace` is in maintenance):
the wrapper modules of `artifact.specs` are exported as graphs, then compiled by Inductor into a
package of generated C++ (CPU) or CUDA/Triton (GPU) kernels plus the weights, which the `aoti`
engine loads and runs without Python graph capture and without compiling again.

Shapes: one bucket (the default is the checkpoint's native size at one image) gives a static
graph; several `--static` buckets give one graph whose dims vary where the buckets differ (each
such dim a `torch.export.Dim` bounded by the buckets' smallest and largest value), the engine
then limiting the artifact to those buckets like every backend does.

Precision: `fp32` (default), or `bf16` / `fp16` weights and compute, with fp32 inputs and outputs
(the wrapper casts at its edges, like ONNX's keep_io_types); a VAE whose config sets
`force_upcast` stays fp32 under `fp16`, as in the eager reference. Device: `cpu` (default) or `cuda`;
a package runs only on the device type and the torch version it was compiled with, both
recorded in the manifest. A package is compiled native code: the engine checks its sha256.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflower.artifact.formats import AOTI_FILE as FILE
from difflower.artifact.precision import StoragePrecision
from difflower.artifact.specs import ComponentSpec
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.exporters.torchscript import trace_device
from difflower.reference.autoencoder_kl import VAEConfig
from difflower.reference.loading import ModelIndex, read_vae_config

DTYPES: dict[StoragePrecision, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CastAtEdges(nn.Module):
    """`module` computing in `dtype` between fp32 inputs and fp32 outputs (integer inputs pass)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        return tuple(out.float() for out in self.module(*cast))


def dynamic_shapes(spec: ComponentSpec, options: ExportOptions, vae_scale_factor: int) -> dict[str, dict[int, Any]]:
    """`torch.export`'s dynamic_shapes for the spec's inputs: a Dim for every symbolic dim whose
    value differs between the buckets, nothing for the dims they agree on.

    A varying dim is the buckets' greatest common divisor times a Dim bounded by them: a UNet
    halves and doubles its latents, and export proves that valid only for sizes it knows are
    multiples (8 and 12 latents: 4 x Dim(2..3))."""
    per_bucket = [options.plan.dims(b, vae_scale_factor) for b in options.buckets]
    dims: dict[str, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for tensor in spec.inputs:
        axes: dict[int, Any] = {}
        for axis, name in enumerate(tensor.shape):
            if not isinstance(name, str):
                continue
            values = sorted({d[name] for d in per_bucket})
            if len(values) > 1:
                if name not in dims:
                    step = math.gcd(*values)
                    base = torch.export.Dim(name, min=values[0] // step, max=values[-1] // step)
                    dims[name] = base * step if step > 1 else base
                axes[axis] = dims[name]
        out[tensor.name] = axes
    return out


def compute_precision(spec: ComponentSpec, precision: StoragePrecision, vae: VAEConfig) -> StoragePrecision:
    """The precision `spec` computes in under `--precision`: a VAE whose config sets force_upcast
    (SDXL's overflows in fp16) stays fp32 under fp16, as the eager reference keeps it."""
    if precision == "fp16" and spec.kind.startswith("vae") and vae.force_upcast:
        return "fp32"
    return precision


class AotiExporter:
    """BackendExporter for AOTInductor packages."""

    name = "aoti"
    static_only = True  # no --static: the checkpoint's native size at one image, as one static graph

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.attention == "onnxruntime":
            raise ArgumentError("--attention", "'onnxruntime' is ONNX Runtime's own operator; aoti takes sdpa or math")
        options.refuse_unknown("aoti", {"device"})
        device = trace_device(options)
        if options.precision == "fp16" and device.type == "cpu":
            raise ArgumentError("--precision", "fp16 kernels are for the GPU; on the CPU use bf16 (or fp32)")

    def export_component(
        self,
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        spec: ComponentSpec,
        folder: Path,
        options: ExportOptions,
    ) -> ComponentExport:
        device = trace_device(options)
        vae = read_vae_config(Path(options.source_root or ".") / "vae")
        precision = compute_precision(spec, options.precision, vae)
        if precision != "fp32":
            module = CastAtEdges(module, DTYPES[precision])
        module = module.to(device).eval()
        args = tuple(t.to(device) for t in inputs.values())
        factor = vae.downscale_factor
        shapes = dynamic_shapes(spec, options, factor)
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export's notes about deprecated pytree and dynamo internals
            program = torch.export.export(module, args, dynamic_shapes=shapes if any(shapes.values()) else None)
        exported = time.perf_counter() - start
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(folder / FILE))
        compiled = time.perf_counter() - start - exported
        del program
        module.to("cpu")  # the driver frees it; keep the GPU for the parity run
        return ComponentExport(
            notes={
                "compiled_on": device.type,
                "torch": torch.__version__,
                "package": Path(package).name,
                "export_seconds_torch_export": round(exported, 2),
                "compile_seconds": round(compiled, 2),
                "peak_rss_gib_after_compile": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "dynamic_dims": sorted(
                    {name for t in spec.inputs for axis, name in enumerate(t.shape) if axis in shapes[t.name]}
                ),
                "compute_precision": precision,
            }
        )

    def versions(self) -> dict[str, str]:
        return {}  # torch, already recorded by the driver, is the whole backend


EXPORTER = AotiExporter
