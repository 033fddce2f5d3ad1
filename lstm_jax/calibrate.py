"""Layout choices made by measurement on the machine at hand, cached per (CPU, jax version, shape).

XLA's CPU backend sends a loop's per-step product ``h @ W_h`` to one kernel library (YNNPACK)
and the same product written on a transposed carry (``h.T`` contracted on its first axis) to
another (Eigen); which one is faster depends on the CPU and the shape, and flips between
neighbouring shapes. Measured per-step times (``python benchmarks/layout.py``) ranged from 0.69x
to 1.49x (transposed against row-major) on a 2-core AMD EPYC with AVX2, with the winner changing
from one shape to the next; on a 2-core Intel Xeon with AVX-512 the same grid gave 0.51x to 1.09x,
and the rule fitted on the AMD machine chose the slower layout there. So the fused LSTM and GRU layers ask ``transposed_carry_pays`` at trace time, which

1. returns row-major outside the range where the layout can matter: per-step products below
   ``2 * 2**20`` FLOPs (the loop is bound by its per-step overhead) or above ``2 * 2**28`` (both
   kernels run near the matmul peak), and whenever the default backend is not the CPU;
2. otherwise times both layouts once (a jitted loop of dependent steps, as in the layer: product,
   activation, carry fed back; the layouts taking turns, about half a second) and takes the
   transposed one if it is at least ``MARGIN`` faster;
3. remembers the answer in memory and in a JSON file shared by every process of the machine
   (``$LSTM_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/lstm_jax`` or ``~/.cache/lstm_jax``; written
   under a file lock, so processes starting together measure once), keyed by the CPU model,
   the jax/jaxlib versions, the shape and the compute dtype.

``LSTM_JAX_LAYOUT=row-major`` or ``=transposed`` fixes the choice (no measurement). Both layouts
give the same numbers to float32 rounding (tested), so the choice changes speed only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no shared file lock, each process measures for itself
    fcntl = None

__all__ = ["transposed_carry_pays", "measure_layouts", "cached", "machine_key", "cache_path", "cpu_model", "cpu_flags",
           "LAYOUT_ENV", "MARGIN", "median_seconds", "simplest_fast_enough"]

LAYOUT_ENV = "LSTM_JAX_LAYOUT"
MARGIN = 1.1  # the transposed layout must be this much faster: a choice, not noise
MIN_FLOPS, MAX_FLOPS = 2 * 2**20, 2 * 2**28
STEPS, ROUNDS = 100, 5
_memory: dict[str, bool] = {}
_lock = threading.Lock()
_file_lock = threading.RLock()  # guards _holding: whether this process holds the cache's file lock
_holding = [0]


def transposed_carry_pays(batch: int, hidden: int, gates: int, dtype: Any = None) -> bool:
    """Whether a forward loop of ``batch`` sequences, ``hidden`` units and ``gates`` gates should
    hold its carry transposed on CPU (see the module docstring); ``dtype``: the compute dtype of
    the product (None: float32)."""
    forced = os.environ.get(LAYOUT_ENV, "auto").strip().lower()
    if forced in ("row-major", "rowmajor", "row_major"):
        return False
    if forced == "transposed":
        return True
    flops = 2 * batch * hidden * gates * hidden
    if not MIN_FLOPS <= flops <= MAX_FLOPS or jax.default_backend() != "cpu":
        return False
    name = jnp.dtype(dtype or jnp.float32).name
    key = f"{machine_key()}|{batch}x{hidden}x{gates}|{name}"
    with _lock:
        if key not in _memory:
            _memory[key] = _cached_or_measured(key, batch, hidden, gates, name)
        return _memory[key]


def measure_layouts(batch: int, hidden: int, gates: int, dtype: Any = None) -> tuple[float, float]:
    """Median seconds per step of the loop, row-major and transposed carry, on the CPU."""
    from lstm_jax.fused import recurrent_product

    cpu = jax.devices("cpu")[0]
    compute = jnp.dtype(dtype or jnp.float32)
    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
        w = jax.device_put((0.05 * rng.standard_normal((hidden, gates * hidden))).astype(np.float32), cpu)
        h = jax.device_put(rng.standard_normal((batch, hidden)).astype(np.float32), cpu)
        runs = {}
        for transposed in (False, True):
            def step(h, w, transposed=transposed):
                out = jnp.tanh(recurrent_product(h, w, compute, jnp.float32, transposed))[:, :hidden]
                return out.T if transposed else out

            loop = jax.jit(lambda h, w, step=step: jax.lax.fori_loop(0, STEPS, lambda i, c: step(c, w), h))
            h0 = h.T if transposed else h
            loop(h0, w).block_until_ready()  # compile
            runs[transposed] = (loop, h0)
        seconds = median_seconds({k: (lambda loop=loop, h0=h0: loop(h0, w)) for k, (loop, h0) in runs.items()}, ROUNDS)
    return seconds[False] / STEPS, seconds[True] / STEPS


def simplest_fast_enough(seconds: dict) -> Any:
    """The key of ``seconds`` (ordered from the simplest candidate) to take: a later candidate
    replaces the best before it only where it is ``MARGIN`` faster, so that noise never flips a
    choice towards the more complex set-up."""
    keys = list(seconds)
    best = keys[0]
    for k in keys[1:]:
        if seconds[best] >= MARGIN * seconds[k]:
            best = k
    return best


def median_seconds(runs: dict, rounds: int) -> dict:
    """Median wall seconds of each ``runs[k]()`` (waited for), the runs taking turns ``rounds``
    times so that a slow spell of a shared machine hits all of them alike."""
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(t)) for k, t in times.items()}


def cache_path() -> Path:
    """The JSON file of measured choices shared by this machine's processes."""
    root = os.environ.get("LSTM_JAX_CACHE_DIR")
    if root:
        return Path(root) / "layouts.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lstm_jax" / "layouts.json"


def cached(key: str, measure: Callable[[], dict]) -> dict:
    """The entry stored under ``key`` in the machine's shared cache (``cache_path()``), or
    ``measure()``'s, stored there first. One process measures while the others wait on the file
    lock, then read; a measurement that needs another (timing a Trainer traces the layers, which
    ask for their layout) runs inside the same lock. Without a writable cache directory the
    process measures for itself."""
    path = cache_path()
    with _file_lock:
        if _holding[0]:  # nested: this process already holds the file lock
            return _get_or_measure(path, key, measure)
        if fcntl is None:
            return measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                _holding[0] += 1
                try:
                    return _get_or_measure(path, key, measure)
                finally:
                    _holding[0] -= 1
        except OSError:
            return measure()


def _get_or_measure(path: Path, key: str, measure: Callable[[], dict]) -> dict:
    entry = _read(path).get(key)
    if entry is None:
        entry = measure()
        entries = _read(path)  # again: a nested measurement may have added entries meanwhile
        entries[key] = entry
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(tmp, path)
    return entry


def machine_key() -> str:
    """The part of every cache key that names this machine's CPU and JAX."""
    return f"{_cpu_model()}|jax {jax.__version__}"


def _cached_or_measured(key: str, batch: int, hidden: int, gates: int, dtype: str) -> bool:
    def measure() -> dict:
        row_major, transposed = measure_layouts(batch, hidden, gates, dtype)
        return {"transposed": row_major >= MARGIN * transposed, "row_major_s": row_major, "transposed_s": transposed}

    return bool(cached(key, measure)["transposed"])


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):  # absent or damaged: measure again and rewrite it
        return {}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return match.group(1).strip() if match else platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
    return set(match.group(1).split()) if match else set()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    """The CPU as it bears on kernel speed: model name, cores, and the vector/matrix units (a
    virtual machine's model name alone can hide the CPU generation)."""
    units = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & cpu_flags())
    return f"{cpu_model()}, {os.cpu_count()} cores, {' '.join(units) or 'no avx2'}"
