"""The artifact manifest, `difflower.json`: what an exported folder holds and how it was made.

Exporters write it last (the folder is renamed into place only after); runtimes and
`validate` read it to know each component's file, tensor names, dtypes and shapes, the
pipeline facts the loop needs, and the parity measured at export.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difflower.errors import CheckpointError

MANIFEST_NAME = "difflower.json"
FORMAT = "difflower-artifact"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Shape entries are ints (fixed) or names (symbolic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> TensorSpec:
        return TensorSpec(raw["name"], raw["dtype"], tuple(raw["shape"]))


@dataclass(frozen=True)
class Bucket:
    """A static shape: images per prompt call and pixel size (the denoiser sees 2x batch with CFG)."""

    batch: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"

    @staticmethod
    def parse(text: str, argument: str = "--static") -> Bucket:
        """'1x512x512' -> Bucket(1, 512, 512)."""
        from difflower.errors import ArgumentError

        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ArgumentError(argument, f"expected BATCHxHEIGHTxWIDTH such as 1x512x512, got {text!r}")
        return Bucket(*(int(p) for p in parts))


@dataclass
class ComponentRecord:
    """One exported component: its files, interface, and the parity measured after export."""

    name: str
    kind: str
    files: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity: dict[str, Any] = field(default_factory=dict)
    export_seconds: float = 0.0
    size_bytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = [t.to_json() for t in self.inputs]
        out["outputs"] = [t.to_json() for t in self.outputs]
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ComponentRecord:
        raw = dict(raw)
        raw["inputs"] = [TensorSpec.from_json(t) for t in raw["inputs"]]
        raw["outputs"] = [TensorSpec.from_json(t) for t in raw["outputs"]]
        return ComponentRecord(**raw)


@dataclass
class Manifest:
    """Everything in `difflower.json`."""

    family: str
    backend: str
    precision: str
    source: dict[str, Any]
    pipeline: dict[str, Any]
    components: dict[str, ComponentRecord]
    shapes: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def buckets(self) -> list[Bucket]:
        return [Bucket(*b) for b in self.shapes.get("buckets", [])]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["components"] = {k: v.to_json() for k, v in self.components.items()}
        return out

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @staticmethod
    def read(folder: Path | str) -> Manifest:
        """Read and check `folder/difflower.json`; every problem names the file and field."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise CheckpointError(path, "not found; is this a difflower artifact folder?")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(path, f"not valid JSON ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(path, f"field 'format' must be {FORMAT!r}; this is not a difflower manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                path, f"field 'format_version' is {raw.get('format_version')!r}; this difflower reads {FORMAT_VERSION}"
            )
        try:
            raw["components"] = {k: ComponentRecord.from_json(v) for k, v in raw["components"].items()}
            manifest = Manifest(**raw)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(path, f"malformed manifest ({err!r}); re-export the artifact") from None
        for record in manifest.components.values():
            for spec in (*record.inputs, *record.outputs):
                if not all(isinstance(d, int) and d > 0 or isinstance(d, str) for d in spec.shape):
                    raise CheckpointError(
                        path, f"component '{record.name}' tensor '{spec.name}' has an invalid shape {list(spec.shape)}"
                    )
        return manifest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_record(root: Path) -> dict[str, Any]:
    """The source checkpoint's path and the sha256 of every weight file in it."""
    root = Path(root).absolute()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".model"))
    return {"path": str(root), "files": {str(p.relative_to(root)): sha256_file(p) for p in files}}
