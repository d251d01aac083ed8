"""TorchScript: every component traced with `torch.jit.trace` at one static shape, as `<component>/model.pt`.

The diffusers docs' `torch.jit.trace` recipe, done properly: the wrapper modules of
`exporters.specs` (positional inputs in the spec's order, tuple outputs) are traced at the
artifact's one bucket (with no --static, the checkpoint's native size at one image, the
denoiser batch doubled for classifier-free guidance) and checked against the reference like
every backend's files.

A traced graph keeps what it saw while tracing:

- its shapes: one bucket per artifact, recorded with concrete shapes in the manifest;
- its device: tensors made inside `forward` (the timestep embedding's `arange`, CLIP's
  causal mask) are recorded on the tracing device, and `aten::_convolution` records cuDNN's
  TF32 switch. So a component runs on the device type it was traced on (`device`, default
  "cpu"; "cuda" traces on the GPU with TF32 convolutions off, the fp32 gates' precision).

The graphs are saved as traced, not frozen: on the CPU, one SD1.5 CFG UNet step took 1.02-1.04x
the traced module's time frozen (`torch.jit.freeze`, benchmarks/torchscript_unet.py) and roughly
twice as long after `torch.jit.optimize_for_inference` (its oneDNN layout conversions; one
exploratory run), while freezing turns every weight into a graph constant. TorchScript's
profiling executor optimizes a module on its first two calls; those are slower, the rest run
at eager speed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from difflower.artifact.formats import TORCHSCRIPT_FILE as FILE
from difflower.artifact.specs import ComponentSpec
from difflower.errors import ArgumentError
from difflower.exporters.common import ComponentExport, ExportOptions
from difflower.reference.loading import ModelIndex


def check_traced_options(options: ExportOptions, backend: str) -> None:
    """What every traced backend refuses: several buckets and ONNX Runtime's own attention operator."""
    if len(options.buckets) > 1:
        sizes = ", ".join(str(b) for b in options.buckets)
        raise ArgumentError(
            "--static", f"{backend} traces one static shape; got {len(options.buckets)} ({sizes}): export one per size"
        )
    if options.attention == "onnxruntime":
        raise ArgumentError(
            "--attention", f"'onnxruntime' is ONNX Runtime's own operator; {backend} takes sdpa or math"
        )


def trace_device(options: ExportOptions) -> torch.device:
    """The `device` option: where the graphs are traced, hence where they run."""
    name = options.extra.get("device", "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ArgumentError("--device", f"expected cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ArgumentError("--device", f"torchscript traces on cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device", "cuda was asked for but this torch sees no CUDA device")
    return device


def trace(module: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device) -> torch.jit.ScriptModule:
    """`module` traced on `device` at the shapes of `inputs`, in inference mode."""
    module = module.to(device)
    args = tuple(t.to(device) for t in inputs)
    # cuDNN's TF32 switch is baked into every traced convolution: keep fp32 convolutions.
    tf32_off = torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)
    with warnings.catch_warnings(), torch.no_grad(), tf32_off:
        # TracerWarnings about Python values taken from shapes: expected, every shape is static here.
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, args, check_trace=False)


class TorchScriptExporter:
    """BackendExporter for traced TorchScript modules."""

    name = "torchscript"
    static_only = True  # a traced graph has the shapes it was traced at

    def check_options(self, options: ExportOptions, index: ModelIndex) -> None:
        if options.precision != "fp32":
            raise ArgumentError(
                "--precision", f"torchscript traces the fp32 reference; {options.precision!r} needs the fp16 graph pass"
            )
        check_traced_options(options, self.name)
        options.refuse_unknown("torchscript", {"device"})
        trace_device(options)

    def export_component(
        self,
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        spec: ComponentSpec,
        folder: Path,
        options: ExportOptions,
    ) -> ComponentExport:
        device = trace_device(options)
        traced = trace(module, tuple(inputs.values()), device)
        torch.jit.save(traced, str(folder / FILE))
        module.to("cpu")  # the driver frees it; keep the GPU for the parity run
        return ComponentExport(notes={"traced_on": device.type, "frozen": False})

    def versions(self) -> dict[str, str]:
        return {}  # torch, already recorded by the driver, is the whole backend


EXPORTER = TorchScriptExporter
