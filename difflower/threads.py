"""How many threads torch uses, chosen at startup for a machine that others share.

torch's default, one OpenMP thread per core, assumes the cores are free. When another process
keeps one busy, every parallel region waits at its barrier for the thread that sits descheduled
on that core: on 2 cores beside one busy process, a 20-step tiny SD generation took 27.6 s
with 2 threads against 0.5 s with 1. So the command line counts the cores that are idle when it
starts (a short sample of /proc/stat) and gives torch that many threads, at least one; an
explicit `--threads N` (or `DIFFLOWER_THREADS`, or `OMP_NUM_THREADS`) overrides the choice.

The count alone cannot help when the other process arrives after start-up: then the spinning
default wait policy made a tiny generation 43x slower (benchmarks/contention.py). OpenMP's
PASSIVE policy keeps it within 1.5x, costs nothing measurable on a real-size step, and costs
the tiny toy model ~3x on a quiet machine (its parallel regions are shorter than a wake-up);
`OMP_WAIT_POLICY` set by the user wins.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

# Set before torch (and its OpenMP runtime) is loaded: idle OpenMP workers sleep at once
# instead of spinning on a core that another process could use.
OPENMP_WAIT_POLICY = "PASSIVE"


@dataclass(frozen=True)
class ThreadPolicy:
    """`threads`: a fixed count, or None to use the cores found idle over `sample_seconds`."""

    threads: int | None = None
    sample_seconds: float = 0.1


def prepare_process() -> None:
    """Process-wide settings that must precede `import torch` (the CLI calls this first)."""
    os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_seconds: float) -> float:
    """How many cores other processes kept busy over `sample_seconds` (0 where it cannot tell)."""
    before = _cpu_times()
    if before is None:
        return 0.0
    time.sleep(sample_seconds)
    after = _cpu_times()
    if after is None or after[1] == before[1]:
        return 0.0
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def choose_threads(policy: ThreadPolicy) -> int:
    """The thread count `policy` asks for: fixed, from the environment, or the idle cores."""
    if policy.threads is not None:
        return policy.threads
    for variable in ("DIFFLOWER_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    cores = usable_cores()
    return max(1, min(cores, round(cores - busy_cores(policy.sample_seconds))))


def configure_threads(policy: ThreadPolicy) -> int:
    """Give torch the threads `policy` chooses; returns the count."""
    import torch

    threads = choose_threads(policy)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def threads_for_command(policy: ThreadPolicy) -> Iterator[int]:
    """`configure_threads` for one command, torch's count restored after it (main() called twice in
    one process, as tests do, must not leave the first command's choice behind)."""
    import torch

    previous = torch.get_num_threads()
    try:
        yield configure_threads(policy)
    finally:
        torch.set_num_threads(previous)
