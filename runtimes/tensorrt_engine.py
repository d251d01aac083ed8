"""Engine `tensorrt`: a component's `model.plan` run on the GPU, bound to torch CUDA tensors.

Inputs are bound by their device pointers (a CPU input is copied to the GPU once; CUDA inputs
are used in place) and outputs are torch CUDA tensors the runtime loop keeps on the GPU, so the
loop has no host copies. A component with static shapes is captured in a CUDA graph after its
first call and replayed afterwards (`--engine-option cuda_graphs=0` turns that off).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from difflower.artifact.formats import TENSORRT_FILE as FILE
from difflower.artifact.formats import require_tensorrt
from difflower.artifact.manifest import ComponentRecord
from difflower.errors import ArgumentError
from difflower.runtimes.engine import Array, Engine, flag_option, refuse_options


def _trt_dtype_to_torch(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class PlanRunner:
    """A deserialized engine with one execution context: named tensors in, named CUDA tensors out."""

    def __init__(self, plan: bytes, output_names: Sequence[str], device: str = "cuda", cuda_graphs: bool = True):
        trt = require_tensorrt("--engine")
        self._trt = trt
        self.device = torch.device(device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArgumentError("--engine", "TensorRT could not load this engine (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = list(output_names)
        self.dtypes = {n: _trt_dtype_to_torch(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.static = all(-1 not in tuple(self.engine.get_tensor_shape(n)) for n in self.input_names)
        self.stream = torch.cuda.Stream(self.device)
        self.use_graphs = cuda_graphs and self.static
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: dict[str, torch.Tensor] = {}
        self._static_out: dict[str, torch.Tensor] = {}

    def _bind(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name in self.input_names:
            tensor = inputs[name]
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT: execute_async_v3 failed (see TensorRT's log above)")

    def __call__(self, inputs: Mapping[str, Array]) -> dict[str, torch.Tensor]:
        tensors = {name: self._to_device(name, inputs[name]) for name in self.input_names}
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # inputs written on the caller's stream
        with torch.cuda.stream(self.stream):
            if not self.use_graphs:
                outputs = self._bind(tensors)
                self._execute()
            else:
                outputs = self._replay(tensors)
        current.wait_stream(self.stream)  # the caller's stream sees the outputs; no host sync
        return outputs

    def _replay(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._graph is None:
            self._static_in = {n: t.clone() for n, t in tensors.items()}
            self._static_out = self._bind(self._static_in)
            self._execute()  # TensorRT's first run allocates; capture the second
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=self.stream):
                self._execute()
        for name, tensor in tensors.items():
            self._static_in[name].copy_(tensor, non_blocking=True)
        self._graph.replay()
        return {n: t.clone() for n, t in self._static_out.items()}  # the next replay overwrites them

    def _to_device(self, name: str, value: Array) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        return tensor.to(self.device, self.dtypes[name], non_blocking=True).contiguous()


class TensorRTEngine(Engine):
    """One component's TensorRT engine behind the engine interface."""

    backend = "tensorrt"
    # A serialized engine may carry plugin code: checked against the export's sha256 before loading.
    executes_code = True

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        try:
            require_tensorrt("--engine")
        except ArgumentError as err:
            return err.detail
        return None

    def __init__(self, record: ComponentRecord, runner: PlanRunner):
        super().__init__(record)
        self.runner = runner

    @classmethod
    def open(
        cls,
        record: ComponentRecord,
        folder: Path,
        manifest,
        device: str = "cuda",
        threads: int | None = None,
        **options,
    ) -> TensorRTEngine:
        graphs = flag_option(options.pop("cuda_graphs", True), "cuda_graphs")
        refuse_options("tensorrt", options)
        if not str(device).startswith("cuda"):
            raise ArgumentError(
                "--device", f"the tensorrt engine runs on an NVIDIA GPU: use --device cuda, not {device}"
            )
        plan = Path(folder) / record.name / FILE
        if not plan.is_file():
            raise ArgumentError("ARTIFACT", f"{plan} is missing; re-export the artifact with --backend tensorrt")
        runner = PlanRunner(plan.read_bytes(), [t.name for t in record.outputs], device, graphs)
        return cls(record, runner)

    def run(self, inputs: Mapping[str, Array]) -> dict[str, torch.Tensor]:
        return self.runner(inputs)


ENGINE = TensorRTEngine
