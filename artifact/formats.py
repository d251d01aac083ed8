"""Each backend's on-disk format: the file a component is written to, how it is read back, and
the names a backend mangles. Exporters write these files and engines read them; both import
them from here, so neither reaches into the other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from difflower.errors import ArgumentError, CheckpointError

# The file each backend writes into a component's folder.
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx_data"  # weights beside model.onnx past protobuf's 2 GiB, as optimum lays them out
OPENVINO_FILE = "openvino_model.xml"  # and openvino_model.bin: optimum-intel's layout
TORCHSCRIPT_FILE = "model.pt"
NEURON_FILE = "model.neuron"
COREML_FILE = "model.mlpackage"
TENSORRT_FILE = "model.plan"
AOTI_FILE = "model.pt2"  # an AOTInductor package: generated kernels (a shared library) and the weights


# -- ONNX ------------------------------------------------------------------------------------------


def consolidate_external_data(path: Path) -> None:
    """Gather the weights into one `model.onnx_data` beside `path`, as optimum lays it out.

    Streams one tensor at a time (a 10 GB UNet never sits in memory twice); tensors under
    1 KB stay inline, as onnx's own helper does.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    folder = path.parent
    model = onnx.load(str(path), load_external_data=False)
    data_path = folder / ONNX_DATA
    sources: set[Path] = set()
    with open(data_path, "wb") as sink:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                source = folder / info.location
                sources.add(source)
                with open(source, "rb") as handle:
                    handle.seek(info.offset or 0)
                    data = handle.read(info.length) if info.length else handle.read()
            elif len(tensor.raw_data) >= 1024:
                data = tensor.raw_data
            else:
                continue
            offset = sink.tell()
            sink.write(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(path))
    for source in sources - {data_path}:
        source.unlink()
    data_path.chmod(0o644)  # an ordinary artifact file, whatever the writer's default


# -- TorchScript and Neuron ------------------------------------------------------------------------


def load_traced(path: Path, device: torch.device | str) -> torch.jit.ScriptModule:
    """A saved traced module, mapped to `device`; a damaged file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(path, "not found; the artifact is incomplete, re-export it")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as err:
        raise CheckpointError(
            path, f"TorchScript cannot load it ({str(err).splitlines()[0][:200]}); re-export the artifact"
        ) from None


NEURON_WHERE = "AWS inf2/trn1/trn2 instances with the Neuron driver"
NEURON_INSTALL = "pip install torch-neuronx neuronx-cc --extra-index-url https://pip.repos.neuron.amazonaws.com"


def neuron_unavailable() -> str | None:
    """Why Neuron compiles and runs cannot happen here (one line), or None when they can."""
    import glob

    if importlib.util.find_spec("torch_neuronx") is None:
        return (
            f"needs AWS's torch-neuronx and neuronx-cc, not installed here; they run on {NEURON_WHERE}: "
            f"there, {NEURON_INSTALL}"
        )
    if not glob.glob("/dev/neuron[0-9]*"):
        return f"needs a NeuronCore and this machine has no /dev/neuron* device; run it on {NEURON_WHERE}"
    return None


# -- Core ML ---------------------------------------------------------------------------------------


def coreml_name(name: str) -> str:
    """Core ML feature names take no dots: `hidden_states.11` is `hidden_states_11` there."""
    return name.replace(".", "_")


# -- TensorRT --------------------------------------------------------------------------------------


def require_tensorrt(flag: str = "--backend"):
    """The tensorrt module, or one clear line saying what is missing on this machine."""
    try:
        import tensorrt
    except ImportError:
        raise ArgumentError(
            flag,
            "TensorRT needs NVIDIA's 'tensorrt' package and an NVIDIA GPU: pip install 'difflower[tensorrt]' "
            "on a Linux or Windows machine with CUDA",
        ) from None
    if not torch.cuda.is_available():
        raise ArgumentError(flag, "TensorRT builds and runs engines on an NVIDIA GPU; this torch sees no CUDA device")
    return tensorrt
