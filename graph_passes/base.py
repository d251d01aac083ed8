"""What every graph pass returns, and the error it raises when an expected rewrite did not fire."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from difflower.errors import DifflowerError


class PassDidNotFire(DifflowerError):
    """A pass found nothing to rewrite where it expected to: silently doing nothing is a bug."""


@dataclass
class PassResult:
    """What a pass rewrote, how many times, and parity before/after where it measured it."""

    name: str
    rewrites: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rewrites.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def quieter(logger: logging.Logger, level: int = logging.WARNING) -> Iterator[None]:
    """Raise `logger`'s level for a block: the libraries passes call log every step at INFO,
    and the PassResult reports what happened instead."""
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def measured(result: PassResult, module, inputs: dict, expected, key: str = "max_abs_vs_reference") -> PassResult:
    """`result` with the largest difference between `module`'s outputs on `inputs` (after the
    pass) and `expected` (before it) recorded as its parity."""
    import torch

    with torch.no_grad():
        got = module(*inputs.values())
    result.parity = {key: max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))}
    return result
