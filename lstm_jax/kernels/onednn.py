"""The LSTM and GRU layers through oneDNN's RNN primitives on CPU, as PyTorch's CPU ``nn.LSTM``
and ``nn.GRU`` run them.

XLA:CPU compiles a recurrent layer as a loop of small products (``kernels.fused``). PyTorch hands
the whole layer to oneDNN, whose RNN primitive runs the input projection as one large product, the
recurrence with kernels generated for the CPU at hand (AMX tiles for bf16 where the CPU has them)
and the backward pass with the weight gradients batched over time. ``onednn_lstm`` and
``onednn_gru`` (``GRUCell(reset_after=True)``: oneDNN's ``lbr_gru``) call those primitives from
JAX through the XLA FFI (``kernels/csrc/onednn_lstm.cc``), each with a ``jax.custom_vjp`` whose
backward pass is oneDNN's too.

This module is the binding only: it takes every choice (threads, input route) as an argument. It
is optional: ``pip install`` builds the extension where a compiler and the ``onednn-cpu-gomp``
wheel are present (Linux x86-64), and ``loaded()`` says whether it loaded (``load_failure()``
says why not). Whether a layer runs here is decided by ``lstm_jax.dispatch`` (where it measured
faster than the fused layer, or as ``LSTM_JAX_ONEDNN`` says).

Differences from the pure-JAX path, all within rounding: in bf16 mode the hidden state between
steps is held in bf16 (oneDNN's convention; the pure-JAX path keeps it in float32 and rounds only
the products' inputs), and gradients come back in float32.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.core.errors import ConfigError
from lstm_jax.core.host import usable_cores
from lstm_jax.core.products import folded_table

__all__ = ["loaded", "load_failure", "supports", "cores_per_device", "onednn_lstm", "onednn_gru", "one_hot_inputs",
           "embedding_rows", "routed_inputs", "block", "GATES"]

_TARGETS = {"lstm": ("lstm_jax_onednn_lstm_forward", "lstm_jax_onednn_lstm_backward"),
            "gru": ("lstm_jax_onednn_gru_forward", "lstm_jax_onednn_gru_backward")}
GATES = {"lstm": 4, "gru": 3}
_state: dict[str, Any] = {}


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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _built_against_newer_jaxlib(record: Path | None = None) -> str | None:
    """Why the extension must not load, when it was compiled against a newer jaxlib's FFI headers
    than the one running (its handlers would stop JAX's CPU backend from starting), else None."""
    import jaxlib

    try:
        record = record or Path(__file__).parent / "_onednn_lstm.build.json"
        built = json.loads(record.read_text())["jaxlib"]
    except (OSError, ValueError, KeyError):
        return None  # a build from before the record was written: load it as before
    if _version(built) <= _version(jaxlib.__version__):
        return None
    return (f"the extension was built against jaxlib {built}, newer than this process's jaxlib "
            f"{jaxlib.__version__}; reinstall lstm-jax with this jaxlib (pip install --no-build-isolation .)")


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]
    _state["lib"], reason = None, None
    if not sys.platform.startswith("linux"):
        reason = "oneDNN's extension is built on Linux only"
    else:
        ext = sorted(Path(__file__).parent.glob("_onednn_lstm*.so"))
        dnnl = _libdnnl()
        if not ext:
            reason = "the extension was not built (pip install needs g++ and the onednn-cpu-gomp wheels)"
        elif (newer := _built_against_newer_jaxlib()) is not None:
            reason = newer
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


def loaded() -> bool:
    """Whether the extension was built and loads here."""
    return _load() is not None


def load_failure() -> str | None:
    """Why ``loaded()`` is False, in words (None when it is True)."""
    _load()
    return _state.get("reason")


def cores_per_device() -> int:
    """This process's cores shared by the devices of the ``shard_map`` being traced (one core
    each with ``lstm_jax.parallel.value_and_grad`` on per-core CPU devices): the most oneDNN
    threads one call may use."""
    mesh = jax.sharding.get_abstract_mesh()
    return max(1, usable_cores() // (1 if mesh.empty else mesh.size))


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


def one_hot_inputs(ids: jax.Array, w_x: jax.Array, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Token ids ``(T, N)`` as the one-hot inputs ``(T, N, C')`` oneDNN multiplies, and the input
    kernel ``w_x (C, G*H)`` to match: the vocabulary ``C`` padded with zero rows to a multiple of
    ``block(dtype)``, the width oneDNN's kernels run in blocks of. The padded rows' gradient is
    dropped by autodiff (``jnp.pad``'s transpose), so the layer's value and gradients are those of
    the unpadded one-hot product."""
    dt = _compute_dtype(dtype)
    pad = -w_x.shape[0] % block(dt)
    x = jax.nn.one_hot(ids, w_x.shape[0] + pad, dtype=dt)
    return x, jnp.pad(w_x, ((0, pad), (0, 0)))


def embedding_rows(ids: jax.Array, embedding: jax.Array, w_x: jax.Array,
                   dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Token ids ``(T, N)`` through an embedding table ``(V, E)`` as the inputs ``(T, N, E')``
    oneDNN multiplies by the input kernel ``w_x (E, G*H)``, as PyTorch's ``nn.Embedding`` feeds
    ``nn.LSTM``: the embedding rows, ``E`` padded with zero columns to ``block(dtype)`` (and
    ``w_x`` with zero rows). The embedding's gradient is the rows' gradients added up per token
    (the gather's transpose); the layer's value and gradients are those of ``embedding[ids] @ w_x``.
    The other route, the one-hot of the vocabulary times the folded table ``embedding @ w_x``, is
    ``one_hot_inputs``; ``lstm_jax.dispatch`` chooses between them."""
    dt = _compute_dtype(dtype)
    pad = -embedding.shape[1] % block(dt)
    rows = jnp.take(jnp.pad(embedding, ((0, 0), (0, pad))).astype(dt), ids, axis=0)
    return rows, jnp.pad(w_x, ((0, pad), (0, 0)))


def routed_inputs(route: str, x: jax.Array, w_x: jax.Array, dtype: Any = None,
                  embedding: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The inputs and input kernel oneDNN multiplies on ``route``: ``'features'`` (``x`` as given),
    ``'one_hot'`` (token ids as the one-hot of the vocabulary, through the folded table
    ``embedding @ w_x`` when there is an embedding) or ``'rows'`` (the embedding's rows)."""
    if route == "rows":
        return embedding_rows(x, embedding, w_x, dtype)
    if route == "one_hot":
        return one_hot_inputs(x, w_x if embedding is None else folded_table(embedding, w_x, dtype), dtype)
    return x, w_x


def block(dtype: Any = None) -> int:
    """The input width oneDNN's RNN kernels run in blocks of: 32 bf16 values (an AMX tile row), 16 float32."""
    return 32 if _compute_dtype(dtype) == jnp.bfloat16 else 16


def _compute_dtype(dtype: Any) -> Any:
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return jnp.float32
    if jnp.dtype(dtype) == jnp.bfloat16:
        return jnp.bfloat16
    raise ConfigError(f"onednn_lstm: dtype must be None, float32 or bfloat16, got {dtype}.")


def _forward(kind: str, args: tuple, dtype, threads, training):
    """oneDNN's forward pass of one layer; ``args``: x, w_x, w_h, b, h0 (and c0 for the LSTM).
    Returns the outputs and, for the backward pass, the inputs as passed and every output."""
    if _load() is None:
        raise RuntimeError(f"onednn_{kind} is not available: {load_failure()}.")
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
    (steps, batch, features), hidden, gates = args[0].shape, args[2].shape[0], GATES[kind]
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
