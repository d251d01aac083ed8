"""Models larger than memory: a module built on the meta device whose weights stay in the
checkpoint's safetensors files and are read one tensor at a time.

- `CheckpointTensors` knows which file holds each tensor and reads one when asked (the file is
  memory-mapped only for that read, so nothing of it stays resident).
- `Skeleton` is a component built from its config on the meta device (no memory for weights),
  checked against the files' keys and shapes exactly as a normal load is.
- `streamed_forward` runs a skeleton eagerly: a module's own weights are read (cast to the
  compute dtype) just before its forward and dropped when the next module outside it starts, so
  the working set is one layer's weights plus the activations. It serves the expected outputs and
  the fp16 island measurement of an export whose model does not fit in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from difflower.errors import CheckpointError
from difflower.reference.loading import check_weights, weight_files

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class CheckpointTensors:
    """The tensors of one component's safetensors file(s), read one at a time."""

    def __init__(self, folder: Path, variant: str | None = None) -> None:
        self.folder = Path(folder)
        self.origin: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in weight_files(self.folder, variant):
            with self._open(path) as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    dtype = _DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise CheckpointError(
                            path,
                            f"tensor '{key}' is {view.get_dtype()}: weights stream as floats; export without "
                            "--stream-weights",
                        )
                    self.origin[key] = path
                    self.shapes[key] = tuple(view.get_shape())
                    self.dtypes[key] = dtype

    @staticmethod
    @contextlib.contextmanager
    def _open(path: Path) -> Iterator:
        try:
            with safe_open(str(path), framework="pt") as handle:
                yield handle
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                path, f"cannot read safetensors ({err}); the file is truncated or corrupt, re-download or re-save it"
            ) from None

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * self.dtypes[key].itemsize for key, shape in self.shapes.items())

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key`, cast to `dtype`; a copy: the file is unmapped when this returns."""
        with self._open(self.origin[key]) as handle:
            tensor = handle.get_tensor(key)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


@dataclass
class Skeleton:
    """A component's module on the meta device (`module`, e.g. an export wrapper) and the files
    that hold its weights; `prefix` turns a parameter's name in `module` into its checkpoint key."""

    module: nn.Module
    tensors: CheckpointTensors
    prefix: str

    def key(self, name: str) -> str:
        """The checkpoint key of `module`'s parameter `name`."""
        if not name.startswith(self.prefix):
            raise KeyError(f"{name} is not under {self.prefix!r}")
        return name[len(self.prefix) :]


def skeleton(module: nn.Module, model: nn.Module, folder: Path, prefix: str) -> Skeleton:
    """`module` (a wrapper around the meta-device `model`, whose parameters it names with
    `prefix`) with `model` checked against the weights in `folder`: the same keys and shapes a
    normal load demands, so a wrong file fails here with the same message."""
    tensors = CheckpointTensors(folder)
    check_weights(model, tensors.shapes, tensors.origin, folder)
    stored = set(module.state_dict())
    unstored = [name for name, _ in module.named_buffers() if name not in stored]
    if unstored:  # computed in __init__ and not in the files: a meta skeleton has no values for it
        raise CheckpointError(folder / "config.json", f"buffer '{unstored[0]}' is not stored; it cannot be streamed")
    return Skeleton(module.eval().requires_grad_(False), tensors, prefix)


@contextlib.contextmanager
def streamed_forward(sk: Skeleton, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """`sk.module`, runnable while the context is open: each module's own parameters are read
    (as `dtype`; stored buffers as they are) when its forward starts and dropped back to the meta
    device when a module that is not its descendant starts, or when the context closes.

    Dropping at the next module's start rather than at the module's end keeps the weights
    through the module's forward hooks (the fp16 island measurement re-runs a layer in them).
    """
    owners = {name: module for name, module in sk.module.named_modules() if module._parameters or module._buffers}
    meta = {name: (dict(module._parameters), dict(module._buffers)) for name, module in owners.items()}
    loaded: list[str] = []

    def drop(name: str) -> None:
        owners[name]._parameters.update(meta[name][0])
        owners[name]._buffers.update(meta[name][1])

    def before(name: str):
        def load(module: nn.Module, args) -> None:
            for other in [n for n in loaded if not (n == name or n == "" or name.startswith(n + "."))]:
                drop(other)  # a module outside this one: its forward is over
                loaded.remove(other)
            if name in loaded:
                return
            params, buffers = meta[name]
            for local, param in params.items():
                if param is not None:
                    read = sk.tensors.read(sk.key(f"{name}.{local}" if name else local), dtype)
                    module._parameters[local] = nn.Parameter(read, False)
            for local, buffer in buffers.items():  # stored buffers (SD3's position table) keep their dtype
                if buffer is not None:
                    module._buffers[local] = sk.tensors.read(sk.key(f"{name}.{local}" if name else local), buffer.dtype)
            loaded.append(name)

        return load

    handles = [module.register_forward_pre_hook(before(name), prepend=True) for name, module in owners.items()]
    try:
        yield sk.module
    finally:
        for handle in handles:
            handle.remove()
        for name in loaded:
            drop(name)
        loaded.clear()
