"""Process-wide settings that make jitted steps on CPU fast: the C allocator's reuse of memory.

On glibc, ``malloc`` hands out large blocks with ``mmap`` and gives freed memory at the top of the
heap back to the kernel once it exceeds a small threshold. A jitted XLA:CPU program allocates its
temporaries afresh at every call, so each call of a one-step train function maps, touches and
unmaps the same megabytes again: page faults the kernel has to zero-fill. ``tune_malloc`` sets
``M_MMAP_MAX = 0`` (large blocks come from the heap too) and ``M_TRIM_THRESHOLD`` to 2 GiB, the
most ``mallopt`` takes (freed memory stays for the next call), so the second call reuses the
first call's pages. The price is a higher resident set: memory freed by one step is kept for the
next.

It changes the whole process, so it is an explicit call, never a side effect of ``import
lstm_jax``: ``train.py``, the benchmarks and the docs' own-step example call it first thing,
before the process allocates its arrays. ``LSTM_JAX_MALLOC=default`` makes it a no-op (e.g. in a
process that holds many other large, short-lived buffers).

Where it does not reach: with JAX's asynchronous dispatch (the default) a one-device CPU program
runs on one of XLA's worker threads, and glibc serves that thread from an arena of its own whose
heaps hold 64 MiB: a bigger block comes from ``mmap`` whatever ``M_MMAP_MAX`` says. The ways out
change more than the allocator, so they are the user's choice: synchronous dispatch
(``jax.config.update("jax_cpu_enable_async_dispatch", False)`` before the first computation) or
one arena for all threads (``GLIBC_TUNABLES=glibc.malloc.arena_max=1``). ``benchmarks/malloc.py``
measures each setting; the docs' page on CPU process settings shows the results.
"""

from __future__ import annotations

import ctypes
import platform

from lstm_jax.dispatch import switches

__all__ = ["tune_malloc", "malloc_tuned", "MALLOC_ENV"]

MALLOC_ENV = switches.MALLOC
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_BYTES = 2**31 - 1  # the most mallopt takes (its value is a C int)
_state = {"tuned": False}


def tune_malloc() -> bool:
    """Keep freed memory for reuse (see the module docstring). Returns whether the settings were
    applied: False off glibc, or when ``LSTM_JAX_MALLOC=default`` is set. Safe to call twice."""
    if switches.malloc_mode() == "default":
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
