"""The artifact manifest, `difflower.json`: what an exported folder holds and how it was made.

Exporters write it last (the folder is renamed into place only after); runtimes and
`validate` read it to know each component's file, tensor names, dtypes and shapes, the
pipeline facts the loop needs, and the parity measured at export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difflower.artifact.parity import ComponentParity
from difflower.artifact.precision import PRECISIONS, Precision
from difflower.errors import ArgumentError, CheckpointError
from difflower.reference.config import sha256_file
from difflower.reference.loading import ControlNetSource
from difflower.reference.lora import Lora, read_lora

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
    parity: ComponentParity = field(default_factory=lambda: ComponentParity.unmeasured("not measured", ""))
    export_seconds: float = 0.0
    size_bytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = [t.to_json() for t in self.inputs]
        out["outputs"] = [t.to_json() for t in self.outputs]
        out["parity"] = self.parity.to_json()
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ComponentRecord:
        raw = dict(raw)
        raw["inputs"] = [TensorSpec.from_json(t) for t in raw["inputs"]]
        raw["outputs"] = [TensorSpec.from_json(t) for t in raw["outputs"]]
        raw["parity"] = ComponentParity.from_json(raw.get("parity") or {})
        return ComponentRecord(**raw)


@dataclass
class Manifest:
    """Everything in `difflower.json`."""

    family: str
    backend: str
    precision: Precision
    source: dict[str, Any]
    pipeline: dict[str, Any]
    components: dict[str, ComponentRecord]
    shapes: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    # Every file of the artifact but difflower.json -> its sha256 at export (`difflower verify`).
    files: dict[str, str] = field(default_factory=dict)
    # The components of a whole pipeline of the source (an export of fewer is partial).
    pipeline_components: list[str] = field(default_factory=list)
    # Where it was exported: CPU model and instruction sets (int8 results depend on them).
    machine: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def buckets(self) -> list[Bucket]:
        return [Bucket(*b) for b in self.shapes.get("buckets", [])]

    def missing_for_generation(self) -> list[str]:
        """The components a txt2img run needs that this (partial) artifact does not hold."""
        needed = [n for n in self.pipeline_components if n != "vae_encoder"]
        return [n for n in needed if n not in self.components]

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
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(path, f"malformed manifest ({err!r}); re-export the artifact") from None
        if not manifest.components:
            raise CheckpointError(path, "field 'components' lists no component; re-export the artifact")
        if manifest.precision not in PRECISIONS:
            raise CheckpointError(
                path, f"field 'precision' is {manifest.precision!r}, not one of {', '.join(PRECISIONS)}; re-export it"
            )
        for name, record in manifest.components.items():
            _check_record(path, Path(folder), name, record)
        _check_shapes(path, manifest.shapes)
        for relative in manifest.files:
            _confined_file(path, Path(folder), relative)
        return manifest


def _confined_file(manifest: Path, folder: Path, relative: str) -> Path:
    """`folder / relative`, refused unless it is a plain relative path that stays inside `folder`."""
    parts = Path(relative).parts
    if not isinstance(relative, str) or not parts or Path(relative).is_absolute() or ".." in parts:
        raise CheckpointError(manifest, f"file entry {relative!r} is not a path inside the artifact; refusing it")
    path = folder / relative
    if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(manifest, f"file entry {relative!r} leads out of {folder}; refusing it")
    return path


def _check_record(manifest: Path, folder: Path, name: str, record: ComponentRecord) -> None:
    if record.name != name or len(Path(name).parts) != 1 or name in (".", ".."):
        raise CheckpointError(manifest, f"component {name!r} is not a plain folder name of the artifact; refusing it")
    _confined_file(manifest, folder, name)
    for relative in record.files:
        _confined_file(manifest, folder, relative)
    for spec in (*record.inputs, *record.outputs):
        if not all(isinstance(d, int) and d > 0 or isinstance(d, str) for d in spec.shape):
            raise CheckpointError(
                manifest, f"component '{record.name}' tensor '{spec.name}' has an invalid shape {list(spec.shape)}"
            )


def _check_shapes(manifest: Path, shapes: Any) -> None:
    """The `shapes` section: graph kind, [batch, height, width] buckets, the CFG flag."""
    ok = isinstance(shapes, dict) and shapes.get("graph") in ("static", "dynamic")
    buckets = shapes.get("buckets", []) if ok else None
    ok = ok and isinstance(buckets, list)
    ok = ok and all(isinstance(b, list) and len(b) == 3 and all(type(v) is int and v > 0 for v in b) for b in buckets)
    ok = ok and isinstance(shapes.get("cfg_doubles_denoiser_batch", True), bool)
    ok = ok and type(shapes.get("t5_sequence_length", 256)) is int
    if not ok:
        raise CheckpointError(
            manifest,
            "field 'shapes' must hold graph (static or dynamic), buckets ([[batch, height, width], ...]), "
            "cfg_doubles_denoiser_batch (true/false); re-export the artifact",
        )


def record_files(folder: Path) -> dict[str, str]:
    """The sha256 of every file under `folder` but the manifest itself, by relative path."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {str(p.relative_to(folder)): sha256_file(p) for p in files}


def verify_files(manifest: Manifest, folder: Path, components: list[str] | None = None) -> int:
    """Check the artifact's files against the sha256 recorded at export (only those of
    `components` when given); returns how many were checked. A changed, missing or extra file
    is a CheckpointError naming it."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not manifest.files:
        raise CheckpointError(
            path, "records no file hashes (exported by an older difflower); re-export it to verify its files"
        )
    wanted = {
        rel: digest for rel, digest in manifest.files.items() if components is None or Path(rel).parts[0] in components
    }
    for relative, digest in wanted.items():
        file = _confined_file(path, folder, relative)
        if not file.is_file():
            raise CheckpointError(file, "is missing; the artifact was changed after export, re-export it")
        if sha256_file(file) != digest:
            raise CheckpointError(
                file, "differs from what was exported (sha256 mismatch); the artifact was changed, re-export it"
            )
    scope = [folder / c for c in components] if components is not None else [folder]
    for root in scope:
        for extra in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
            if str(extra.relative_to(folder)) not in manifest.files:
                raise CheckpointError(
                    extra, "was not written by the export (not in difflower.json); remove it or re-export"
                )
    return len(wanted)


def not_an_artifact(folder: Path) -> str | None:
    """None when `folder` is an artifact difflower wrote (its difflower.json says so), else why not:
    the only kind of folder `export --overwrite` replaces."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return "it holds no difflower.json, so difflower did not write it; remove it yourself or choose another --out"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        return f"its {MANIFEST_NAME} is not a difflower manifest; remove the folder yourself or choose another --out"
    return None


# A Hub cache snapshot links each large file to `blobs/<sha256 of its content>` (the LFS object id).
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def source_file_sha256(path: Path) -> str:
    """sha256 of a source file; for a link into a Hub cache's blobs, the blob's name, which is that
    sha256 (the Hub names LFS objects by it), so a many-GB snapshot is not read again."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):
        return target.name
    return sha256_file(path)


def lora_records(loras: Sequence[Lora]) -> list[dict[str, Any]]:
    """What the manifest records of each fused LoRA: path, scale, format, modules and sha256."""
    return [{**lora.to_json(), "sha256": sha256_file(lora.path)} for lora in loras]


def recorded_loras(manifest: Manifest) -> list[Lora]:
    """The LoRAs an artifact was exported with, read again from their recorded paths for the
    reference side of a comparison; a file that is gone or changed is one line naming it."""
    loras = []
    for record in manifest.source.get("loras", []):
        path = Path(record["path"])
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            raise CheckpointError(
                path,
                f"the artifact's UNet/text encoders have this LoRA fused (sha256 {record['sha256'][:12]}...), and the "
                "file is gone or changed; the reference needs the same file to compare with",
            )
        loras.append(read_lora(path, float(record["scale"])))
    return loras


def controlnet_records(controlnets: Sequence[ControlNetSource]) -> list[dict[str, Any]]:
    """What the manifest records of each ControlNet: its folder (and Hub snapshot) and the sha256
    of its weight files."""
    return [{**source_record(source.folder), **(source.origin or {})} for source in controlnets]


def recorded_controlnets(manifest: Manifest) -> list[Path]:
    """The ControlNet folders an artifact was exported with, for the reference side of a
    comparison; a folder that is gone or whose weights changed is one line naming it."""
    folders = []
    for record in manifest.source.get("controlnets", []):
        folder = Path(record["path"])
        now = source_record(folder)["files"] if folder.is_dir() else {}
        if now != record["files"]:
            raise CheckpointError(
                folder,
                "the artifact holds this ControlNet, and its folder is gone or its weights changed; the reference "
                "needs the same ControlNet to compare with",
            )
        folders.append(folder)
    return folders


def source_record(root: Path) -> dict[str, Any]:
    """The source checkpoint's path and the sha256 of every weight file in it."""
    root = Path(root).absolute()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".model"))
    return {"path": str(root), "files": {str(p.relative_to(root)): source_file_sha256(p) for p in files}}
