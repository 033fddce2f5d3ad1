"""Timing on the machine at hand: the routines behind ``lstm_jax.dispatch``'s measured choices.

Every candidate is compiled first, then the candidates take turns ``rounds`` times and the median
counts, so a slow spell of a shared machine hits all of them alike. The programs timed are the
ones the layers run: a loop of dependent steps for the carry layout, a layer's whole training pass
(forward and backward) for the oneDNN choice and the mLSTM's form.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.core.products import folded_table, matmul
from lstm_jax.core.scan import scan_layer
from lstm_jax.core.xlstm import MLSTMCell
from lstm_jax.kernels import cudnn, onednn
from lstm_jax.kernels.fused import fused_gru, fused_lstm, recurrent_product
from lstm_jax.kernels.parallel_scan import mlstm_parallel

__all__ = ["median_seconds", "simplest_fast_enough", "layouts", "onednn_layer", "compute_dtypes", "cudnn_layer",
           "mlstm_forms", "MARGIN"]

MARGIN = 1.1  # a more complex candidate must be this much faster than a simpler one: a choice, not noise


def median_seconds(runs: dict[Any, Callable[[], Any]], rounds: int) -> dict:
    """Median wall seconds of each ``runs[k]()`` (waited for), the runs taking turns ``rounds`` times."""
    times: dict[Any, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(t)) for k, t in times.items()}


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


def layouts(batch: int, hidden: int, gates: int, dtype: Any = None, steps: int = 100,
            rounds: int = 5) -> tuple[float, float]:
    """Median seconds per step of a loop of ``steps`` dependent products ``h @ W_h`` (with the
    activation and the carry fed back, as in the layer), row-major and transposed carry, on the CPU."""
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

            loop = jax.jit(lambda h, w, step=step: jax.lax.fori_loop(0, steps, lambda i, c: step(c, w), h))
            h0 = h.T if transposed else h
            loop(h0, w).block_until_ready()  # compile
            runs[transposed] = functools.partial(loop, h0, w)
        seconds = median_seconds(runs, rounds)
    return seconds[False] / steps, seconds[True] / steps


def onednn_layer(steps: int, batch: int, features: int, hidden: int, dtype: Any = None,
                 threads: tuple[int, ...] | list[int] = (1,), tokens: bool = False, cell: str = "lstm",
                 embed: int = 0, route: str = "one_hot", fused: tuple[bool, bool] = (False, False),
                 rounds: int = 5) -> dict:
    """Median seconds of one LSTM or GRU layer's training pass (forward and backward): ``'fused'``
    (the pure-JAX layer) and oneDNN's with each count in ``threads``, taking turns on the CPU.

    With ``tokens`` the inputs are ``features`` token ids (a row gather for the fused layer, the
    one-hot product for oneDNN); with ``embed`` > 0 as well, through an embedding table
    ``(features, embed)`` with its gradient: a gather from the folded table for the fused layer,
    ``route`` (``'rows'`` or ``'one_hot'``) for oneDNN, as ``scan_cell`` runs them. ``fused``:
    the fused layer's ``(transposed, loop_factors)``, as its plan would run it."""
    passes = _layer_passes(steps, batch, features, hidden, dtype, threads, tokens, cell, embed, route, fused)
    return _timed_passes(passes, _layer_arrays(steps, batch, features, hidden, onednn.GATES[cell], tokens, embed),
                         rounds)


def compute_dtypes(steps: int, batch: int, hidden: int, cell: str = "lstm",
                   threads: dict[str, tuple[int, ...]] | None = None,
                   fused: dict[str, tuple[bool, bool]] | None = None, rounds: int = 5) -> dict:
    """Median seconds of a hidden-to-hidden LSTM or GRU layer's training pass (``hidden`` inputs
    and units) in float32 and in bfloat16 products, keyed ``(dtype name, candidate)``: each dtype's
    fused layer (``fused[name]``: its ``(transposed, loop_factors)``) and oneDNN's with each count
    in ``threads[name]`` (none where oneDNN does not run that dtype here), all taking turns on the
    CPU, so a slow spell of the machine hits both dtypes alike."""
    threads, fused = threads or {}, fused or {}
    passes = {}
    for name in ("float32", "bfloat16"):
        one = _layer_passes(steps, batch, hidden, hidden, jnp.dtype(name), threads.get(name, ()), False, cell, 0,
                            "one_hot", fused.get(name, (False, False)))
        passes.update({(name, k): f for k, f in one.items()})
    return _timed_passes(passes, _layer_arrays(steps, batch, hidden, hidden, onednn.GATES[cell]), rounds)


def _layer_passes(steps: int, batch: int, features: int, hidden: int, dtype: Any, threads, tokens: bool, cell: str,
                  embed: int, route: str, fused: tuple[bool, bool]) -> dict[Any, Callable]:
    """The training passes ``onednn_layer`` times, as functions of ``_layer_arrays``' arrays (the
    loss whose gradient is the pass): ``'fused'`` and oneDNN's with each count in ``threads``."""
    embed = embed if tokens else 0
    zeros = np.zeros((batch, hidden), np.float32)
    ids = np.random.default_rng(0).integers(0, features, (steps, batch)).astype(np.int32)

    def fused_layer(x, w_x, w_h, b, b_h, table):
        if embed:
            w_x = folded_table(table, w_x, dtype)
        x_proj = (jnp.take(w_x, ids, axis=0) if tokens else matmul(x, w_x, dtype, jnp.float32)) + b
        if cell == "gru":
            return jnp.sum(fused_gru(w_h, b_h, x_proj, zeros, dtype, 1, *fused)[1])
        return jnp.sum(fused_lstm(w_h, x_proj, zeros, zeros, dtype, 1, *fused)[2])

    def through_onednn(x, w_x, w_h, b, b_h, table, threads):
        if tokens:
            x, w_x = onednn.routed_inputs(route, ids, w_x, dtype, table if embed else None)
        if cell == "gru":
            return jnp.sum(onednn.onednn_gru(x, w_x, w_h, b, b_h, zeros, dtype, threads)[1])
        return jnp.sum(onednn.onednn_lstm(x, w_x, w_h, b, zeros, zeros, dtype, threads)[2])

    return {"fused": fused_layer, **{k: functools.partial(through_onednn, threads=k) for k in threads}}


def _layer_arrays(steps: int, batch: int, features: int, hidden: int, gates: int, tokens: bool = False,
                  embed: int = 0) -> list[np.ndarray]:
    """The arguments of a ``_layer_passes`` pass: inputs, input and recurrent kernels, the two biases
    and the embedding table (a dummy column without ``embed``)."""
    rng = np.random.default_rng(0)
    embed = embed if tokens else 0
    return [rng.standard_normal(s).astype(np.float32) * 0.1 for s in
            ((steps, batch, features), (embed or features, gates * hidden), (hidden, gates * hidden),
             (gates * hidden,), (gates * hidden,), (features, embed or 1))]


def _timed_passes(passes: dict[Any, Callable], arrays: list[np.ndarray], rounds: int) -> dict:
    """Median seconds of each pass's gradient over ``arrays``, each compiled first, the passes
    taking turns on the CPU."""
    cpu = jax.devices("cpu")[0]
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
        args = [jax.device_put(a, cpu) for a in arrays]
        runs = {k: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))) for k, f in passes.items()}
        for run in runs.values():
            jax.block_until_ready(run(*args))  # compile
        return median_seconds({k: functools.partial(run, *args) for k, run in runs.items()}, rounds)


def cudnn_layer(steps: int, batch: int, features: int, hidden: int, seq_lengths: bool = False,
                rounds: int = 5) -> dict:
    """Median seconds of one float32 LSTM layer's training pass (forward and backward) on the
    default device (a GPU): ``'cudnn'`` (``jax.experimental.rnn``) and ``'other'``, the layer it
    replaces (the fused layer, with the rows' ``seq_lengths`` where given), taking turns."""
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in
            ((steps, batch, features), (features, 4 * hidden), (hidden, 4 * hidden), (4 * hidden,))]
    host_lengths = rng.integers(steps // 2, steps + 1, batch).astype(np.int32)
    zeros = np.zeros((batch, hidden), np.float32)
    lengths = None

    def other(x, w_x, w_h, b):
        x_proj = matmul(x, w_x, None, jnp.float32) + b
        return jnp.sum(fused_lstm(w_h, x_proj, zeros, zeros, None, 1, False, hidden <= 128, seq_lengths=lengths)[2])

    def through_cudnn(x, w_x, w_h, b):
        params = [{"input_kernel": w_x, "recurrent_kernel": w_h, "bias": b}]
        return jnp.sum(cudnn.cudnn_lstm(x, zeros[None], zeros[None], params, lengths)[0])

    with jax.ensure_compile_time_eval():  # concrete arrays even when asked while a program is traced
        x, w_x, w_h, b = map(jnp.asarray, host)
        lengths = jnp.asarray(host_lengths) if seq_lengths else None
        runs = {k: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))) for k, f in
                {"other": other, "cudnn": through_cudnn}.items()}
        for run in runs.values():
            jax.block_until_ready(run(x, w_x, w_h, b))  # compile
        return median_seconds({k: functools.partial(run, x, w_x, w_h, b) for k, run in runs.items()}, rounds)


def mlstm_forms(steps: int, rows: int, hidden: int, heads: int, chunks: tuple[int, ...] | list[int],
                rounds: int = 5) -> dict:
    """Median seconds of one float32 ``MLSTMCell(hidden, num_heads=heads)`` layer's recurrence,
    forward and backward, over ``steps`` steps of ``rows`` sequences, from the projected inputs
    (what the forms share is not timed): ``'scan'`` (``core.scan.scan_layer``, step by step) and
    the parallel form (``kernels.parallel_scan.mlstm_parallel``) with each chunk length in
    ``chunks`` (0: the whole sequence in one block), taking turns on the CPU."""
    cpu = jax.devices("cpu")[0]
    cell = MLSTMCell(hidden, num_heads=heads)
    rng = np.random.default_rng(0)
    host = rng.standard_normal((steps, rows, cell.projection_size)).astype(np.float32)

    def scan(x_proj, carry):
        return jnp.sum(scan_layer(cell, {}, x_proj, carry)[1])

    def parallel(x_proj, carry, chunk):
        q, k, v, o, i_t, f_t = cell.split_projection(x_proj)
        _, h = mlstm_parallel(q, k, v, i_t, f_t, tuple(carry), chunk=chunk, eps=cell.eps)
        return jnp.sum(jax.nn.sigmoid(o) * h.reshape(o.shape))

    candidates = {"scan": scan, **{c: functools.partial(parallel, chunk=c) for c in chunks}}
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
        args = (jax.device_put(host, cpu), jax.device_put(cell.initial_carry(rows), cpu))
        runs = {k: jax.jit(jax.grad(f, argnums=(0, 1))) for k, f in candidates.items()}
        for run in runs.values():
            jax.block_until_ready(run(*args))  # compile
        return median_seconds({k: functools.partial(run, *args) for k, run in runs.items()}, rounds)
