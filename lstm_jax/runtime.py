"""Process-wide settings that make jitted steps on CPU fast: the C allocator's reuse of memory.

On glibc, ``malloc`` hands out large blocks with ``mmap`` and gives freed memory at the top of the
heap back to the kernel once it exceeds a small threshold. A jitted XLA:CPU program allocates its
temporaries afresh at every call, so each call of a one-step train function maps, touches and
unmaps the same megabytes again: page faults the kernel has to zero-fill. ``tune_malloc`` sets
``M_MMAP_MAX = 0`` (large blocks come from the heap too) and ``M_TRIM_THRESHOLD`` to 512 MiB
(freed memory stays for the next call), so the second call reuses the first call's pages.

Measured side by side on a 2-core Intel Xeon with AVX-512 (``python benchmarks/malloc.py``, each
setting in its own processes, taking turns; ``benchmarks/results/malloc-*.md``): a plain
``jax.jit`` seed LSTM train step ran about 25% faster and the page faults per step fell from
about 8,000 to under 300; PyTorch's step in the same processes gains as well, so comparisons
within one process stay fair. The price is a higher resident set: memory freed by one step is
kept for the next rather than returned to the system (about 10% more peak RSS at ``seed``).

``import lstm_jax`` applies it on Linux with glibc. Set ``LSTM_JAX_MALLOC=default`` in the
environment before the import to keep the C library's defaults (e.g. in a process that holds
many other large, short-lived buffers).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_malloc", "malloc_tuned", "MALLOC_ENV"]

MALLOC_ENV = "LSTM_JAX_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_BYTES = 512 << 20
_state = {"tuned": False}


def tune_malloc() -> bool:
    """Keep freed memory for reuse (see the module docstring). Returns whether the settings were
    applied: False off glibc, or when ``LSTM_JAX_MALLOC=default`` is set. Safe to call twice."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() in ("default", "0", "off", "no"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES) == 1
    except (OSError, AttributeError):
        return False
    _state["tuned"] = ok
    return ok


def malloc_tuned() -> bool:
    """Whether ``tune_malloc`` changed this process's allocator settings."""
    return _state["tuned"]
