"""The parity record: how far one exported component is from the reference, per output,
and whether its gate passed. Produced by `difflower.validate.parity` (export, validate and
bench all call the same function), stored in the manifest, printed by `info`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class OutputParity:
    """One output tensor of a component against the reference's."""

    max_abs: float
    max_rel: float
    cosine: float
    psnr: float | None  # None: identical (no finite PSNR)
    nonfinite: int
    gate: str
    passed: bool


@dataclass(frozen=True)
class ComponentParity:
    """A component's parity: measured (with every output's numbers) or not, and why not."""

    measured: bool
    passed: bool | None  # None: not measured on this machine
    gate: str
    summary: str
    outputs: dict[str, OutputParity] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the engine and options it ran with

    @staticmethod
    def unmeasured(reason: str, gate: str) -> ComponentParity:
        return ComponentParity(measured=False, passed=None, gate=gate, summary=reason)

    @staticmethod
    def of_outputs(outputs: dict[str, OutputParity], settings: dict[str, Any] | None = None) -> ComponentParity:
        """The record of measured outputs, summarised by the one farthest from the reference."""
        worst = max(outputs.values(), key=lambda o: o.max_abs)
        psnr = "inf" if worst.psnr is None else f"{worst.psnr:.1f} dB"
        return ComponentParity(
            measured=True,
            passed=all(o.passed for o in outputs.values()),
            gate=worst.gate,
            summary=f"max abs {worst.max_abs:.3g}, PSNR {psnr}",
            outputs=outputs,
            settings=dict(settings or {}),
        )

    @property
    def max_abs(self) -> float | None:
        return max((o.max_abs for o in self.outputs.values()), default=None)

    @property
    def psnr(self) -> float | None:
        finite = [o.psnr for o in self.outputs.values() if o.psnr is not None]
        return min(finite, default=None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["max_abs"], out["psnr"] = self.max_abs, self.psnr  # the worst output's, for readers of the JSON
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ComponentParity:
        outputs = {name: OutputParity(**values) for name, values in (raw.get("outputs") or {}).items()}
        return ComponentParity(
            measured=bool(raw.get("measured", bool(outputs))),
            passed=raw.get("passed"),
            gate=str(raw.get("gate", "")),
            summary=str(raw.get("summary", "")),
            outputs=outputs,
            settings=dict(raw.get("settings") or {}),
        )
