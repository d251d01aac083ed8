"""The parity gates of DESIGN.md, per precision and level.

| precision   | component                              | trajectory (final latents)  | image        |
|-------------|----------------------------------------|-----------------------------|--------------|
| fp32        | max abs <= 1e-4 (VAE 3e-4)             | atol 1e-4 + rtol 1e-2       | PSNR >= 40   |
| fp16 / bf16 | PSNR >= 35, cosine >= 0.999, finite    | PSNR >= 30                  | PSNR >= 30   |
| int8 / pal. | PSNR >= 30, finite                     | PSNR >= 25                  | PSNR >= 25   |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflower.artifact.precision import Precision, precision_class
from difflower.validate.metrics import Metrics

VAE_KINDS = ("vae_encoder", "vae_decoder")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    gate: str  # the rule, in words, for reports

    def to_json(self) -> dict[str, object]:
        return {"passed": self.passed, "gate": self.gate}


def _psnr_at_least(metrics: Metrics, floor: float) -> bool:
    return metrics.nonfinite == 0 and (metrics.psnr is None or metrics.psnr >= floor)


# Step-cache outputs that are differences of two nearly equal hidden states (a block's input and
# output): int8's error on both lands on a small signal, so their own PSNR says little. In int8
# they are held to finite values only; `validate --cache` gates the cached run they feed.
RESIDUAL_OUTPUTS = ("tail_residual", "first_block_residual")


def component_verdict(precision: Precision, kind: str, metrics: Metrics, output: str = "") -> Verdict:
    """Component parity: one exported component's `output` vs the reference module's on seeded inputs."""
    level = precision_class(precision)
    if level == "low" and output in RESIDUAL_OUTPUTS:
        return Verdict(metrics.nonfinite == 0, "no NaN/Inf (a cache residual in int8: validate --cache gates its run)")
    if level == "fp32":
        # VAE: many wide convolutions accumulate in a different order on every backend.
        bound = 3e-4 if kind in VAE_KINDS else 1e-4
        return Verdict(metrics.nonfinite == 0 and metrics.max_abs <= bound, f"max abs <= {bound:g}")
    if level == "half":
        ok = _psnr_at_least(metrics, 35) and metrics.cosine >= 0.999
        return Verdict(ok, "PSNR >= 35 dB, cosine >= 0.999, no NaN/Inf")
    return Verdict(_psnr_at_least(metrics, 30), "PSNR >= 30 dB, no NaN/Inf")


def trajectory_verdict(precision: Precision, actual: torch.Tensor, expected: torch.Tensor, metrics: Metrics) -> Verdict:
    """The final latents of the whole denoising run vs the eager pipeline's, same noise."""
    level = precision_class(precision)
    if level == "fp32":
        a, e = actual.double(), expected.double()
        ok = metrics.nonfinite == 0 and bool(torch.all((a - e).abs() <= 1e-4 + 1e-2 * e.abs()))
        return Verdict(ok, "|a - e| <= 1e-4 + 1e-2 |e|")
    floor = 30 if level == "half" else 25
    return Verdict(_psnr_at_least(metrics, floor), f"PSNR >= {floor} dB")


def image_verdict(precision: Precision, metrics: Metrics) -> Verdict:
    """The final decoded image vs the reference image."""
    floor = {"fp32": 40, "half": 30, "low": 25}[precision_class(precision)]
    return Verdict(_psnr_at_least(metrics, floor), f"PSNR >= {floor} dB")
