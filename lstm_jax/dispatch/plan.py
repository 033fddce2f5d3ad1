"""Which kernel runs a recurrent layer, and how: the one place that decides.

``plan_layer`` takes a cell, the layer's shapes, the platform and the caller's ``impl``, and
returns a ``Plan``: the kernel (``'scan'``, ``'fused'``, ``'onednn'`` or ``'parallel'``) and its settings (the
fused loop's carry layout and what it saves for the backward pass, oneDNN's threads per call and
its input route). The kernels receive those settings as arguments and ask nothing back.

The rules, in order:

1. ``impl`` is checked first (``'auto'``, ``'scan'``, ``'fused'``, ``'onednn'``, ``'parallel'``), then what the
   cell and options allow: the fused kernels run ``LSTMCell``, ``RNNCell`` and
   ``GRUCell(reset_after=True)`` without ``seq_lengths`` or ``remat``; oneDNN the LSTM and that GRU.
   An empty sequence (no steps or no rows) runs the plain scan whatever was asked.
2. oneDNN (CPU only; ``'auto'``): taken where the extension is loaded, ``LSTM_JAX_ONEDNN`` is not
   ``0``, oneDNN supports the shape, the layer's training pass has at least
   ``ONEDNN_MIN_LAYER_FLOPS``, and it measured at least ``measure.MARGIN`` faster than the fused
   layer with the faster of 1 and ``cores_per_device()`` threads (both are timed: neither always
   wins). ``LSTM_JAX_ONEDNN=1`` takes it wherever supported, unmeasured, on all the device's cores.
   Token inputs through an embedding go in as the embedding rows where they are the narrower input
   (after padding to oneDNN's blocks), else as the one-hot of the vocabulary (``embedding_route``).
3. The fused loop's carry layout (CPU only): transposed where a loop of the layer's per-step
   products measured ``MARGIN`` faster that way; never for per-step products outside
   ``LAYOUT_STEP_FLOPS`` (below it the loop is bound by its overhead, above it both kernels run near
   the matmul peak) or off CPU. ``LSTM_JAX_LAYOUT`` fixes it.
4. The fused loop computes the backward factors inside the forward loop for layers of at most
   ``LOOP_FACTORS_MAX_HIDDEN`` units (the gates are still in cache), else in one vectorised pass.
5. ``MinGRUCell``, ``MinLSTMCell`` and ``MLSTMCell`` (gates of the input alone) run their parallel
   form over time (``'parallel'``, ``kernels.parallel_scan``) under ``'auto'``, ``seq_lengths``
   included, ``remat`` excluded (that runs the scan); a fixed rule, unmeasured at run time, but
   for minGRU/minLSTM on CPU it is the plain scan: there the log-space associative scan (more work,
   ``exp``/``logaddexp`` per element, no sequential bottleneck to remove on 2 cores) measured 1.1-2x
   slower than the scan (``benchmarks/modern_speed.py``); the mLSTM's form was 2.4-3.4x faster than
   its scan. On GPU and TPU the depth ``log T`` is what counts. The mLSTM's form is
   quadratic in the steps, so ``'auto'`` runs it in chunks (``parallel_chunk``), and an explicit
   ``'parallel'`` over a sequence whose blocks would pass ``PARALLEL_MAX_BYTES`` is refused with
   the size it needs. Other cells refuse ``'parallel'``.

What is measured is measured once per machine (CPU model and units, cores, jax version), shape and
dtype, and cached in memory and on disk (``dispatch.cache``): the first call of a layer on a new
shape on CPU may take seconds per choice (each candidate compiled and timed), later calls and
later processes none.
``LSTM_JAX_DISPATCH=fixed`` makes every choice without timing (row-major carry, the fused layer;
oneDNN only with ``LSTM_JAX_ONEDNN=1``). Figures: ``benchmarks/layout.py`` and
``benchmarks/speed.py`` (their committed results and the docs' performance page).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.core.cells import Cell, GRUCell, LSTMCell, RNNCell
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.host import machine_key
from lstm_jax.core.mincells import MinGRUCell, MinLSTMCell
from lstm_jax.core.xlstm import MLSTMCell
from lstm_jax.dispatch import cache, measure, switches
from lstm_jax.kernels import onednn
from lstm_jax.kernels.parallel_scan import mlstm_parallel_bytes

__all__ = ["Plan", "plan_layer", "IMPLS", "check_impl", "fused_kind", "onednn_kind", "transposed_carry_pays",
           "loop_factors", "onednn_threads", "onednn_ready", "onednn_unavailable_reason", "input_route",
           "embedding_route", "measuring", "decisions", "parallel_kind", "parallel_chunk", "PARALLEL_MAX_BYTES",
           "MLSTM_CHUNK", "LAYOUT_STEP_FLOPS", "ONEDNN_MIN_LAYER_FLOPS",
           "ONEDNN_MEASURE_VERSION", "LOOP_FACTORS_MAX_HIDDEN", "ROUNDS"]

IMPLS = ("auto", "scan", "fused", "onednn", "parallel")
PARALLEL_MAX_BYTES = 2 * 2**30  # the mLSTM's quadratic form (all its T x T blocks) must fit in this
MLSTM_CHUNK = 128  # 'auto' runs the mLSTM's parallel form over chunks of at most this many steps
LAYOUT_STEP_FLOPS = (2 * 2**20, 2 * 2**28)  # per-step product h @ W_h: where the carry layout can matter
LAYOUT_LOOP_STEPS = 100
ONEDNN_MIN_LAYER_FLOPS = 2**28  # a layer's training pass below this keeps the fused loop, unmeasured
LOOP_FACTORS_MAX_HIDDEN = 128
ROUNDS = 5
# In the cache keys of oneDNN choices: bumped when the extension's speed changes, so that choices
# measured with an older build are measured again (5: an embedding's rows may feed the first layer).
ONEDNN_MEASURE_VERSION = 5

_memo: dict[str, Any] = {}  # cache key -> choice, this process
_memo_lock = threading.RLock()  # re-entrant: timing oneDNN traces the fused layer, which asks for its layout


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one layer runs: ``impl`` ``'scan'``, ``'fused'`` or ``'onednn'``; for the fused kernels
    ``transposed`` (carry layout on CPU) and ``loop_factors`` (backward factors in the forward loop);
    for oneDNN ``threads`` per call and ``route`` (``'features'``, ``'one_hot'`` or ``'rows'``: how
    the inputs reach it); for ``'parallel'`` ``chunk``, the mLSTM's steps per quadratic block (0: the whole
    sequence at once). A plan is a static value: it is part of what a jitted program is."""

    impl: str
    transposed: bool = False
    loop_factors: bool = False
    threads: int = 0
    route: str = "features"
    chunk: int = 0


def check_impl(impl: Any) -> str:
    """``impl`` itself, or ``ConfigError`` naming the allowed values."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}.")
    return impl


def fused_kind(cell: Cell) -> str | None:
    """``'lstm'``, ``'gru'`` or ``'rnn'`` where a fused kernel runs ``cell``, else None."""
    if isinstance(cell, LSTMCell):
        return "lstm"
    if isinstance(cell, GRUCell) and cell.reset_after:
        return "gru"
    return "rnn" if isinstance(cell, RNNCell) else None


def onednn_kind(cell: Cell) -> str | None:
    """``'lstm'`` or ``'gru'`` where oneDNN's primitives run ``cell``, else None."""
    kind = fused_kind(cell)
    return kind if kind in ("lstm", "gru") else None


def measuring() -> bool:
    """Whether choices are timed on this machine (``LSTM_JAX_DISPATCH`` is not ``fixed``)."""
    return switches.dispatch_mode() == "measure"


def onednn_ready() -> bool:
    """Whether oneDNN layers may run: the extension loaded and ``LSTM_JAX_ONEDNN`` is not 0."""
    return switches.onednn_mode() != "off" and onednn.loaded()


def onednn_unavailable_reason() -> str | None:
    """Why ``onednn_ready()`` is False, in words (None when it is True)."""
    if switches.onednn_mode() == "off":
        return f"{switches.ONEDNN}=0"
    return onednn.load_failure()


def plan_layer(cell: Cell, *, impl: str = "auto", steps: int, rows: int, features: int, dtype: Any = None,
               tokens: bool = False, embed: int = 0, seq_lengths: bool = False, remat: bool = False,
               platform: str | None = None) -> Plan:
    """The plan for one layer of ``cell`` over ``steps`` steps of ``rows`` sequences of ``features``
    inputs (the vocabulary size with ``tokens``; ``embed``: the width of an embedding the token ids
    pass through first, 0 without one). ``platform``: where the program runs (default: JAX's
    default backend). Raises ``ConfigError`` for an ``impl`` the layer cannot run."""
    check_impl(impl)
    switches.check_all()
    kind, dnn = fused_kind(cell), onednn_kind(cell)
    fusable = kind is not None and not seq_lengths and not remat
    with_options = " with those options" if seq_lengths or remat else ""
    if impl == "onednn" and not (fusable and dnn):
        raise ConfigError(
            f"impl='onednn' supports LSTMCell and GRUCell(reset_after=True) without seq_lengths or remat; got "
            f"{cell.name}{with_options}. Use impl='fused' or 'auto'.")
    if impl == "fused" and not fusable:
        raise ConfigError(
            f"impl='fused' supports LSTMCell, RNNCell and GRUCell(reset_after=True) without seq_lengths or remat; "
            f"got {cell.name}{with_options}. Use impl='scan' or 'auto'.")
    if impl == "onednn" and not onednn_ready():
        raise ConfigError(f"impl='onednn' is not available here: {onednn_unavailable_reason()}. "
                          f"Use impl='auto' (it falls back to the fused layer).")
    parallel = parallel_kind(cell)
    if impl == "parallel" and (parallel is None or remat):
        raise ConfigError(
            f"impl='parallel' runs MinGRUCell, MinLSTMCell and MLSTMCell (cells whose gates see only the input) "
            f"without remat; got {cell.name}{' with remat' if remat else ''}. Use impl='scan' or 'auto'.")
    if steps == 0 or rows == 0 or impl == "scan":
        return Plan("scan")
    platform = platform or jax.default_backend()
    linear_on_cpu = parallel == "linear" and platform == "cpu" and impl == "auto"
    if parallel and impl in ("auto", "parallel") and not remat and not linear_on_cpu:
        chunk = parallel_chunk(cell, steps, rows, whole=impl == "parallel")
        return Plan("parallel", chunk=chunk) if chunk >= 0 else Plan("scan")
    if impl == "auto" and not fusable:
        return Plan("scan")
    hidden = cell.hidden_size
    if dnn and platform == "cpu" and impl in ("auto", "onednn"):
        route = input_route(tokens, features, embed, cell.dtype)
        threads = (onednn.cores_per_device() if impl == "onednn"
                   else onednn_threads(steps, rows, features, hidden, cell.dtype, tokens, dnn, embed))
        if threads:  # loop_factors: for the fused kernel that runs it off CPU
            return Plan("onednn", threads=threads, route=route, loop_factors=loop_factors(hidden))
    gates = {"lstm": 4, "gru": 3}.get(kind)
    transposed = bool(gates) and platform == "cpu" and transposed_carry_pays(rows, hidden, gates, cell.dtype)
    return Plan("fused", transposed=transposed, loop_factors=loop_factors(hidden))


def parallel_kind(cell: Cell) -> str | None:
    """``'linear'`` (minGRU, minLSTM: a linear recurrence in log space) or ``'mlstm'`` where a
    parallel form over time runs ``cell``, else None."""
    if isinstance(cell, (MinGRUCell, MinLSTMCell)):
        return "linear"
    return "mlstm" if isinstance(cell, MLSTMCell) else None


def parallel_chunk(cell: Cell, steps: int, rows: int, whole: bool = False) -> int:
    """Rule 5: the parallel form's ``chunk`` (0: the whole sequence at once; -1: run the plain
    scan). The linear recurrences take the whole sequence (memory linear in T). The mLSTM takes
    chunks of at most ``MLSTM_CHUNK`` steps, fewer where ``rows`` sequences' ``chunk x chunk``
    blocks would pass ``PARALLEL_MAX_BYTES`` (below 8 steps: the plain scan). ``whole``
    (``impl='parallel'``): the whole sequence in one block, or ``ConfigError`` with the size it needs."""
    if parallel_kind(cell) != "mlstm":
        return 0
    heads = cell.num_heads
    itemsize = jnp.dtype(cell.param_dtype).itemsize
    if whole:
        need = mlstm_parallel_bytes(steps, rows, heads, itemsize)
        if need > PARALLEL_MAX_BYTES:
            fits = int((PARALLEL_MAX_BYTES / mlstm_parallel_bytes(1, rows, heads, itemsize)) ** 0.5)
            raise ConfigError(
                f"impl='parallel': the mLSTM's quadratic form over {steps} steps of {rows} sequences and {heads} "
                f"head(s) needs about {need / 2**30:.1f} GiB, more than PARALLEL_MAX_BYTES = "
                f"{PARALLEL_MAX_BYTES / 2**30:.1f} GiB; pass impl='auto' (chunks of at most {min(MLSTM_CHUNK, fits)} "
                f"steps), split the sequence into chunks of at most {fits} steps and pass the carry on "
                f"(initial_carry=carry), or use impl='scan' (step by step).", argument="impl")
        return 0
    chunk = MLSTM_CHUNK
    while chunk >= 8 and mlstm_parallel_bytes(chunk, rows, heads, itemsize) > PARALLEL_MAX_BYTES:
        chunk //= 2
    if chunk < 8:
        return -1
    return 0 if steps <= chunk else chunk


def loop_factors(hidden: int) -> bool:
    """Whether the fused LSTM/GRU loop computes its backward factors inside the forward loop
    (rule 4: small layers, whose gates are still in cache; larger ones do it in one vectorised
    pass, as elementwise work inside the loop runs on one core)."""
    return hidden <= LOOP_FACTORS_MAX_HIDDEN


def input_route(tokens: bool, features: int, embed: int = 0, dtype: Any = None) -> str:
    """How a layer's inputs reach oneDNN: ``'features'`` (float features as given), else for token
    ids ``'one_hot'`` or, through an embedding of width ``embed``, ``embedding_route``'s choice."""
    if not tokens:
        return "features"
    return embedding_route(features, embed, dtype) if embed else "one_hot"


def embedding_route(vocab: int, embed: int, dtype: Any = None) -> str:
    """``'rows'`` where the embedding's width, padded to oneDNN's blocks, is at most the padded
    vocabulary (the narrower product), else ``'one_hot'``."""
    width = lambda n: n + (-n % onednn.block(dtype))
    return "rows" if width(embed) <= width(vocab) else "one_hot"


def transposed_carry_pays(batch: int, hidden: int, gates: int, dtype: Any = None) -> bool:
    """Rule 3: whether a fused loop of ``batch`` sequences, ``hidden`` units and ``gates`` gates
    should hold its carry transposed on CPU (``dtype``: the products' compute dtype)."""
    forced = switches.layout_mode()
    if forced != "auto":
        return forced == "transposed"
    flops = 2 * batch * hidden * gates * hidden
    lo, hi = LAYOUT_STEP_FLOPS
    if not lo <= flops <= hi or jax.default_backend() != "cpu" or not measuring():
        return False
    name = jnp.dtype(dtype or jnp.float32).name

    def timed() -> dict:
        row_major, transposed = measure.layouts(batch, hidden, gates, name, LAYOUT_LOOP_STEPS, ROUNDS)
        return {"transposed": row_major >= measure.MARGIN * transposed, "row_major_s": row_major,
                "transposed_s": transposed}

    return bool(_decided(f"{machine_key()}|{batch}x{hidden}x{gates}|{name}", timed)["transposed"])


def onednn_threads(steps: int, batch: int, features: int, hidden: int, dtype: Any = None, tokens: bool = False,
                   cell: str = "lstm", embed: int = 0) -> int:
    """Rule 2 for ``scan_cell(impl='auto')``: 0 for the fused layer, else oneDNN's threads per call
    for this LSTM (``cell='lstm'``) or GRU (``'gru'``) layer."""
    mode = switches.onednn_mode()
    if mode == "off" or not onednn.loaded() or not onednn.supports(steps, batch, features, hidden, dtype, cell):
        return 0
    cores = onednn.cores_per_device()
    if mode == "on":
        return cores
    if 6 * steps * batch * onednn.GATES[cell] * hidden * (features + hidden) < ONEDNN_MIN_LAYER_FLOPS:
        return 0
    if not measuring():
        return 0
    name = jnp.dtype(dtype or jnp.float32).name
    what = (f"tokens-embed{embed}" if embed else "tokens") if tokens else "features"
    key = (f"{machine_key()}|onednn-{cell}|v{ONEDNN_MEASURE_VERSION}|{steps}x{batch}x{features}x{hidden}|{what}|"
           f"{name}|{cores} cores")

    def timed() -> dict:
        fused = (transposed_carry_pays(batch, hidden, onednn.GATES[cell], dtype), loop_factors(hidden))
        route = input_route(tokens, features, embed, dtype)
        seconds = measure.onednn_layer(steps, batch, features, hidden, dtype, sorted({1, cores}), tokens, cell,
                                       embed, route, fused, ROUNDS)
        best = min((t, k) for k, t in seconds.items() if k != "fused")
        threads = best[1] if seconds["fused"] >= measure.MARGIN * best[0] else 0
        return {"threads": threads, "seconds": {str(k): t for k, t in seconds.items()}}

    return int(_decided(key, timed).get("threads", 0))


def decisions() -> dict[str, dict]:
    """The measured choices this process has made or read so far, by cache key (a copy)."""
    with _memo_lock:
        return dict(_memo)


def _decided(key: str, timed) -> dict:
    """The choice under ``key``: from this process's memory, else the machine's cache, else timed."""
    with _memo_lock:
        if key not in _memo:
            _memo[key] = cache.cached(key, timed)
        return _memo[key]
