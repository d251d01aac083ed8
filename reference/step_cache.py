"""Step caching policies the one loop consults each step.

`DeepCache` (Ma et al., "DeepCache: Accelerating Diffusion Models for Free"): every `interval`
steps the whole UNet runs and the deep feature of its skip branch is kept; the steps between run
only the shallow path (the first layers of the down path and the matching last layers of the up
path) fed with that feature. The split is the UNet's own (`UNet2DConditionModel.deepcache_split`);
the policy only decides which steps refresh, counting the steps of the run (so img2img's first
step refreshes, as in DeepCache's helper).
"""

from __future__ import annotations

from dataclasses import dataclass

from difflower.errors import ArgumentError

CACHE_KINDS = ("deepcache",)


@dataclass(frozen=True)
class DeepCache:
    """Refresh the deep feature every `interval` steps; `branch` is DeepCache's cache_branch_id."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self) -> None:
        for name in ("interval", "branch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "interval" else 0):
                raise ArgumentError("cache", f"deepcache {name} must be an int >= {1 if name == 'interval' else 0}")

    def refresh(self, step: int) -> bool:
        """Whether the whole UNet runs at `step` (0-based within the run)."""
        return step % self.interval == 0

    def __str__(self) -> str:
        return f"deepcache:interval={self.interval},branch={self.branch}"


def parse_cache(value: str | DeepCache | None) -> DeepCache | None:
    """A cache policy from `deepcache[:interval=N,branch=K]` (or a policy object, or None)."""
    if value is None or isinstance(value, DeepCache):
        return value
    if not isinstance(value, str):
        raise ArgumentError("cache", f"must be a string such as 'deepcache:interval=3', got {type(value).__name__}")
    kind, _, options = value.partition(":")
    if kind not in CACHE_KINDS:
        raise ArgumentError("cache", f"unknown cache {kind!r}; one of: {', '.join(CACHE_KINDS)}")
    settings: dict[str, int] = {}
    for pair in filter(None, options.split(",")):
        key, sep, text = pair.partition("=")
        if not sep or key not in ("interval", "branch"):
            raise ArgumentError("cache", f"expected interval=N or branch=K after 'deepcache:', got {pair!r}")
        try:
            settings[key] = int(text)
        except ValueError:
            raise ArgumentError("cache", f"{key} must be an int, got {text!r}") from None
    return DeepCache(**settings)
