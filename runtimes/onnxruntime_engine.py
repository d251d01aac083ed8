"""Engine `onnxruntime`: an exported `model.onnx` in an ONNX Runtime session.

CPU by default; CUDA and TensorRT execution providers when this onnxruntime build has them.
Threads default to ORT's own choice, the machine's physical cores, and its workers do not busy-wait
between calls (`session.intra_op.allow_spinning=0`), so they do not steal the cores torch and
the scheduler use in the same process between denoiser calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difflower.artifact.formats import ONNX_DATA, ONNX_FILE
from difflower.artifact.manifest import ComponentRecord
from difflower.errors import ArgumentError, CheckpointError
from difflower.runtimes.engine import Array, Engine, flag_option, refuse_options, to_numpy

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def providers_for(device: str) -> list[str]:
    """ORT providers for `device` (cpu, cuda, tensorrt), falling back to the CPU for unsupported ops."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise ArgumentError("--device", f"onnxruntime runs on {', '.join(PROVIDERS)}; got {device!r}")
    wanted = PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted not in available:
        raise ArgumentError(
            "--device",
            f"this onnxruntime has no {wanted} (available: {', '.join(available)}); "
            "install onnxruntime-gpu for cuda/tensorrt",
        )
    chain = [wanted]
    if device == "tensorrt":
        chain.append("CUDAExecutionProvider")
    return [*chain, "CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else chain


def _load_failure(message: str) -> str:
    """What ONNX Runtime's refusal to load a graph means, in one line."""
    first = message.splitlines()[0][:200] if message else "no message"
    if "escapes model directory" in message or "External data path" in message:
        return (
            "its weights point to a file outside the artifact folder, which ONNX Runtime refuses to read; "
            "the artifact was edited or did not come from difflower: re-export it"
        )
    if "external data" in message.lower() or "model.onnx_data" in message:
        return f"its weight file is missing or shorter than the graph says ({first}); re-export the artifact"
    return f"ONNX Runtime cannot load it ({first}); the file is truncated or corrupt, re-export the artifact"


class OnnxRuntimeEngine(Engine):
    """One component's ONNX graph in an InferenceSession."""

    backend = "onnxruntime"

    def __init__(
        self,
        record: ComponentRecord,
        folder: Path,
        device: str = "cpu",
        threads: int | None = None,
        prepack=True,
        arena=True,
    ):
        import onnxruntime as ort

        super().__init__(record)
        self.path = Path(folder) / record.name / ONNX_FILE
        if not self.path.is_file():
            raise CheckpointError(self.path, "not found; the artifact is incomplete, re-export it")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or 0  # 0: ORT's own default, the physical cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not flag_option(prepack, "prepack"):
            # No second, pre-packed copy of the GEMM weights: a 10 GB UNet's export check fits in 24 GiB.
            options.add_session_config_entry("session.disable_prepacking", "1")
        # ORT's arena keeps the activations' memory for the next run and grows to the largest of every
        # shape it has seen (a server taking several batch and image sizes), never shrinking: real-size
        # SD1.5 held 12.1 GiB after runs at 384 and 512 where one run needs 6.6. `arena=shrink` hands
        # it back after each run (+10-14% time, benchmarks in the README), `arena=false` does not pool.
        self._run_options = None
        if str(arena).lower() == "shrink":
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        else:
            try:
                options.enable_cpu_mem_arena = flag_option(arena, "arena")
            except ArgumentError:
                raise ArgumentError("--engine-option arena", f"expected true, false or shrink, got {arena!r}") from None
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers_for(device))
        except ArgumentError:
            raise
        except Exception as err:  # ORT raises its own exception types for bad protobufs and missing data
            raise CheckpointError(self.path, _load_failure(str(err))) from None
        self._check_graph_matches_manifest()
        self._output_names = [t.name for t in record.outputs]

    @classmethod
    def open(
        cls, record: ComponentRecord, folder: Path, manifest, device: str = "cpu", threads: int | None = None, **options
    ) -> OnnxRuntimeEngine:
        refuse_options("onnxruntime", options, allowed=("prepack", "arena"))
        return cls(record, folder, device=device, threads=threads, **options)

    @classmethod
    def export_check_options(cls, record: ComponentRecord, folder: Path) -> dict[str, Any]:
        """Weights past 2 GiB (external data) are checked without ORT's pre-packed copy of them."""
        return {"prepack": False} if (Path(folder) / record.name / ONNX_DATA).exists() else {}

    def _check_graph_matches_manifest(self) -> None:
        """The graph's declared inputs must be the manifest's (an edited manifest is caught here)."""
        graph = {i.name: i for i in self.session.get_inputs()}
        for spec in self.record.inputs:
            node = graph.get(spec.name)
            if node is None:
                raise CheckpointError(
                    self.path.parent.parent / "difflower.json",
                    f"component '{self.name}' lists input '{spec.name}', which {self.path.name} does not have",
                )
            declared = tuple(d if isinstance(d, int) else str(d) for d in node.shape)
            for want, got in zip(spec.shape, declared, strict=False):
                if isinstance(want, int) and isinstance(got, int) and want != got or len(declared) != len(spec.shape):
                    raise CheckpointError(
                        self.path.parent.parent / "difflower.json",
                        f"component '{self.name}' input '{spec.name}' is {list(spec.shape)} in the manifest but "
                        f"{list(declared)} in {self.path.name}; the manifest was edited or belongs to another "
                        "export",
                    )

    def run(self, inputs: Mapping[str, Array]) -> dict[str, np.ndarray]:
        dtypes = {t.name: t.dtype for t in self.inputs}
        feeds = {name: to_numpy(value, dtypes[name]) for name, value in inputs.items()}
        outputs = self.session.run(self._output_names, feeds, self._run_options)
        return dict(zip(self._output_names, outputs, strict=True))


ENGINE = OnnxRuntimeEngine
