"""Numerical distance between a backend's tensor and the reference's.

PSNR follows DESIGN.md: 20 * log10(max|reference| / RMSE). Identical tensors have no finite
PSNR; it is reported as None (JSON null) and counts as passing every PSNR gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Metrics:
    """How far `actual` is from `expected` (computed in float64)."""

    max_abs: float
    max_rel: float
    cosine: float
    psnr: float | None
    nonfinite: int  # NaN or Inf entries in `actual`

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def compare(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> Metrics:
    """Metrics of `actual` against `expected` (same shape)."""
    a = _as_tensor(actual).detach().cpu().double()
    e = _as_tensor(expected).detach().cpu().double()
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs expected {tuple(e.shape)}")
    nonfinite = int((~torch.isfinite(a)).sum())
    if a.numel() == 0:
        return Metrics(0.0, 0.0, 1.0, None, nonfinite)
    finite = torch.isfinite(a)
    diff = torch.where(finite, a - e, torch.full_like(a, math.inf))
    max_abs = float(diff.abs().max())
    # Relative error against the reference's scale, so near-zero entries do not dominate.
    scale = float(e.abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    af, ef = torch.nan_to_num(a).flatten(), e.flatten()
    denom = float(af.norm() * ef.norm())
    cosine = float(af @ ef) / denom if denom > 0 else (1.0 if float(af.norm()) == float(ef.norm()) else 0.0)
    rmse = float(torch.sqrt(torch.mean((af - ef) ** 2)))
    psnr = None if rmse == 0 else (20 * math.log10(scale / rmse) if scale > 0 and scale / rmse > 0 else -math.inf)
    if nonfinite:
        psnr, cosine = -math.inf, 0.0
    return Metrics(max_abs, max_rel, cosine, psnr, nonfinite)
