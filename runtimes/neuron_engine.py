"""Engine `neuron`: Neuron-compiled `<component>/model.neuron` modules on NeuronCores.

A Neuron-compiled module is a TorchScript module whose graph the Neuron compiler replaced: it
takes and returns CPU tensors and moves them to its NeuronCore itself. So this engine is the
TorchScript engine with two differences:

1. loading places each module on a NeuronCore (`torch_neuronx.move_trace_to_device`, which
   also moves the weights that the export kept outside the compiled graph);
2. the denoiser is compiled at the batch of one classifier-free-guidance half (see
   difflower.exporters.neuron), so the engine always runs the whole CFG batch as two halves,
   negative prompts then positive ones: one after the other on one core, or with
   `data_parallel=True` at the same time on two cores. Guidance is never dropped: an
   artifact built without CFG doubling has nothing to split and `data_parallel` is refused.

`torch_neuronx` and a NeuronCore exist only on AWS inf2/trn1/trn2 instances; everything else
here (the split, the checks) runs on any CPU with TorchScript modules in the cores' place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from difflower.artifact import formats
from difflower.artifact.formats import NEURON_FILE as FILE
from difflower.artifact.formats import load_traced
from difflower.artifact.manifest import ComponentRecord
from difflower.artifact.specs import DENOISERS
from difflower.errors import ArgumentError
from difflower.runtimes.engine import flag_option, refuse_options
from difflower.runtimes.torchscript_engine import TorchScriptEngine


def place_on_core(module: torch.jit.ScriptModule, core: int) -> None:
    """Load `module`'s compiled graph and its separated weights onto NeuronCore `core`."""
    import torch_neuronx

    torch_neuronx.move_trace_to_device(module, core)


def load_on_core(path: Path, core: int) -> torch.jit.ScriptModule:
    """The compiled module at `path`, placed on NeuronCore `core`."""
    module = load_traced(path, "cpu")  # Neuron modules take and return CPU tensors
    place_on_core(module, core)
    return module


class CfgSplit:
    """A module compiled at one CFG half's batch, called on the whole CFG batch.

    The inputs are split along the batch into `halves` equal parts, in order (negative
    prompts first, as the pipeline stacks them); part i runs on replica i (one replica: all
    parts on it, in turn; two: both at once, each on its own core); the outputs are joined in
    the same order. With `halves == 1` the module takes the batch as it is.
    """

    def __init__(self, replicas: Sequence[Callable[..., Sequence[torch.Tensor]]], halves: int):
        if halves not in (1, 2) or not 1 <= len(replicas) <= halves:
            raise ValueError(
                f"CfgSplit takes 1 or 2 halves and 1 replica per core up to that; got {halves}, {replicas}"
            )
        self.replicas = list(replicas)
        self.halves = halves
        # Compiled modules release the GIL while they run: threads give real overlap across cores.
        self._pool = ThreadPoolExecutor(len(self.replicas)) if len(self.replicas) > 1 else None

    def to(self, device) -> CfgSplit:
        """Nothing to move: the replicas stay on their cores, tensors cross as CPU tensors."""
        return self

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.halves == 1:
            return tuple(self.replicas[0](*args))
        batch = args[0].shape[0]
        if batch % self.halves:
            raise ValueError(f"the CFG batch {batch} does not split into {self.halves} halves")
        parts = [tuple(a.chunk(self.halves)[i].contiguous() for a in args) for i in range(self.halves)]
        if self._pool is not None:
            futures = [self._pool.submit(replica, *part) for replica, part in zip(self.replicas, parts, strict=True)]
            results = [future.result() for future in futures]
        else:
            results = [self.replicas[0](*part) for part in parts]
        return tuple(torch.cat(outputs, dim=0) for outputs in zip(*results, strict=True))


def cores_for(record: ComponentRecord, data_parallel: bool) -> list[int]:
    """The NeuronCores `record`'s replicas go on: two for a split denoiser with data parallelism."""
    halves = int(record.config.get("cfg_halves", 1))
    if not data_parallel or record.kind not in DENOISERS:
        return [0]
    if halves != 2:
        raise ArgumentError(
            "--data-parallel",
            f"the {record.name} of this artifact was exported without classifier-free guidance doubling "
            "(--no-cfg): there is no CFG batch to split over two cores. Re-export with CFG, or drop --data-parallel",
        )
    return [0, 1]


class NeuronEngine(TorchScriptEngine):
    """One component's compiled module(s) on NeuronCores, behind the engine interface."""

    backend = "neuron"

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        problem = formats.neuron_unavailable()
        return None if problem is None else f"neuron {problem}"

    def __init__(self, record: ComponentRecord, module: CfgSplit):
        super().__init__(record, module, "cpu")

    @classmethod
    def open(
        cls,
        record: ComponentRecord,
        folder: Path,
        manifest,
        device: str = "cpu",
        threads: int | None = None,
        data_parallel: bool | str = False,
        **options,
    ) -> NeuronEngine:
        refuse_options("neuron", options)
        if device not in ("cpu", "neuron"):
            raise ArgumentError(
                "--device", "the neuron engine places components on NeuronCores itself; leave it at cpu"
            )
        if threads:
            raise ArgumentError("--threads", "the neuron engine runs on NeuronCores and has no CPU thread setting")
        cores = cores_for(record, flag_option(data_parallel, "data_parallel"))
        problem = formats.neuron_unavailable()
        if problem:
            raise ArgumentError("--engine", f"neuron {problem}")
        path = Path(folder) / record.name / FILE
        replicas = [load_on_core(path, core) for core in cores]
        return cls(record, CfgSplit(replicas, int(record.config.get("cfg_halves", 1))))


ENGINE = NeuronEngine
