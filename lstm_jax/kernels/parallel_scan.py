r"""Parallel forms over time: a whole sequence at once instead of a loop of steps.

* ``linear_scan_log``: ``h_t = a_t * h_{t-1} + b_t`` (minGRU, minLSTM) from ``(log a_t, log b_t)``
  with ``jax.lax.associative_scan`` (depth ``log T``), combining pairs in log space as Feng et al.
  2024 do (their ``parallel_scan_log``)::

      (la1, lb1) . (la2, lb2) = (la1 + la2, logaddexp(la2 + lb1, lb2))
      h_t = exp(log A_t) * h_0 + exp(log B_t)

  ``h_0`` enters linearly, so it may be any value (zeros, a carried state, negative numbers).
* ``mlstm_parallel``: the mLSTM over ``L`` steps with an ``L x L`` decay matrix per head and
  sequence (Beck et al. 2024, eq. 29 ff.), stabilised row by row, the initial state ``(C0, n0, m0)``
  included as one more column so that the result equals the recurrent steps and a carry chains;
  ``chunk`` runs it over chunks of ``chunk`` steps in a ``lax.scan`` (memory ``O(chunk^2)``).

Padding (``valid`` False, right-padded sequences) is neutral: ``a = 1, b = 0`` for the linear
recurrence, ``f = 1, i = 0`` for the mLSTM, so the carry stops at each sequence's last valid
step. The inputs are time-major with the batch flattened: ``(T, N, ...)``. Every choice (chunk,
eps) is an argument; ``lstm_jax.dispatch`` makes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["linear_scan_log", "mlstm_parallel", "mlstm_parallel_bytes", "NEG", "QUADRATIC_ARRAYS"]

Array = jax.Array
NEG = -1e30  # log of a zero weight, finite so that gradients through masked entries stay finite
QUADRATIC_ARRAYS = 6  # (L, L) arrays per head and sequence alive for the backward pass: log D, D, S and cotangents


def linear_scan_log(log_a: Array, log_b: Array, h0: Array, valid: Array | None = None) -> tuple[Array, Array]:
    """All ``h_t`` of ``h_t = a_t h_{t-1} + b_t`` over axis 0: ``log_a, log_b (T, N, H)``,
    ``h0 (N, H)``, ``valid (T, N)`` or None. Returns ``(h_T, hs (T, N, H))``; ``h_T`` is the state
    after each sequence's last valid step."""
    if valid is not None:
        v = valid[..., None]
        log_a = jnp.where(v, log_a, 0.0)
        log_b = jnp.where(v, log_b, NEG)

    def combine(first, second):
        la1, lb1 = first
        la2, lb2 = second
        return la1 + la2, jnp.logaddexp(la2 + lb1, lb2)

    log_A, log_B = jax.lax.associative_scan(combine, (log_a, log_b), axis=0)
    hs = jnp.exp(log_A) * h0 + jnp.exp(log_B)
    return hs[-1], hs


def mlstm_parallel_bytes(steps: int, rows: int, heads: int, itemsize: int = 4) -> int:
    """About how many bytes the quadratic form holds for ``steps`` steps (one chunk) of ``rows``
    sequences and ``heads`` heads: ``QUADRATIC_ARRAYS`` arrays of ``rows * heads * steps^2``."""
    return QUADRATIC_ARRAYS * rows * heads * steps * steps * itemsize


def _mlstm_block(carry: tuple, q: Array, k: Array, v: Array, i_t: Array, log_f: Array, eps: float):
    """One chunk: ``q, k, v (L, N, K, d)`` (``k`` already scaled), ``i_t, log_f (L, N, K)``."""
    C0, n0, m0 = carry
    q, k, v = (jnp.moveaxis(a, 0, 2) for a in (q, k, v))  # (N, K, L, d)
    i_t, log_f = (jnp.moveaxis(a, 0, 2) for a in (i_t, log_f))  # (N, K, L)
    steps = q.shape[2]
    F = jnp.cumsum(log_f, axis=-1)
    causal = jnp.tril(jnp.ones((steps, steps), bool))
    log_D = jnp.where(causal, F[..., :, None] - F[..., None, :] + i_t[..., None, :], NEG)
    log_0 = F + m0[..., None]  # the initial state's weight
    m = jnp.maximum(jnp.max(log_D, axis=-1), log_0)  # (N, K, L): the recurrent form's stabiliser
    D = jnp.exp(log_D - m[..., None])
    w0 = jnp.exp(log_0 - m)
    S = jnp.einsum("nktd,nksd->nkts", q, k) * D
    num = w0[..., None] * jnp.einsum("nktd,nkde->nkte", q, C0) + jnp.einsum("nkts,nkse->nkte", S, v)
    den = w0 * jnp.einsum("nktd,nkd->nkt", q, n0) + jnp.sum(S, axis=-1)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)[..., None]
    w_last, w0_last = D[..., -1, :], w0[..., -1]
    C = w0_last[..., None, None] * C0 + jnp.einsum("nks,nksd,nkse->nkde", w_last, k, v)
    n = w0_last[..., None] * n0 + jnp.einsum("nks,nksd->nkd", w_last, k)
    return (C, n, m[..., -1]), jnp.moveaxis(h, 2, 0)


def mlstm_parallel(q: Array, k: Array, v: Array, i_t: Array, f_t: Array, carry: tuple, valid: Array | None = None,
                   *, chunk: int = 0, eps: float = 1e-6) -> tuple[tuple, Array]:
    """The mLSTM's ``h~`` for all steps: ``q, k, v (T, N, K, d)`` (``k`` scaled by ``1/sqrt(d)``),
    gate pre-activations ``i_t, f_t (T, N, K)``, ``carry = (C (N, K, d, d), n (N, K, d), m (N, K))``,
    ``valid (T, N)`` or None; ``chunk``: steps per quadratic block (0: all ``T`` at once).
    Returns ``((C, n, m), h~ (T, N, K, d))``, equal to the recurrent steps to rounding."""
    log_f = jax.nn.log_sigmoid(f_t)
    if valid is not None:
        log_f = jnp.where(valid[..., None], log_f, 0.0)
        i_t = jnp.where(valid[..., None], i_t, NEG)
    steps = q.shape[0]
    if not chunk or chunk >= steps:
        return _mlstm_block(tuple(carry), q, k, v, i_t, log_f, eps)
    pad = -steps % chunk
    if pad:  # padded steps keep the carry as it is (f = 1, i = 0) and are cut off below
        widths = lambda a: [(0, pad)] + [(0, 0)] * (a.ndim - 1)
        q, k, v = (jnp.pad(a, widths(a)) for a in (q, k, v))
        log_f = jnp.pad(log_f, widths(log_f))
        i_t = jnp.pad(i_t, widths(i_t), constant_values=NEG)
    blocks = lambda a: a.reshape(-1, chunk, *a.shape[1:])

    def body(carry, xs):
        return _mlstm_block(carry, *xs, eps)

    carry, hs = jax.lax.scan(body, tuple(carry), tuple(blocks(a) for a in (q, k, v, i_t, log_f)))
    return carry, hs.reshape(-1, *hs.shape[2:])[:steps]
