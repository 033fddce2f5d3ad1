"""The LSTM and GRU layers through oneDNN's RNN primitives on CPU, as PyTorch's CPU ``nn.LSTM``
and ``nn.GRU`` run them.

XLA:CPU compiles a recurrent layer as a loop of small products (``lstm_jax.fused``). PyTorch
hands the whole layer to oneDNN, whose RNN primitive runs the input projection as one large
product, the recurrence with kernels generated for the CPU at hand (AMX tiles for bf16 where the
CPU has them) and the backward pass with the weight gradients batched over time.
``onednn_lstm`` and ``onednn_gru`` (``GRUCell(reset_after=True)``: oneDNN's ``lbr_gru``) call
those primitives from JAX through the XLA FFI (``lstm_jax/csrc/onednn_lstm.cc``), each with a
``jax.custom_vjp`` whose backward pass is oneDNN's too.

It is optional: ``pip install`` builds the extension where a compiler and the ``onednn-cpu-gomp``
wheel are present (Linux x86-64), and ``available()`` says whether it loaded. Without it, and on
GPU or TPU, the layers run the pure-JAX path with the same numbers (tested to float32 rounding,
and to bf16 rounding in bf16). ``scan_cell(impl='auto')`` takes it only where it measured faster
on this machine (``pays``, cached through ``lstm_jax.calibrate``); ``impl='onednn'`` asks for it;
``LSTM_JAX_ONEDNN=0`` turns it off.

Measured on a 2-core Intel Xeon with AMX (``python benchmarks/speed.py --quick``, the Trainer on
one device, same run): the bf16 LSTM char-model step 2.00x (seed), 2.41x (default) and 2.31x
(large) faster than on the fused layer, the bf16 GRU 0.99x, 1.28x and 1.13x; float32 1.21x to
1.52x. oneDNN here is 3.2 (the newest CPU-only build on PyPI), whose float32 RNN is a reference
loop around its GEMM: with one core per device (2 devices) the float32 steps were 0.91x to 1.05x
the fused layer's in the same run, and the bf16 GRU's 1.00x to 1.02x, which is why the choice is
measured.

Differences from the pure-JAX path, all within rounding: in bf16 mode the hidden state between
steps is held in bf16 (oneDNN's convention; the pure-JAX path keeps it in float32 and rounds only
the products' inputs), and gradients come back in float32.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.metadata
import os
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import calibrate

__all__ = ["available", "unavailable_reason", "supports", "pays", "measure", "cores_per_device", "onednn_lstm",
           "onednn_gru", "one_hot_inputs", "embedded_inputs", "ENV"]

ENV = "LSTM_JAX_ONEDNN"  # 0: never; 1: wherever supported, unmeasured; unset/auto: where measured faster
MIN_FLOPS = 2**28  # a layer's training pass below this: not measured, the fused loop is kept
# In the cache keys of measured choices: bumped when the extension's speed changes, so that
# choices measured with an older build are measured again (2: primitives created with their own
# thread count, see GetLayer in the extension; 3: weights and scratchpad on cache-line
# boundaries, see Arena; 4: token inputs padded to oneDNN's blocks, see one_hot_inputs; 5: an
# embedding's rows may feed the first layer, see embedded_inputs, which changes the Trainer's pick).
MEASURE_VERSION = 5
ROUNDS = 5
_TARGETS = {"lstm": ("lstm_jax_onednn_lstm_forward", "lstm_jax_onednn_lstm_backward"),
            "gru": ("lstm_jax_onednn_gru_forward", "lstm_jax_onednn_gru_backward")}
_GATES = {"lstm": 4, "gru": 3}
_state: dict[str, Any] = {}
_decided: dict[str, int] = {}  # cache key -> oneDNN threads (0: the fused layer)
_decide_lock = threading.RLock()


def _libdnnl() -> Path | None:
    """``libdnnl.so.3`` from the ``onednn-cpu-gomp`` wheel (installed under ``<prefix>/lib``)."""
    try:
        dist = importlib.metadata.distribution("onednn-cpu-gomp")
        for f in dist.files or ():
            if f.name == "libdnnl.so.3":
                return Path(dist.locate_file(f)).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    hits = glob.glob(os.path.join(sys.prefix, "lib", "libdnnl.so.3"))
    return Path(hits[0]) if hits else None


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]
    _state["lib"], reason = None, None
    if os.environ.get(ENV, "1") == "0":
        reason = f"{ENV}=0"
    elif not sys.platform.startswith("linux"):
        reason = "oneDNN's extension is built on Linux only"
    else:
        ext = sorted(Path(__file__).parent.glob("_onednn_lstm*.so"))
        dnnl = _libdnnl()
        if not ext:
            reason = "the extension was not built (pip install needs g++ and the onednn-cpu-gomp wheels)"
        elif dnnl is None:
            reason = "libdnnl.so.3 not found: pip install onednn-cpu-gomp==2023.2.0"
        else:
            try:
                ctypes.CDLL(str(dnnl), mode=ctypes.RTLD_LOCAL)
                lib = ctypes.CDLL(str(ext[0]))
                for kind, (forward, backward) in _TARGETS.items():
                    workspace = getattr(lib, f"lstm_jax_onednn_{kind}_workspace_bytes")
                    workspace.restype = ctypes.c_int64
                    workspace.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int64]
                    for target, handler in ((forward, "Forward"), (backward, "Backward")):
                        capsule = jax.ffi.pycapsule(getattr(lib, f"LstmJaxOnednn{kind.capitalize()}{handler}"))
                        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
                _state["lib"] = lib
            except (OSError, AttributeError) as e:
                reason = f"loading {ext[0].name} failed: {e}"
    _state["reason"] = reason
    return _state["lib"]


def available() -> bool:
    """Whether the oneDNN layers can run here (the extension built and loaded, not turned off)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, in words (None when it is True)."""
    _load()
    return _state.get("reason")


def cores_per_device() -> int:
    """This process's cores shared by the devices of the ``shard_map`` being traced (one core
    each with ``lstm_jax.parallel.value_and_grad`` on per-core CPU devices): the most oneDNN
    threads one call may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mesh = jax.sharding.get_abstract_mesh()
    return max(1, cores // (1 if mesh.empty else mesh.size))


def _workspace_bytes(kind: str, steps: int, batch: int, features: int, hidden: int, dtype: Any, threads: int) -> int:
    lib = _load()
    if lib is None:
        return 0
    bf16 = int(_compute_dtype(dtype) == jnp.bfloat16)
    return getattr(lib, f"lstm_jax_onednn_{kind}_workspace_bytes")(steps, batch, features, hidden, bf16, threads)


def supports(steps: int, batch: int, features: int, hidden: int, dtype: Any = None, cell: str = "lstm") -> bool:
    """Whether oneDNN on this CPU implements the layer's training pass (bf16 needs AVX-512);
    ``cell`` 'lstm' or 'gru' (``GRUCell(reset_after=True)``, oneDNN's ``lbr_gru``)."""
    return _workspace_bytes(cell, steps, batch, features, hidden, dtype, 1) > 0


def pays(steps: int, batch: int, features: int, hidden: int, dtype: Any = None, tokens: bool = False,
         cell: str = "lstm", embed: int = 0) -> int:
    """How ``scan_cell(impl='auto')`` should run this LSTM (``cell='lstm'``) or GRU (``'gru'``)
    layer: 0 for the fused pure-JAX layer, else the number of oneDNN threads per call.

    oneDNN is taken where it is available, supports the shape, and its training pass (forward and
    backward) measured at least ``calibrate.MARGIN`` faster than the fused layer's, with the
    faster of 1 thread and ``cores_per_device()`` threads. Both are measured because neither
    always wins: on a 2-core Intel Xeon with AMX, 2 threads ran the float32 LSTM layer at ``large``
    1.7x faster than 1 thread, and the bf16 layer (AMX) 1.1x slower. Measured once per (CPU, jax
    version, cell, shape, dtype, cores), cached like the carry layout (``lstm_jax.calibrate.cached``).
    With ``tokens`` the layer's inputs are ``features`` token ids: the fused layer gathers rows of
    its input kernel while oneDNN multiplies a one-hot matrix, and the measurement does the same
    (at ``seed``, 128 x 40 characters of 92, that product and its gradients cost oneDNN about a
    third of the LSTM layer's time). With ``tokens`` and ``embed`` > 0 the tokens pass through an
    embedding table ``(features, embed)`` first: the fused layer gathers rows of the folded table
    ``embedding @ input_kernel`` and oneDNN takes ``embedded_inputs`` (the embedding rows where
    they are the narrower input), each with its own gradients, as ``scan_cell`` runs them.
    Layers under ``MIN_FLOPS`` keep the fused loop unmeasured. ``LSTM_JAX_ONEDNN=1`` takes oneDNN
    wherever supported, unmeasured, with ``cores_per_device()`` threads; ``=0`` never.
    """
    mode = os.environ.get(ENV, "auto").strip()
    if mode == "0" or not supports(steps, batch, features, hidden, dtype, cell):
        return 0
    cores = cores_per_device()
    if mode == "1":
        return cores
    if 6 * steps * batch * _GATES[cell] * hidden * (features + hidden) < MIN_FLOPS:
        return 0
    name = jnp.dtype(_compute_dtype(dtype)).name
    what = (f"tokens-embed{embed}" if embed else "tokens") if tokens else "features"
    key = (f"{calibrate.machine_key()}|onednn-{cell}|v{MEASURE_VERSION}|{steps}x{batch}x{features}x{hidden}|{what}|"
           f"{name}|{cores} cores")
    with _decide_lock:  # re-entrant: the measurement traces the fused layer, which asks for its layout
        if key not in _decided:
            def timed() -> dict:
                seconds = measure(steps, batch, features, hidden, dtype, sorted({1, cores}), tokens, cell, embed)
                best = min((t, k) for k, t in seconds.items() if k != "fused")
                threads = best[1] if seconds["fused"] >= calibrate.MARGIN * best[0] else 0
                return {"threads": threads, "seconds": {str(k): t for k, t in seconds.items()}}

            _decided[key] = int(calibrate.cached(key, timed).get("threads", 0))
        return _decided[key]


def measure(steps: int, batch: int, features: int, hidden: int, dtype: Any = None,
            threads: tuple[int, ...] | list[int] = (1,), tokens: bool = False, cell: str = "lstm",
            embed: int = 0) -> dict:
    """Median seconds of one LSTM or GRU layer's training pass (forward and backward): ``'fused'``
    (the pure-JAX layer) and oneDNN's with each count in ``threads``, taking turns on the CPU; with
    ``tokens``, on token ids (a row gather for the fused layer, a one-hot product for oneDNN); with
    ``embed`` > 0 as well, through an embedding table ``(features, embed)`` (gradients included):
    a gather from the folded table for the fused layer, ``embedded_inputs`` for oneDNN."""
    from lstm_jax.fused import fused_gru, fused_lstm
    from lstm_jax.products import folded_table, matmul

    cpu = jax.devices("cpu")[0]
    gates = _GATES[cell]
    rng = np.random.default_rng(0)
    embed = embed if tokens else 0
    arrays = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in
              ((steps, batch, features), (embed or features, gates * hidden), (hidden, gates * hidden),
               (gates * hidden,), (gates * hidden,), (features, embed or 1))]
    zeros = np.zeros((batch, hidden), np.float32)

    ids = rng.integers(0, features, (steps, batch)).astype(np.int32)

    def fused(x, w_x, w_h, b, b_h, table):
        if embed:
            w_x = folded_table(table, w_x, dtype)
        x_proj = (jnp.take(w_x, ids, axis=0) if tokens else matmul(x, w_x, dtype, jnp.float32)) + b
        if cell == "gru":
            return jnp.sum(fused_gru(w_h, b_h, x_proj, zeros, dtype, 1)[1])
        return jnp.sum(fused_lstm(w_h, x_proj, zeros, zeros, dtype, 1)[2])

    def through_onednn(x, w_x, w_h, b, b_h, table, threads):
        if embed:
            x, w_x = embedded_inputs(ids, table, w_x, dtype)
        elif tokens:
            x, w_x = one_hot_inputs(ids, w_x, dtype)
        if cell == "gru":
            return jnp.sum(onednn_gru(x, w_x, w_h, b, b_h, zeros, dtype, threads)[1])
        return jnp.sum(onednn_lstm(x, w_x, w_h, b, zeros, zeros, dtype, threads)[2])

    candidates = {"fused": fused, **{k: functools.partial(through_onednn, threads=k) for k in threads}}
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
        args = [jax.device_put(a, cpu) for a in arrays]
        runs = {k: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))) for k, f in candidates.items()}
        for run in runs.values():
            jax.block_until_ready(run(*args))  # compile
        return calibrate.median_seconds({k: functools.partial(run, *args) for k, run in runs.items()}, ROUNDS)


def one_hot_inputs(ids: jax.Array, w_x: jax.Array, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Token ids ``(T, N)`` as the one-hot inputs ``(T, N, C')`` oneDNN multiplies, and the input
    kernel ``w_x (C, G*H)`` to match: the vocabulary ``C`` padded with zero rows to a multiple of
    32 in bf16 (16 in float32), the blocks oneDNN's kernels run on (AMX tiles take 32 bf16 values
    a row). The padded rows' gradient is dropped by autodiff (``jnp.pad``'s transpose), so the
    layer's value and gradients are those of the unpadded one-hot product.

    Measured on the Intel Xeon with AMX (one LSTM layer, training forward and backward, 2 threads,
    same process): bf16 ``C`` = 92 against 96 at T=100, N=64, H=512: 54.4 against 51.7 ms; H=256:
    20.9 against 19.1 ms; T=40, N=128, H=128: 6.3 against 5.9 ms (9.6 against 7.6 on 1 thread);
    float32 within 2%.
    """
    dt = _compute_dtype(dtype)
    pad = -w_x.shape[0] % _block(dt)
    x = jax.nn.one_hot(ids, w_x.shape[0] + pad, dtype=dt)
    return x, jnp.pad(w_x, ((0, pad), (0, 0)))


def embedded_inputs(ids: jax.Array, embedding: jax.Array, w_x: jax.Array,
                    dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Token ids ``(T, N)`` through an embedding table ``(V, E)`` and the input kernel
    ``w_x (E, G*H)``, as the inputs ``(T, N, C')`` and kernel ``(C', G*H)`` oneDNN multiplies.

    Where ``E`` is the narrower (after padding both to oneDNN's blocks, as ``one_hot_inputs``
    does), the inputs are the embedding rows and the kernel ``w_x``, as PyTorch's ``nn.Embedding``
    feeds ``nn.LSTM``; the embedding's gradient is the rows' gradients added up per token (the
    gather's transpose). Otherwise they are the one-hot of the vocabulary and the folded table
    ``embedding @ w_x`` (``one_hot_inputs``). Either way the layer's value and gradients are those
    of ``embedding[ids] @ w_x``, to rounding.

    Measured on the Intel Xeon with AMX (one LSTM layer's training pass, the embedding's and the
    kernels' gradients included, V=92, E=64, the two routes taking turns 25 times in one process;
    median): float32 at ``seed``'s shape (T=40, N=128, H=128, 2 threads) 20.4 ms on the rows
    against 22.5 ms on the one-hot; at half that batch on 1 thread (one of 2 devices) 19.2 against
    25.9; at ``large``'s first layer (T=100, N=64, H=512) 254 against 260. bf16 at ``seed``'s shape
    8.5 either way. A user's whole float32 ``seed`` step (``jax.jit``, synchronous dispatch, old
    and new code in turns): 27.9-28.2 -> 23.3-26.2 ms; bf16 ``seed`` and float32 ``default``
    unchanged within the noise. ``pays`` measures the choice per shape.
    """
    from lstm_jax.products import folded_table

    dt = _compute_dtype(dtype)
    (vocab, embed), pad = embedding.shape, -embedding.shape[1] % _block(dt)
    if embed + pad > vocab + (-vocab % _block(dt)):
        return one_hot_inputs(ids, folded_table(embedding, w_x, dtype), dtype)
    rows = jnp.take(jnp.pad(embedding, ((0, 0), (0, pad))).astype(dt), ids, axis=0)
    return rows, jnp.pad(w_x, ((0, pad), (0, 0)))


def _block(dt: Any) -> int:
    """The input width oneDNN's RNN kernels run in blocks of: 32 bf16 values (an AMX tile row), 16 float32."""
    return 32 if dt == jnp.bfloat16 else 16


def _compute_dtype(dtype: Any) -> Any:
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return jnp.float32
    if jnp.dtype(dtype) == jnp.bfloat16:
        return jnp.bfloat16
    raise ValueError(f"onednn_lstm: dtype must be None, float32 or bfloat16, got {dtype}.")


def _forward(kind: str, args: tuple, dtype, threads, training):
    """oneDNN's forward pass of one layer; ``args``: x, w_x, w_h, b, h0 (and c0 for the LSTM).
    Returns the outputs and, for the backward pass, the inputs as passed and every output."""
    if _load() is None:
        raise RuntimeError(f"onednn_{kind} is not available: {unavailable_reason()}.")
    dt = _compute_dtype(dtype)
    x, w_x, w_h, b, h0, *c0 = args
    (steps, batch, features), hidden = x.shape, w_h.shape[0]
    threads = threads or cores_per_device()
    ws = _workspace_bytes(kind, steps, batch, features, hidden, dt, threads) if training else 1
    out = (jax.ShapeDtypeStruct((steps, batch, hidden), dt), jax.ShapeDtypeStruct((batch, hidden), dt),
           *[jax.ShapeDtypeStruct((batch, hidden), jnp.float32)] * len(c0), jax.ShapeDtypeStruct((ws,), jnp.uint8))
    args = (x.astype(dt), w_x.astype(dt), w_h.astype(dt), b.astype(jnp.float32), h0.astype(dt),
            *[c.astype(jnp.float32) for c in c0])
    outputs = jax.ffi.ffi_call(_TARGETS[kind][0], out, vmap_method="sequential")(
        *args, threads=np.int64(threads), training=training)
    return outputs[:-1], (args, outputs)


def _backward(kind: str, threads, args: tuple, outputs: tuple, cotangents: tuple) -> tuple:
    """oneDNN's backward pass: float32 gradients of ``args``, given the cotangents of the
    outputs (``d_ys, d_h_T`` and ``d_c_T`` for the LSTM)."""
    (steps, batch, features), hidden, gates = args[0].shape, args[2].shape[0], _GATES[kind]
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    out = (f32(steps, batch, features), f32(features, gates * hidden), f32(hidden, gates * hidden),
           f32(args[3].shape[0]), f32(batch, hidden), *[f32(batch, hidden)] * (len(args) - 5))
    return jax.ffi.ffi_call(_TARGETS[kind][1], out, vmap_method="sequential")(
        *args, *outputs, *(jnp.asarray(g, jnp.float32) for g in cotangents),
        threads=np.int64(threads or cores_per_device()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def onednn_lstm(x, w_x, w_h, b, h0, c0, dtype: Any = None, threads: int | None = None):
    """One LSTM layer over time-major ``x`` ``(T, N, C)``: returns ``(h_T, c_T, ys)``.

    ``w_x (C, 4H)``, ``w_h (H, 4H)``, ``b (4H,)`` with gates ``i, f, g, o`` (``LSTMCell``'s
    params), ``h0`` and ``c0`` ``(N, H)``. ``dtype`` is the compute dtype of the products (None or
    float32; bfloat16 for mixed precision); ``threads`` oneDNN's threads per call (None:
    ``cores_per_device()``). Outputs are in ``h0.dtype``; CPU only.
    """
    (ys, h, c), _ = _forward("lstm", (x, w_x, w_h, b, h0, c0), dtype, threads, training=False)
    out = h0.dtype
    return h.astype(out), c.astype(c0.dtype), ys.astype(out)


def _onednn_lstm_fwd(x, w_x, w_h, b, h0, c0, dtype, threads):
    (ys, h, c), (args, outputs) = _forward("lstm", (x, w_x, w_h, b, h0, c0), dtype, threads, training=True)
    dtypes = tuple(jnp.zeros((0,), a.dtype) for a in (x, w_x, w_h, b, h0, c0))  # residuals must be arrays
    return (h.astype(h0.dtype), c.astype(c0.dtype), ys.astype(h0.dtype)), ((args, outputs), dtypes)


def _onednn_lstm_bwd(dtype, threads, saved, cotangents):
    (args, outputs), dtypes = saved
    d_h, d_c, d_ys = cotangents
    grads = _backward("lstm", threads, args, outputs, (d_ys, d_h, d_c))
    return tuple(g.astype(d.dtype) for g, d in zip(grads, dtypes))


onednn_lstm.defvjp(_onednn_lstm_fwd, _onednn_lstm_bwd)


def onednn_gru(x, w_x, w_h, b, b_h, h0, dtype: Any = None, threads: int | None = None):
    """One GRU layer (``GRUCell(reset_after=True)``) over time-major ``x`` ``(T, N, C)`` through
    oneDNN's ``lbr_gru`` primitive: returns ``(h_T, ys)``.

    ``w_x (C, 3H)``, ``w_h (H, 3H)``, ``b`` and ``b_h (3H,)`` are ``GRUCell``'s ``input_kernel``,
    ``recurrent_kernel``, ``bias`` and ``recurrent_bias``, gates ``r, z, n``; ``h0 (N, H)``.
    oneDNN orders the gates ``u (= z), r, o (= n)`` with four biases (``b_z + b_hz``,
    ``b_r + b_hr``, ``b_n``, and ``b_hn`` inside the reset product); the permutation and the sums
    are plain JAX here, so their gradients come from JAX. ``dtype`` and ``threads`` as in
    ``onednn_lstm``. Outputs are in ``h0.dtype``; CPU only.
    """
    hidden = w_h.shape[0]
    order = lambda w: jnp.concatenate([w[..., hidden:2 * hidden], w[..., :hidden], w[..., 2 * hidden:]], axis=-1)
    b_r, b_z, b_n = jnp.split(b, 3)
    bh_r, bh_z, bh_n = jnp.split(b_h, 3)
    bias = jnp.concatenate([b_z + bh_z, b_r + bh_r, b_n, bh_n])
    return _onednn_gru(x, order(w_x), order(w_h), bias, h0, dtype, threads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _onednn_gru(x, w_x, w_h, bias, h0, dtype, threads):
    (ys, h), _ = _forward("gru", (x, w_x, w_h, bias, h0), dtype, threads, training=False)
    return h.astype(h0.dtype), ys.astype(h0.dtype)


def _onednn_gru_fwd(x, w_x, w_h, bias, h0, dtype, threads):
    (ys, h), (args, outputs) = _forward("gru", (x, w_x, w_h, bias, h0), dtype, threads, training=True)
    dtypes = tuple(jnp.zeros((0,), a.dtype) for a in (x, w_x, w_h, bias, h0))
    return (h.astype(h0.dtype), ys.astype(h0.dtype)), ((args, outputs), dtypes)


def _onednn_gru_bwd(dtype, threads, saved, cotangents):
    (args, outputs), dtypes = saved
    d_h, d_ys = cotangents
    grads = _backward("gru", threads, args, outputs, (d_ys, d_h))
    return tuple(g.astype(d.dtype) for g, d in zip(grads, dtypes))


_onednn_gru.defvjp(_onednn_gru_fwd, _onednn_gru_bwd)
