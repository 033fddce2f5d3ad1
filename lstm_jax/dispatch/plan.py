"""Which kernel runs a recurrent layer, and how: the one place that decides.

``plan_layer`` takes a cell, the layer's shapes, the platform and the caller's ``impl``, and
returns a ``Plan``: the kernel (``'scan'``, ``'fused'``, ``'onednn'``, ``'cudnn'`` or
``'parallel'``) and its settings
(the fused loop's carry layout and what it saves for the backward pass, oneDNN's threads per call
and its input route). The kernels receive those settings as arguments and ask nothing back.

The rules, in order:

1. ``impl`` is checked first (``'auto'``, ``'scan'``, ``'fused'``, ``'onednn'``, ``'cudnn'``,
   ``'parallel'``), then
   what the cell and options allow: the fused kernels run ``LSTMCell`` (``proj_size`` included),
   ``RNNCell`` and ``GRUCell(reset_after=True)`` without ``remat``, ``seq_lengths`` and
   ``recurrent_dropout`` included (the carry frozen past each sequence's end, the mask on the state,
   inside the fused loop); oneDNN the LSTM and that GRU without ``seq_lengths`` either: its RNN
   primitives take one sequence length for the whole batch (no per-sequence lengths, unlike cuDNN),
   so padded batches keep the fused layer; nor with ``recurrent_dropout`` (oneDNN's primitive has no
   hook for a mask on the state); nor an ``LSTMCell(proj_size=P)``: oneDNN's LSTM primitive supports
   a projection (LSTMP) but our extension does not bind it (weights layout and backward pass), so
   LSTMP layers run fused. cuDNN runs float32 plain ``LSTMCell`` layers (``seq_lengths`` allowed; no
   ``remat``, ``recurrent_dropout`` or ``proj_size``: ``jax.experimental.rnn`` has neither) on CUDA
   or ROCm only.
   An empty sequence (no steps or no rows) runs the plain scan whatever was asked.
   ``LSTMCell(peepholes=True)`` and ``LSTMCell(layer_norm=True)`` run the plain scan only: the fused
   kernels' hand-written backward pass knows the plain gates alone (peepholes add the cell state
   into the gates, layer norm a reduction over the units inside the step). oneDNN's LSTM primitive
   has peephole weights, but our binding (``kernels/onednn``) does not pass them, and the primitive
   has no layer normalisation. ``MGUCell``, ``LeakyRNNCell``, ``GRUCell(reset_after=False)`` and
   ``ConvLSTMCell`` (a convolution per step) run the plain scan too.
2. oneDNN (CPU only; ``'auto'``): taken where the extension is loaded, ``LSTM_JAX_ONEDNN`` is not
   ``0``, oneDNN supports the shape, the layer's training pass has at least
   ``ONEDNN_MIN_LAYER_FLOPS``, and it measured at least ``measure.MARGIN`` faster than the fused
   layer with the faster of 1 and ``cores_per_device()`` threads (both are timed: neither always
   wins), timed over at most ``measured_steps`` of the layer's steps (so that timing a long, wide
   layer cannot exhaust the memory; the ratio holds, as both grow linearly in the steps).
   ``LSTM_JAX_ONEDNN=1`` takes it wherever supported, unmeasured, on all the device's cores.
   Token inputs through an embedding go in as the embedding rows where they are the narrower input
   (after padding to oneDNN's blocks), else as the one-hot of the vocabulary (``embedding_route``).
2b. cuDNN (CUDA/ROCm only; ``'auto'``): a float32 LSTM layer takes ``jax.experimental.rnn`` where
   its training pass measured ``measure.MARGIN`` faster than the layer it replaces (the fused
   layer, with ``seq_lengths`` too); with ``LSTM_JAX_DISPATCH=fixed`` by ``CUDNN_FIXED``
   (CUDA yes, ROCm no). bf16 layers and other cells keep the fused layer (cuDNN's route is float32
   only). Never on CPU or TPU.
   Nothing of rule 2 or 3 runs off CPU (``cpu_choices_apply``), whatever the switches say.
3. The fused loop's carry layout (CPU only): transposed where a loop of the layer's per-step
   products measured ``MARGIN`` faster that way; never for per-step products outside
   ``LAYOUT_STEP_FLOPS`` (below it the loop is bound by its overhead, above it both kernels run near
   the matmul peak) or off CPU. ``LSTM_JAX_LAYOUT`` fixes it.
4. The fused loop computes the backward factors inside the forward loop for layers of at most
   ``LOOP_FACTORS_MAX_HIDDEN`` units (the gates are still in cache), else in one vectorised pass.
5. ``MinGRUCell``, ``MinLSTMCell`` and ``MLSTMCell`` (gates of the input alone) run their parallel
   form over time (``'parallel'``, ``kernels.parallel_scan``) under ``'auto'``, ``seq_lengths``
   included, ``remat`` excluded (that runs the scan); a fixed rule (the mLSTM's on CPU is measured, 5b), but
   for minGRU/minLSTM on CPU it is the plain scan: there the log-space associative scan (more work,
   ``exp``/``logaddexp`` per element, no sequential bottleneck to remove on 2 cores) measured
   slower than the scan (``benchmarks/modern_speed.py``), and the mLSTM's form faster than
   its scan at 256 units in 4 heads. On GPU and TPU the depth ``log T`` is what counts. The mLSTM's form is
   quadratic in the steps, so ``'auto'`` runs it in chunks (``parallel_chunk``), and an explicit
   ``'parallel'`` over a sequence whose blocks would pass ``PARALLEL_MAX_BYTES`` is refused with
   the size it needs. Other cells refuse ``'parallel'``.
5b. The mLSTM on CPU (float32, ``'auto'``): its parallel form does about ``chunk / d`` times the
   scan's arithmetic (``d`` the head size), so with small heads the scan can win; where the layer's
   recurrence has at least ``MLSTM_MIN_MEASURED_FLOPS``, the scan and the parallel form with chunks
   of 16 to ``MLSTM_CHUNK`` steps are timed and the fastest taken (``mlstm_form``).

What is measured is measured once per machine (CPU model and units, cores, jax version), shape and
dtype, and cached in memory and on disk (``dispatch.cache``): the first call of a layer on a new
shape on CPU may take seconds per choice (each candidate compiled and timed), later calls and
later processes none.
``LSTM_JAX_DISPATCH=fixed`` makes every choice without timing (row-major carry, the fused layer;
oneDNN only with ``LSTM_JAX_ONEDNN=1``; cuDNN per ``CUDNN_FIXED``). Figures: ``benchmarks/layout.py`` and
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
           "embedding_route", "measuring", "decisions", "LAYOUT_STEP_FLOPS", "ONEDNN_MIN_LAYER_FLOPS",
           "ONEDNN_MEASURE_VERSION", "LOOP_FACTORS_MAX_HIDDEN", "ROUNDS", "CUDNN_PLATFORMS", "CUDNN_FIXED",
           "cudnn_unsupported_reason", "cudnn_pays", "cpu_choices_apply", "proposed_compute_dtype", "compute_dtype",
           "onednn_thread_counts", "DTYPE_ROUNDS",
           "likely_platform",
           "current_platform", "parallel_kind", "parallel_chunk",
           "PARALLEL_MAX_BYTES", "MLSTM_CHUNK", "step_impls"]

IMPLS = ("auto", "scan", "fused", "onednn", "cudnn", "parallel")
PARALLEL_MAX_BYTES = 2 * 2**30  # the mLSTM's quadratic form (all its T x T blocks) must fit in this
MLSTM_CHUNK = 128  # 'auto' runs the mLSTM's parallel form over chunks of at most this many steps
MLSTM_MIN_MEASURED_FLOPS = 2**26  # an mLSTM layer's recurrence below this keeps rule 5's fixed form
MLSTM_MEASURED_STEPS = 256  # the mLSTM's forms are timed over at most this many steps
CUDNN_PLATFORMS = ("cuda", "rocm")  # where jax.experimental.rnn lowers (cuDNN, MIOpen)
# LSTM_JAX_DISPATCH=fixed: whether a float32 LSTM layer takes cuDNN, per platform, unmeasured. CUDA as
# Keras's JAX backend does; MIOpen's route has run nowhere yet, so ROCm keeps the fused layer.
CUDNN_FIXED = {"cuda": True, "rocm": False}
LAYOUT_STEP_FLOPS = (2 * 2**20, 2 * 2**28)  # per-step product h @ W_h: where the carry layout can matter
LAYOUT_LOOP_STEPS = 100
ONEDNN_MIN_LAYER_FLOPS = 2**28  # a layer's training pass below this keeps the fused loop, unmeasured
LOOP_FACTORS_MAX_HIDDEN = 128
ROUNDS = 5
DTYPE_ROUNDS = 9  # compute_dtype's passes are short and its choice is the run's: more rounds, less noise
MEASURED_MAX_ELEMENTS = 2**24  # a timed layer pass holds at most this many steps x rows x width (measured_steps)
MIN_MEASURED_STEPS = 32
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
    """``'lstm'``, ``'gru'`` or ``'rnn'`` where a fused kernel runs ``cell``, else None (an LSTM
    with ``peepholes`` or ``layer_norm`` included: rule 1)."""
    if isinstance(cell, LSTMCell):
        return None if cell.peepholes or cell.layer_norm else "lstm"
    if isinstance(cell, GRUCell) and cell.reset_after:
        return "gru"
    return "rnn" if isinstance(cell, RNNCell) else None


def onednn_kind(cell: Cell) -> str | None:
    """``'lstm'`` or ``'gru'`` where oneDNN's primitives run ``cell``, else None (an LSTM with
    ``peepholes``, which the primitive has but our binding does not pass, ``layer_norm`` or
    ``proj_size``: rule 1)."""
    if getattr(cell, "proj_size", 0):  # LSTMP: the primitive has a projection, our binding does not
        return None
    kind = fused_kind(cell)
    return kind if kind in ("lstm", "gru") else None


def cudnn_unsupported_reason(cell: Cell, platform: str, remat: bool = False,
                             recurrent_dropout: bool = False) -> str | None:
    """Why ``impl='cudnn'`` cannot run ``cell`` on ``platform``, in words (None where it can):
    ``jax.experimental.rnn`` runs float32 plain LSTM layers on CUDA and ROCm only."""
    if platform not in CUDNN_PLATFORMS:
        return f"it needs a CUDA or ROCm device, and this program runs on {platform!r}"
    if not isinstance(cell, LSTMCell):
        return f"jax.experimental.rnn runs LSTM layers only, not a {cell.name}"
    if cell.peepholes or cell.layer_norm or cell.proj_size:
        return ("jax.experimental.rnn runs the plain LSTM only, without peepholes, layer_norm or proj_size "
                f"(got peepholes={cell.peepholes}, layer_norm={cell.layer_norm}, proj_size={cell.proj_size})")
    if recurrent_dropout:
        return "jax.experimental.rnn has no hook for a recurrent dropout mask on the state"
    compute = jnp.dtype(cell.dtype or cell.param_dtype)
    if compute != jnp.float32 or jnp.dtype(cell.param_dtype) != jnp.float32:
        return (f"jax.experimental.rnn runs float32 only, and this layer computes in {compute.name} "
                f"with {jnp.dtype(cell.param_dtype).name} params")
    if remat:
        return "cuDNN keeps its own saved state for the backward pass, so remat=True has no meaning there"
    return None


def cpu_choices_apply(platform: str) -> bool:
    """Whether the CPU-only choices (oneDNN layers, the carry layout calibration, one device per
    core, the allocator's tuning) may run for a program on ``platform``: on ``'cpu'`` only."""
    return platform == "cpu"


def current_platform(name: str | None = None) -> str:
    """``name`` (default: JAX's default backend) with ``'gpu'`` resolved to ``'cuda'`` or
    ``'rocm'`` (the names ``lax.platform_dependent`` and ``jax.experimental.rnn`` use), as the
    device's client reports it."""
    name = (name or jax.default_backend()).lower()
    if name != "gpu":
        return name
    try:
        version = jax.devices("gpu")[0].client.platform_version.lower()
    except (RuntimeError, AttributeError, IndexError):
        return "cuda"
    return "rocm" if "rocm" in version or "hip" in version else "cuda"


def likely_platform() -> str:
    """The platform JAX will run on, named before its backends start where possible (the CPU-only
    process settings must be made before): JAX's backend once started; else the first of
    ``jax_platforms`` (``JAX_PLATFORMS``) when set; else ``'tpu'``, ``'cuda'`` or ``'rocm'`` where
    such a JAX plugin is installed; else ``'cpu'``."""
    from importlib import metadata, util

    from jax._src import xla_bridge

    try:
        if xla_bridge.backends_are_initialized():
            return current_platform()
    except AttributeError:  # a JAX without that function: ask the backend itself
        return current_platform()
    configured = (jax.config.jax_platforms or "").split(",")[0].strip().lower()
    if configured:
        return {"gpu": "cuda"}.get(configured, configured)
    plugins = " ".join(ep.name for ep in metadata.entry_points(group="jax_plugins")).lower()
    if "tpu" in plugins or util.find_spec("libtpu") is not None:
        return "tpu"
    return next((p for p in ("cuda", "rocm") if p in plugins), "cpu")


def proposed_compute_dtype(platform: str) -> str:
    """The compute dtype of the matrix products the dispatch proposes on ``platform`` when the user
    names none: ``'bfloat16'`` on TPU (its matrix units' native type; params and the carried
    state stay float32), else ``'float32'``."""
    return "bfloat16" if platform == "tpu" else "float32"


def compute_dtype(cell: str, steps: int, rows: int, hidden: int, platform: str | None = None) -> tuple[str, dict]:
    """The compute dtype (``'float32'`` or ``'bfloat16'``) whose ``cell`` layers of ``hidden``
    units over ``steps`` steps of ``rows`` sequences (the rows one program runs) train fastest
    here, and the seconds behind the choice (empty where none were timed): what ``train.py
    --recipe auto`` runs in.

    On CPU, for an LSTM or GRU (``make_cell``'s ``'lstm'``, ``'gru'``): a hidden-to-hidden layer's
    training pass is timed in both dtypes (``measure.compute_dtypes``), each on the kernels rule 2
    weighs for it (the fused layer with rule 3's layout, and oneDNN with
    ``onednn_thread_counts``' threads where it takes that dtype here: bf16 needs AVX512-BF16 or
    AMX), all taking turns ``DTYPE_ROUNDS`` times, and bf16 is taken where its fastest pass beats
    float32's by ``measure.MARGIN``: on a CPU with bf16 units the products run at several times
    float32's rate, on AVX2 alone they are converted and run no faster. Elsewhere, for other
    cells, or with ``LSTM_JAX_DISPATCH=fixed``: ``proposed_compute_dtype``, untimed. Cached per
    machine and shape, as rule 2's choices."""
    platform = current_platform(platform)
    proposal = proposed_compute_dtype(platform)
    if not (cpu_choices_apply(platform) and measuring() and cell in onednn.GATES):
        return proposal, {}
    timed_steps = measured_steps(steps, rows, hidden + onednn.GATES[cell] * hidden)
    threads = {name: onednn_thread_counts(steps, rows, hidden, hidden, jnp.dtype(name), cell)
               for name in ("float32", "bfloat16")}
    key = (f"{machine_key()}|compute-dtype|{cell}|v{ONEDNN_MEASURE_VERSION}|{timed_steps}x{rows}x{hidden}|"
           f"onednn {threads}")

    def timed() -> dict:
        fused = {name: (transposed_carry_pays(rows, hidden, onednn.GATES[cell], name), loop_factors(hidden))
                 for name in threads}
        seconds = measure.compute_dtypes(timed_steps, rows, hidden, cell, threads, fused, DTYPE_ROUNDS)
        best = {name: min(t for (n, _), t in seconds.items() if n == name) for name in threads}
        return {"dtype": measure.simplest_fast_enough(best), "seconds": best}

    entry = _decided(key, timed)
    return str(entry["dtype"]), dict(entry["seconds"])


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
               platform: str | None = None, recurrent_dropout: bool = False) -> Plan:
    """The plan for one layer of ``cell`` over ``steps`` steps of ``rows`` sequences of ``features``
    inputs (the vocabulary size with ``tokens``; ``embed``: the width of an embedding the token ids
    pass through first, 0 without one). ``platform``: where the program runs, ``'cpu'``,
    ``'cuda'``, ``'rocm'`` or ``'tpu'`` (default: JAX's default backend, ``'gpu'`` resolved by
    ``current_platform``). Raises ``ConfigError`` for an ``impl`` the layer cannot run."""
    check_impl(impl)
    switches.check_all()
    kind, dnn = fused_kind(cell), onednn_kind(cell)
    fusable = kind is not None and not remat
    options = [n for n, on in (("seq_lengths", seq_lengths), ("remat", remat),
                                ("recurrent_dropout", recurrent_dropout)) if on]
    with_options = f" with {' and '.join(options)}" if options else ""
    if isinstance(cell, LSTMCell) and (cell.peepholes or cell.layer_norm):
        with_options = f"(peepholes={cell.peepholes}, layer_norm={cell.layer_norm}){with_options}"
    dnn = dnn if not (seq_lengths or recurrent_dropout) else None  # rule 1: what oneDNN has no hook for
    if impl == "onednn" and not (fusable and dnn):
        raise ConfigError(
            f"impl='onednn' supports LSTMCell and GRUCell(reset_after=True) without seq_lengths, recurrent_dropout "
            f"or remat (an LSTM without peepholes, layer_norm or proj_size); got {cell.name}{with_options}. "
            f"Use impl='fused' or 'auto'.")
    if impl == "fused" and not fusable:
        raise ConfigError(
            f"impl='fused' supports LSTMCell, RNNCell and GRUCell(reset_after=True) without remat (an LSTM "
            f"without peepholes or layer_norm); got {cell.name}{with_options}. Use impl='scan' or 'auto'.")
    platform = current_platform(platform)
    if impl == "cudnn":
        reason = cudnn_unsupported_reason(cell, platform, remat, recurrent_dropout)
        if reason:
            use = "'fused' or 'auto'" if fusable else "'scan' or 'auto'"
            raise ConfigError(f"impl='cudnn' cannot run this layer: {reason}. Use impl={use}.")
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
    if impl == "cudnn" or (impl == "auto" and cudnn_unsupported_reason(cell, platform, remat, recurrent_dropout) is None
                           and cudnn_pays(platform, steps, rows, features, cell.hidden_size, tokens, embed,
                                          seq_lengths)):
        return Plan("cudnn")
    linear_on_cpu = parallel == "linear" and platform == "cpu" and impl == "auto"
    if parallel and impl in ("auto", "parallel") and not remat and not linear_on_cpu:
        chunk = parallel_chunk(cell, steps, rows, whole=impl == "parallel", platform=platform)
        return Plan("parallel", chunk=chunk) if chunk >= 0 else Plan("scan")
    if impl == "auto" and not fusable:
        return Plan("scan")
    hidden = cell.hidden_size
    if dnn and cpu_choices_apply(platform) and impl in ("auto", "onednn"):
        route = input_route(tokens, features, embed, cell.dtype)
        threads = (onednn.cores_per_device() if impl == "onednn"
                   else onednn_threads(steps, rows, features, hidden, cell.dtype, tokens, dnn, embed))
        if threads:  # loop_factors: for the fused kernel that runs it off CPU
            return Plan("onednn", threads=threads, route=route, loop_factors=loop_factors(hidden))
    gates = {"lstm": 4, "gru": 3}.get(kind)
    transposed = bool(gates) and cpu_choices_apply(platform) and transposed_carry_pays(rows, hidden, gates, cell.dtype)
    return Plan("fused", transposed=transposed, loop_factors=loop_factors(hidden))


def cudnn_pays(platform: str, steps: int, rows: int, features: int, hidden: int, tokens: bool = False,
               embed: int = 0, seq_lengths: bool = False) -> bool:
    """Rule 2b for ``impl='auto'``: whether a float32 LSTM layer takes cuDNN on ``platform``.
    Measured (``LSTM_JAX_DISPATCH=measure``): its training pass at least ``measure.MARGIN`` faster
    than the layer it would otherwise run (the fused layer, with ``seq_lengths`` too), on the
    default device; fixed: ``CUDNN_FIXED[platform]``. Never off CUDA/ROCm."""
    if platform not in CUDNN_PLATFORMS:
        return False
    if not measuring():
        return CUDNN_FIXED.get(platform, False)
    width = embed if tokens and embed else features
    device = jax.devices()[0].device_kind
    key = (f"{machine_key()}|{platform}|{device}|jax {jax.__version__}|cudnn-lstm|{steps}x{rows}x{width}x{hidden}|"
           f"{'tokens' if tokens else 'features'}|{'lengths' if seq_lengths else 'full'}")

    def timed() -> dict:
        seconds = measure.cudnn_layer(steps, rows, width, hidden, seq_lengths, ROUNDS)
        return {"cudnn": seconds["other"] >= measure.MARGIN * seconds["cudnn"], "seconds": seconds}

    return bool(_decided(key, timed)["cudnn"])


def parallel_kind(cell: Cell) -> str | None:
    """``'linear'`` (minGRU, minLSTM: a linear recurrence in log space) or ``'mlstm'`` where a
    parallel form over time runs ``cell``, else None."""
    if isinstance(cell, (MinGRUCell, MinLSTMCell)):
        return "linear"
    return "mlstm" if isinstance(cell, MLSTMCell) else None


def parallel_chunk(cell: Cell, steps: int, rows: int, whole: bool = False, platform: str | None = None) -> int:
    """Rule 5: the parallel form's ``chunk`` (0: the whole sequence at once; -1: run the plain
    scan). The linear recurrences take the whole sequence (memory linear in T). The mLSTM takes
    chunks of at most ``MLSTM_CHUNK`` steps, fewer where ``rows`` sequences' ``chunk x chunk``
    blocks would pass ``PARALLEL_MAX_BYTES`` (below 8 steps: the plain scan); on CPU, in float32,
    the chunk length or the scan that measured fastest (``mlstm_form``). ``whole``
    (``impl='parallel'``): the whole sequence in one block, or ``ConfigError`` with the size it needs.
    ``platform``: as ``plan_layer``'s."""
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
    fixed = 0 if steps <= chunk else chunk
    float32 = jnp.dtype(cell.dtype or jnp.float32) == jnp.dtype(cell.param_dtype) == jnp.float32
    if not (float32 and cpu_choices_apply(current_platform(platform)) and measuring()):
        return fixed
    return mlstm_form(steps, rows, cell.hidden_size, heads, chunk, fixed)


def mlstm_form(steps: int, rows: int, hidden: int, heads: int, largest: int, fixed: int) -> int:
    """Rule 5b (CPU): the mLSTM's chunk length (0: the whole sequence), or -1 for the scan, as
    measured. ``largest``: the longest chunk whose blocks fit ``PARALLEL_MAX_BYTES``; ``fixed``:
    what the unmeasured rule takes. Layers whose recurrence does fewer than
    ``MLSTM_MIN_MEASURED_FLOPS`` (about ``6 T rows H d`` forward and backward, ``d`` the head size)
    keep ``fixed`` unmeasured. Otherwise the scan and the parallel form with chunks of 16 to
    ``largest`` steps (and the whole sequence, where it fits) are timed over
    ``min(steps, MLSTM_MEASURED_STEPS)`` steps (both forms' cost grows linearly past one chunk)
    and the scan is replaced by a parallel form, or one chunk length by another, only where it is
    ``measure.MARGIN`` faster."""
    if 6 * steps * rows * hidden * (hidden // heads) < MLSTM_MIN_MEASURED_FLOPS:
        return fixed
    length = min(steps, MLSTM_MEASURED_STEPS)
    chunks = list(dict.fromkeys([fixed] + [c for c in (128, 64, 32, 16) if c <= largest and c < length]))
    key = (f"{machine_key()}|mlstm-form|v1|{length}x{rows}x{hidden}x{heads}|chunks {','.join(map(str, chunks))}|"
           f"float32")

    def timed() -> dict:
        seconds = measure.mlstm_forms(length, rows, hidden, heads, chunks, ROUNDS)
        best = measure.simplest_fast_enough(seconds)
        return {"chunk": -1 if best == "scan" else best, "seconds": {str(k): t for k, t in seconds.items()}}

    chosen = int(_decided(key, timed)["chunk"])
    return chosen if chosen <= 0 or chosen < steps else 0


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
    if not lo <= flops <= hi or not cpu_choices_apply(jax.default_backend()) or not measuring():
        return False
    name = jnp.dtype(dtype or jnp.float32).name

    def timed() -> dict:
        row_major, transposed = measure.layouts(batch, hidden, gates, name, LAYOUT_LOOP_STEPS, ROUNDS)
        return {"transposed": row_major >= measure.MARGIN * transposed, "row_major_s": row_major,
                "transposed_s": transposed}

    return bool(_decided(f"{machine_key()}|{batch}x{hidden}x{gates}|{name}", timed)["transposed"])


def onednn_thread_counts(steps: int, batch: int, features: int, hidden: int, dtype: Any = None,
                         cell: str = "lstm") -> tuple[int, ...]:
    """oneDNN's threads per call that rule 2 weighs for this LSTM or GRU layer: none where oneDNN
    cannot take it (switched off, the extension not loaded, the shape or dtype unsupported on this
    CPU, a training pass below ``ONEDNN_MIN_LAYER_FLOPS``), ``(cores,)`` with
    ``LSTM_JAX_ONEDNN=1`` (taken unmeasured, on all the device's cores, whatever the size), else
    1 and ``cores_per_device()`` (both timed)."""
    mode = switches.onednn_mode()
    if mode == "off" or not onednn.loaded() or not onednn.supports(steps, batch, features, hidden, dtype, cell):
        return ()
    cores = onednn.cores_per_device()
    if mode == "on":
        return (cores,)
    if 6 * steps * batch * onednn.GATES[cell] * hidden * (features + hidden) < ONEDNN_MIN_LAYER_FLOPS:
        return ()
    return tuple(sorted({1, cores}))


def onednn_threads(steps: int, batch: int, features: int, hidden: int, dtype: Any = None, tokens: bool = False,
                   cell: str = "lstm", embed: int = 0) -> int:
    """Rule 2 for ``scan_cell(impl='auto')``: 0 for the fused layer, else oneDNN's threads per call
    for this LSTM (``cell='lstm'``) or GRU (``'gru'``) layer."""
    counts = onednn_thread_counts(steps, batch, features, hidden, dtype, cell)
    if not counts:
        return 0
    if switches.onednn_mode() == "on":
        return counts[0]
    if not measuring():
        return 0
    cores = onednn.cores_per_device()
    name = jnp.dtype(dtype or jnp.float32).name
    what = (f"tokens-embed{embed}" if embed else "tokens") if tokens else "features"
    timed_steps = measured_steps(steps, batch, (embed or features) + onednn.GATES[cell] * hidden)
    key = (f"{machine_key()}|onednn-{cell}|v{ONEDNN_MEASURE_VERSION}|{timed_steps}x{batch}x{features}x{hidden}|"
           f"{what}|{name}|{cores} cores")

    def timed() -> dict:
        fused = (transposed_carry_pays(batch, hidden, onednn.GATES[cell], dtype), loop_factors(hidden))
        route = input_route(tokens, features, embed, dtype)
        seconds = measure.onednn_layer(timed_steps, batch, features, hidden, dtype, counts, tokens, cell, embed, route,
                                       fused, ROUNDS)
        best = min((t, k) for k, t in seconds.items() if k != "fused")
        threads = best[1] if seconds["fused"] >= measure.MARGIN * best[0] else 0
        return {"threads": threads, "seconds": {str(k): t for k, t in seconds.items()}}

    return int(_decided(key, timed).get("threads", 0))


def step_impls(cell: str, steps: int, rows: int, hidden: int, dtype: Any = None, recurrent_dropout: bool = False,
               platform: str | None = None) -> tuple[str, ...]:
    """The layer ``impl`` values worth timing on a whole training step (``charlm.fastest_setup``)
    for a stack of ``cell`` (``make_cell``'s kind) layers of ``hidden`` units over ``steps`` steps
    of ``rows`` sequences per device in compute ``dtype``: ``('fused', 'auto', 'onednn')`` on CPU where oneDNN is ready,
    the cell is an LSTM or GRU without ``recurrent_dropout`` and a hidden-to-hidden layer's
    training pass has at least ``ONEDNN_MIN_LAYER_FLOPS`` (rule 2's bound); ``('fused', 'auto')``
    where oneDNN is ready but the layers are smaller; else ``('auto',)``.

    ``'onednn'`` puts every layer on oneDNN, measured or not: rule 2 times a layer alone, on an
    otherwise idle machine, and where one device per core splits the batch the whole step can
    favour oneDNN where the layer alone did not (each device's calls then share the machine with
    the other's). The whole step decides, and ``'auto'`` that compiles to the program of
    ``'fused'`` or ``'onednn'`` is not timed twice."""
    gates = onednn.GATES.get(cell)  # the LSTM and GRU only
    if not (gates and cpu_choices_apply(current_platform(platform)) and onednn_ready()):
        return ("auto",)
    if recurrent_dropout or switches.onednn_mode() == "off" or not onednn.supports(steps, rows, hidden, hidden,
                                                                                     dtype, cell):
        return ("fused", "auto")
    big = 6 * steps * rows * gates * hidden * 2 * hidden >= ONEDNN_MIN_LAYER_FLOPS
    return ("fused", "auto", "onednn") if big else ("fused", "auto")


def measured_steps(steps: int, rows: int, width: int) -> int:
    """How many of a layer's ``steps`` its oneDNN choice is timed over: all of them, or fewer where
    ``steps x rows x width`` (``width``: the layer's input features plus its gates' units) passes
    ``MEASURED_MAX_ELEMENTS``, but at least ``MIN_MEASURED_STEPS``. Both candidates' time and
    memory grow linearly in the steps, so the shorter pass keeps their ratio while the timing's
    peak memory stays bounded (the candidates' training passes held together, with their
    temporaries, take tens of times the layer's inputs)."""
    fit = MEASURED_MAX_ELEMENTS // max(rows * width, 1)
    return min(steps, max(fit, MIN_MEASURED_STEPS))


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
