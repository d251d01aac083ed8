"""Engine `torch`: the eager reference module of a component behind the engine interface.

It runs the same wrapper modules the exporters export, loaded from the artifact's source
checkpoint, so it is the baseline every other engine is timed and compared against.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from difflower.artifact.manifest import ComponentRecord, recorded_loras
from difflower.artifact.specs import load_export_module, spec_for_record
from difflower.runtimes.engine import Array, Engine, refuse_options, torch_dtype


class TorchEngine(Engine):
    """One component's reference module (fp32, eager)."""

    backend = "torch"

    def __init__(self, record: ComponentRecord, module: torch.nn.Module, device: str = "cpu"):
        super().__init__(record)
        self.device = torch.device(device)
        self.module = module.to(self.device)

    @classmethod
    def open(
        cls, record: ComponentRecord, folder: Path, manifest, device: str = "cpu", threads: int | None = None, **options
    ) -> TorchEngine:
        """The reference module of `record`, loaded from the artifact's source checkpoint."""
        refuse_options("torch", options)
        if threads:
            torch.set_num_threads(threads)
        source, loras = Path(manifest.source["path"]), recorded_loras(manifest)
        return cls(record, load_export_module(spec_for_record(record), source, loras), device)

    @torch.no_grad()
    def run(self, inputs: Mapping[str, Array]) -> dict[str, torch.Tensor]:
        args = []
        for spec in self.inputs:
            value = inputs[spec.name]
            value = torch.from_numpy(value) if not isinstance(value, torch.Tensor) else value
            args.append(value.to(self.device, torch_dtype(spec.dtype)))
        outputs = self.module(*args)
        return {spec.name: out for spec, out in zip(self.outputs, outputs, strict=True)}


ENGINE = TorchEngine
