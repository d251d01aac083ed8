"""What machine a result came from: CPU model, the vector instruction sets that change numbers
and speed (AVX2, AVX-512, VNNI, AMX: int8 and fp32 kernels differ with them), memory, GPU.

Recorded in every manifest and benchmark report, since absolute times and low-precision
results compare only between machines with the same instruction sets.
"""

from __future__ import annotations

import os
import platform
from typing import Any

# The /proc/cpuinfo flags that select different kernels in torch, ONNX Runtime and OpenVINO.
RELEVANT_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "sve",
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags of RELEVANT_FLAGS this CPU has."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in RELEVANT_FLAGS if f in flags]


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, else the physical memory, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def machine_record() -> dict[str, Any]:
    """CPU model, cores, instruction sets and OS of this machine."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
    }
