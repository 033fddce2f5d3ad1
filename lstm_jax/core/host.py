"""Facts about the host CPU that choices and cache keys depend on: its model, flags and usable cores.

Read-only: nothing here changes the process. ``machine_key`` names the CPU as it bears on kernel
speed (a virtual machine's model name alone can hide the CPU generation, so the vector and matrix
units are part of it) and the jax version, so a measured choice is never reused on another CPU or
another XLA.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path

__all__ = ["cpu_model", "cpu_flags", "usable_cores", "machine_key"]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return match.group(1).strip() if match else platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
    return set(match.group(1).split()) if match else set()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def machine_key() -> str:
    """The part of every cache key that names this machine's CPU and JAX:
    model name, core count, the vector/matrix units that change kernel speed, jax version."""
    import jax

    units = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & cpu_flags())
    return f"{cpu_model()}, {os.cpu_count()} cores, {' '.join(units) or 'no avx2'}|jax {jax.__version__}"
