"""Typed model configs read from diffusers' `config.json` files.

Each reference model has a frozen dataclass config whose field names are diffusers' own.
`parse_config` turns the JSON dict into that dataclass, checking every value against the
field's annotation, so a malformed file fails at load time with the file and field named,
never later inside a forward pass.

Fields diffusers writes that have no effect on inference (dropout, sample sizes used only for
training) are listed as `ignored`; fields for architectures we do not implement are listed in
`must_be_default` with the only value we accept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from difflower.errors import CheckpointError

logger = logging.getLogger(__name__)

C = TypeVar("C")

# Keys diffusers and transformers add to every config for bookkeeping.
_BOOKKEEPING_PREFIX = "_"


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, or raise CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(path, "file not found; is this a diffusers-format folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def parse_config(
    cls: type[C],
    raw: dict[str, Any],
    source: Path,
    *,
    class_names: tuple[str, ...] = (),
    ignored: frozenset[str] = frozenset(),
    must_be_default: dict[str, Any] | None = None,
) -> C:
    """Build the frozen dataclass `cls` from a config dict, checking names, types and values.

    `class_names` lists the accepted `_class_name` values (empty: not checked).
    Raises CheckpointError naming `source` and the offending field.
    """
    class_name = raw.get("_class_name")
    if class_names and class_name not in class_names:
        raise CheckpointError(
            source,
            f"field '_class_name' is {class_name!r}; difflower reads {', '.join(class_names)} here",
        )
    must_be_default = must_be_default or {}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # every config class is a dataclass
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith(_BOOKKEEPING_PREFIX) or key in ignored:
            continue
        if key in must_be_default:
            if _normalise(value) != _normalise(must_be_default[key]):
                raise CheckpointError(
                    source,
                    f"field '{key}' = {value!r} is not supported by difflower "
                    f"(only {must_be_default[key]!r}); this architecture variant is not implemented",
                )
            continue
        if key not in known:
            logger.warning("%s: unknown field '%s' ignored", source, key)
            continue
        values[key] = _check(value, hints[key], source, key)
    try:
        return cls(**values)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as err:
        raise CheckpointError(source, str(err)) from None


def require_positive(config: Any, *names: str) -> None:
    """ValueError naming the first field among `names` (an int, a tuple of ints, or None) below 1:
    sizes, channel and layer counts, where a 0 or a negative number is a corrupt config."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if isinstance(item, int) and not isinstance(item, bool) and item < 1:
                raise ValueError(f"field '{name}' must be positive, got {value!r}")


def load_config(
    cls: type[C],
    path: Path,
    **kwargs: Any,
) -> C:
    """Read `path` (a config.json) and parse it into `cls`; see `parse_config`."""
    return parse_config(cls, read_json(path), path, **kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: _to_json(v) for k, v in dataclasses.asdict(config).items()}


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _normalise(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, converted) for a JSON value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        out = []
        for item in value:
            ok, converted = _matches(item, item_tp)
            if not ok:
                return False, value
            out.append(converted)
        return True, tuple(out)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported annotation {tp!r}")


def _check(value: Any, tp: Any, source: Path, key: str) -> Any:
    ok, converted = _matches(value, tp)
    if not ok:
        raise CheckpointError(source, f"field '{key}' must be {_type_name(tp)}, got {json.dumps(value)}")
    return converted


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
