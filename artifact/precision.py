"""Precision is a type: what an artifact computes in, checked where it enters.

An unknown string (`fp61`) used to get the loosest parity gate silently; now it is refused at
the edge (an export option, a manifest field) and the gates see only these values.
"""

from __future__ import annotations

from typing import Literal, get_args

from difflower.errors import ArgumentError

Precision = Literal["fp32", "fp16", "bf16", "int8", "int4", "fp8", "palettized"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# What weights can be stored and computed in before any quantization.
StoragePrecision = Literal["fp32", "fp16", "bf16"]
STORAGE_PRECISIONS: tuple[StoragePrecision, ...] = get_args(StoragePrecision)
# The three rows of DESIGN's gate table.
PrecisionClass = Literal["fp32", "half", "low"]


def parse_precision(value: object, argument: str = "--precision") -> Precision:
    """`value` as a Precision, or an ArgumentError naming `argument` and the known values."""
    if value not in PRECISIONS:
        raise ArgumentError(argument, f"must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value  # type: ignore[return-value]


def parse_storage_precision(value: object, argument: str = "--precision") -> StoragePrecision:
    if value not in STORAGE_PRECISIONS:
        raise ArgumentError(argument, f"must be one of {', '.join(STORAGE_PRECISIONS)}, got {value!r}")
    return value  # type: ignore[return-value]


def precision_class(precision: Precision) -> PrecisionClass:
    """fp32, half (fp16/bf16) or low (int8, int4, fp8, palettized): the row of the gate table."""
    if precision == "fp32":
        return "fp32"
    if precision in ("fp16", "bf16"):
        return "half"
    return "low"


def quantized_precision(mode: str) -> Precision:
    """The precision a `--quantize` mode leaves the artifact in (what the gates judge)."""
    if mode.startswith("int4"):
        return "int4"
    if mode.startswith("palettize"):
        return "palettized"
    if mode == "fp8":
        return "fp8"
    return "int8"
