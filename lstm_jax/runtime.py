"""Process-wide settings that make jitted steps on CPU fast: the C allocator's reuse of memory.

On glibc, ``malloc`` hands out large blocks with ``mmap`` and gives freed memory at the top of the
heap back to the kernel once it exceeds a small threshold. A jitted XLA:CPU program allocates its
temporaries afresh at every call, so each call of a one-step train function maps, touches and
unmaps the same megabytes again: page faults the kernel has to zero-fill. ``tune_malloc`` sets
``M_MMAP_MAX = 0`` (large blocks come from the heap too) and ``M_TRIM_THRESHOLD`` to 2 GiB, the
most ``mallopt`` takes (freed memory stays for the next call; the 512 MiB used before was less
than the float32 ``large`` LSTM step's temporaries), so the second call reuses the first call's
pages.

Measured side by side on a 2-core Intel Xeon with AVX-512 (``python benchmarks/malloc.py``, each
setting in its own processes, taking turns; ``benchmarks/results/malloc-*.md``): a plain
``jax.jit`` seed LSTM train step ran 1.27x-1.42x faster (two runs) and its page faults fell from
about 4,800 per step to about 440; PyTorch's step, run under the same settings, gains as well
(1.35x-1.40x), so comparisons stay fair. The price is a higher resident set: memory freed by one
step is kept for the next (peak RSS 553 MB against 687 at ``seed``).

Where it does not reach: with JAX's asynchronous dispatch (the default) a one-device CPU program
runs on one of XLA's worker threads, and glibc serves that thread from an arena of its own whose
heaps hold 64 MiB: a bigger block comes from ``mmap`` whatever ``M_MMAP_MAX`` says, and goes back
at ``free``. So the ``large`` LSTM step, one per call, still faults about 40,000 pages per call.
Both ways out change more than the allocator, so they are the user's choice (README, Benchmarks):
``jax.config.update("jax_cpu_enable_async_dispatch", False)`` before the first computation (the
program then runs on the calling thread, from the main heap), or one arena for all threads
(``GLIBC_TUNABLES=...:glibc.malloc.arena_max=1``), which also made the ``seed`` steps up to 1.25x
slower. Synchronous dispatch made the ``large`` one-step call 1.43x (bf16) and 1.16x (float32)
faster, with about 450-750 faults per step left (``benchmarks/malloc.py``); in the latest speed run
(``benchmarks/speed.py``, the "synchronous dispatch" rows) the LSTM's one-step call gained 1.55x
(float32) and 1.68x (bf16) at ``default``, 1.30x and 1.40x at ``large``. Transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``) do not help: they cut the float32 ``large`` step's
faults from about 80,000 to 800 but not its time (521-560 against 566-584 ms, two processes
each), as the kernel still zero-fills every page the freed block brings back.

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
_TRIM_BYTES = 2**31 - 1  # the most mallopt takes (its value is a C int)
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
