"""Process-wide settings that make jitted steps on CPU fast: the C allocator's reuse of memory.

On glibc, ``malloc`` hands out large blocks with ``mmap`` and gives freed memory at the top of the
heap back to the kernel once it exceeds a small threshold. A jitted XLA:CPU program allocates its
temporaries afresh at every call, so each call of a one-step train function maps, touches and
unmaps the same megabytes again: page faults the kernel has to zero-fill. ``tune_malloc`` sets
``M_MMAP_MAX = 0`` (large blocks come from the heap too) and ``M_TRIM_THRESHOLD`` to 512 MiB
(freed memory stays for the next call), so the second call reuses the first call's pages.

Measured side by side on a 2-core Intel Xeon with AVX-512 (``python benchmarks/malloc.py``, each
setting in its own processes, taking turns; ``benchmarks/results/malloc-*.md``): a plain
``jax.jit`` seed LSTM train step ran 1.42x faster and its page faults fell from about 4,800 per
step to about 440; PyTorch's step, run under the same settings, gains as well (1.40x), so
comparisons stay fair. The price is a higher resident set: memory freed by one step is kept for
the next (peak RSS 554 MB against 694 at ``seed``).

Not covered: a step whose temporaries XLA allocates on one of its worker threads in blocks larger
than that thread's malloc arena can hold (64 MiB heaps) gets them from ``mmap`` whatever
``M_MMAP_MAX`` says, so the ``large`` LSTM step faults about 44,000 pages per call either way.
``M_ARENA_MAX = 1`` (one arena for all threads) removes that, and made the ``large`` one-step call
1.12x (float32) to 1.37x (bf16) faster, but the ``seed`` one-step call and Trainer 1.2x slower
(likely the threads contending for the one arena's lock), so it is left to the user: set
``GLIBC_TUNABLES`` as the README shows.

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
