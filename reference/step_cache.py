"""Step caching policies the one loop consults each step.

`DeepCache` (Ma et al., "DeepCache: Accelerating Diffusion Models for Free"), for UNets: every
`interval` steps the whole UNet runs and the deep feature of its skip branch is kept; the steps
between run only the shallow path (the first layers of the down path and the matching last
layers of the up path) fed with that feature. The split is the UNet's own
(`UNet2DConditionModel.deepcache_split`); the policy only decides which steps refresh, counting
the steps of the run (so img2img's first step refreshes, as in DeepCache's helper). With a
`center`, the refresh steps follow the paper's non-uniform schedule instead (as many, crowded
around that step by a power curve; `quadratic_refresh_steps`).

`FirstBlockCache` (ParaAttention's first-block cache, diffusers' `FirstBlockCacheConfig`), for
transformers: every step runs the first block; the blocks after it run only when the first
block's residual moved by more than `threshold` (relative mean absolute change against the last
step that ran them), or, in fixed-interval mode, every `interval` steps. Otherwise the tail
residual they added last time is reused.

`CacheGraphs` is the export side: which extra graphs an artifact holds for these policies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from difflower.errors import ArgumentError

CACHE_KINDS = ("deepcache", "first-block")
DEFAULT_POWER = 1.2  # DeepCache's sample_from_quad_center default
USAGE = "deepcache[:interval=N,branch=K,center=C,pow=P] or first-block[:threshold=T | :interval=N]"


@dataclass(frozen=True)
class DeepCache:
    """Refresh the deep feature every `interval` steps; `branch` is DeepCache's cache_branch_id.

    With `center`, the paper's non-uniform schedule instead: as many refresh steps as the uniform
    one has, spaced by a power curve (`power`) so they crowd around step `center`."""

    interval: int = 3
    branch: int = 0
    center: int | None = None
    power: float | None = None  # the curve's power (DeepCache's default 1.2); needs `center`

    def __post_init__(self) -> None:
        _require_int(self, "interval", 1)
        _require_int(self, "branch", 0)
        if self.center is not None:
            _require_int(self, "center", 1)
        elif self.power is not None:
            raise ArgumentError("cache", "deepcache pow shapes the non-uniform schedule: give center=C too")
        power = self.power
        if power is not None and (isinstance(power, bool) or not isinstance(power, int | float) or not 1 < power < 16):
            raise ArgumentError("cache", f"deepcache pow must be a number in (1, 16), got {power!r}")

    def refresh_steps(self, steps: int) -> list[int]:
        """The steps (0-based within a run of `steps`) on which the whole UNet runs."""
        if self.center is None or self.interval == 1:
            return list(range(0, steps, self.interval))
        count = -(-steps // self.interval)  # as many as the uniform schedule has
        return quadratic_refresh_steps(steps, count, self.center, self.power or DEFAULT_POWER)

    def __str__(self) -> str:
        text = f"deepcache:interval={self.interval},branch={self.branch}"
        return text if self.center is None else f"{text},center={self.center},pow={self.power or DEFAULT_POWER:g}"


def quadratic_refresh_steps(steps: int, count: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform schedule (its `sample_from_quad_center`): `count` refresh steps of
    `steps`, step 0 and the points of a power curve through `center`, lowering the power by 0.02
    until the curve yields `count` distinct steps.

    The curve runs between (-center)^(1/power) and (steps - center)^(1/power); the first is a
    fractional power of a negative number, which DeepCache's code takes as a complex number, and
    the steps are the real parts of the curve, truncated. That arithmetic is reproduced here so
    that the schedule is the published one."""
    trial = power
    while trial > 1:
        ends = complex(-center) ** (1 / trial), complex(steps - center) ** (1 / trial)
        curve = np.linspace(ends[0], ends[1], count + 1) ** trial
        offsets = np.unique(curve.real.astype(np.int32))[1:-1]
        chosen = [0, *(int(offset) + center for offset in offsets)]
        if len(chosen) == count:
            return sorted(chosen)
        trial -= 0.02
    raise ArgumentError(
        "cache", f"deepcache center={center}: no power curve gives {count} refresh steps of {steps}; move the center"
    )


@dataclass(frozen=True)
class FirstBlockCache:
    """Run the blocks after the first when its residual changed by more than `threshold` (diffusers'
    default 0.05), or, with `interval`, every `interval` steps."""

    threshold: float | None = None
    interval: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.interval is not None:
            raise ArgumentError("cache", "first-block takes threshold=T or interval=N, not both")
        if self.interval is not None:
            _require_int(self, "interval", 1)
        elif self.threshold is None:
            object.__setattr__(self, "threshold", 0.05)
        elif (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int | float)
            or not 0 <= self.threshold < float("inf")
        ):
            raise ArgumentError("cache", f"first-block threshold must be a finite number >= 0, got {self.threshold!r}")

    def run_all(self, step: int, residual: torch.Tensor | None, last: torch.Tensor | None) -> bool:
        """Whether every block runs at `step` (0-based within the run): every `interval` steps, or
        when the first block's `residual` moved by more than `threshold` from `last`, its value at
        the last step that ran every block (diffusers' relative mean absolute change)."""
        if self.interval is not None:
            return step % self.interval == 0
        if last is None or residual is None or self.threshold is None:
            return True
        change = (residual - last).abs().mean() / last.abs().mean()
        return bool(change.item() > self.threshold)

    def __str__(self) -> str:
        if self.interval is not None:
            return f"first-block:interval={self.interval}"
        return f"first-block:threshold={self.threshold:g}"


CachePolicy = DeepCache | FirstBlockCache


def parse_cache(value: str | CachePolicy | None) -> CachePolicy | None:
    """A cache policy from `deepcache[:interval=N,branch=K]` or `first-block[:threshold=T | :interval=N]`
    (or a policy object, or None)."""
    if value is None or isinstance(value, (DeepCache, FirstBlockCache)):
        return value
    if not isinstance(value, str):
        raise ArgumentError("cache", f"must be a string such as 'deepcache:interval=3', got {type(value).__name__}")
    kind, settings = _parse(value)
    if kind == "deepcache":
        power = _number(settings.pop("pow", None), "pow")
        policy = DeepCache(**_ints(settings, ("interval", "branch", "center"), kind))
        return policy if power is None else replace(policy, power=power)
    if set(settings) - {"threshold", "interval"}:
        raise ArgumentError("cache", f"expected threshold=T or interval=N after 'first-block:', got {value!r}")
    threshold = _number(settings.pop("threshold", None), "threshold")
    return FirstBlockCache(threshold=threshold, **_ints(settings, ("interval",), kind))


def _number(text: str | None, key: str) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        raise ArgumentError("cache", f"{key} must be a number, got {text!r}") from None


@dataclass(frozen=True)
class CacheGraphs:
    """The graphs `export --cache-graphs` adds: DeepCache's UNet split at `branch`, or the
    first-block cache's transformer parts."""

    kind: str
    branch: int | None = None

    def __str__(self) -> str:
        return f"deepcache:branch={self.branch}" if self.kind == "deepcache" else self.kind

    def serves(self, policy: CachePolicy) -> bool:
        """Whether an artifact with these graphs can run `policy`."""
        if isinstance(policy, DeepCache):
            return self.kind == "deepcache" and self.branch == policy.branch
        return self.kind == "first-block"


def parse_cache_graphs(value: str | None) -> CacheGraphs | None:
    """`deepcache[:branch=K]` or `first-block`: the intervals and thresholds are chosen per run."""
    if value is None:
        return None
    try:
        kind, settings = _parse(value)
    except ArgumentError as err:
        raise ArgumentError("--cache-graphs", err.detail) from None
    allowed = ("branch",) if kind == "deepcache" else ()
    if set(settings) - set(allowed):
        raise ArgumentError(
            "--cache-graphs",
            "takes deepcache[:branch=K] or first-block; intervals and thresholds are chosen per run (--cache)",
        )
    if kind == "first-block":
        return CacheGraphs(kind)
    try:
        return CacheGraphs(kind, DeepCache(**_ints(settings, allowed, kind)).branch)
    except ArgumentError as err:
        raise ArgumentError("--cache-graphs", err.detail) from None


def _parse(value: str) -> tuple[str, dict[str, str]]:
    kind, _, options = value.partition(":")
    if kind not in CACHE_KINDS:
        raise ArgumentError("cache", f"unknown cache {kind!r}; give {USAGE}")
    settings: dict[str, str] = {}
    for pair in filter(None, options.split(",")):
        key, sep, text = pair.partition("=")
        if not sep:
            raise ArgumentError("cache", f"expected key=value after '{kind}:', got {pair!r}; give {USAGE}")
        settings[key] = text
    return kind, settings


def _ints(settings: dict[str, str], keys: tuple[str, ...], kind: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for key, text in settings.items():
        if key not in keys:
            raise ArgumentError("cache", f"{kind} takes {', '.join(k + '=N' for k in keys)}; got {key}={text}")
        try:
            values[key] = int(text)
        except ValueError:
            raise ArgumentError("cache", f"{key} must be an int, got {text!r}") from None
    return values


def _require_int(policy: object, name: str, minimum: int) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "deepcache" if isinstance(policy, DeepCache) else "first-block"
        raise ArgumentError("cache", f"{kind} {name} must be an int >= {minimum}")
