"""Fused recurrent layers with a hand-written backward pass (``jax.custom_vjp``), as cuDNN does it.

Automatic differentiation of ``lax.scan`` accumulates the recurrent-kernel gradient inside the
backward loop: two small matmuls per step (``dz @ W_h.T`` and ``h.T @ dz``). Here the backward
scan runs only the ``dh`` recursion (one matmul per step) and saves each step's gate
pre-activation gradients ``dz``; the recurrent-kernel gradient is then one large matmul over all
steps (``H_prev.T @ dZ``), and the input-kernel and bias gradients follow by autodiff of the
hoisted input projection. Same numbers as the plain scan (to float32 rounding), fewer and larger
matmuls.

``fused_lstm(w_h, x_proj, h0, c0, dtype, unroll, transposed, loop_factors)``,
``fused_gru(w_h, b_h, x_proj, h0, dtype, unroll, transposed, loop_factors)`` and
``fused_rnn(w_h, x_proj, h0, activation, dtype, unroll)`` take the hoisted input projection
``x_proj`` of shape ``(T, N, G*H)`` and return ``(h_T, c_T, ys)`` / ``(h_T, ys)``.

Each also takes, keyword-only:

* ``seq_lengths`` ``(N,)`` int: right-padded sequences. At a step ``t >= seq_lengths[n]`` the
  carry of row ``n`` does not move (``h_t = h_{t-1}``, ``c_t = c_{t-1}``), so the returned carry is
  the one after each sequence's last valid step and ``ys[t]`` past the end repeats it (the layer
  zeroes those outputs); the backward pass passes the carry's gradient through such steps
  unchanged and gives them zero gate gradients. ``reverse`` within the valid part is the caller's
  ``reverse_padded``, as for the plain scan.
* ``recurrent_mask`` ``(N, H)``: variational (recurrent) dropout, already scaled
  (``keep / (1 - rate)``): the state entering the recurrent product is ``h * mask`` at every step,
  ``z_t = x_proj_t + (h_{t-1} * mask) @ W_h`` (for the GRU only the product; ``z * h`` keeps the
  unmasked state, as Keras). Being constant over time it changes nothing in the shape of the
  backward pass: ``dh_{t-1} = (dz_t @ W_h.T) * mask`` and ``dW_h = (H_prev * mask).T @ dZ``. The
  mask is a constant: its cotangent is zero (the layer passes it through ``stop_gradient``).
* ``w_proj`` ``(H, P)`` (LSTM only): the projection of an LSTMP cell, ``h = (o * tanh(c)) @ W_hr``;
  ``h`` and ``w_h``'s rows are then of size ``P``. Its gradient is one matmul after the loop,
  ``R.T @ dH`` over all steps; the backward loop gains the per-step ``dh @ W_hr.T``.

Two choices are arguments, made by ``lstm_jax.dispatch`` (the numbers are the same either way, to
float32 rounding):

* ``transposed``: on CPU the LSTM and GRU forward loops hold the carry transposed, ``h.T``
  ``(H, N)`` contracted on its first axis, which XLA:CPU sends to another kernel library for the
  same product (on GPU and TPU the program keeps the row-major loop whatever is asked).
* ``loop_factors``: the forward loop computes the backward pass's gradient-independent factors
  while the gates are in cache; otherwise it saves the states and gates, and the backward pass
  computes the factors in one vectorised pass over all steps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.core.cells import ACTIVATIONS
from lstm_jax.core.products import in_dtype, matmul, transposed_product, weight_gradient

__all__ = ["fused_lstm", "fused_gru", "fused_rnn"]

Array = jax.Array


# --- LSTM ---------------------------------------------------------------------------------------

def fused_lstm(w_h: Array, x_proj: Array, h0: Array, c0: Array, dtype: Any = None, unroll: int = 1,
               transposed: bool = False, loop_factors: bool = False, *, seq_lengths: Array | None = None,
               recurrent_mask: Array | None = None, w_proj: Array | None = None):
    """LSTM over ``x_proj`` ``(T, N, 4H)`` (input projection plus bias, gates i, f, g, o); ``h0``
    ``(N, H)`` (``(N, P)`` with ``w_proj``) and ``c0`` ``(N, H)``. Returns ``(h_T, c_T, ys)``;
    ``transposed``, ``loop_factors``, ``seq_lengths``, ``recurrent_mask`` and ``w_proj`` as in the
    module docstring."""
    valid, mask = _valid(seq_lengths, x_proj), _constant(recurrent_mask)
    return _fused_lstm(w_h, w_proj, x_proj, h0, c0, valid, mask, dtype, unroll, transposed, loop_factors)


def _lstm_forward(w_h, w_proj, x_proj, h0, c0, valid, mask, dtype, unroll, transposed, loop_factors,
                  differentiated=False):
    scan = functools.partial(_lstm_scan, dtype=dtype, unroll=unroll, saves=_saves(loop_factors, differentiated))
    return _by_layout(scan, transposed, w_h, w_proj, x_proj, h0, c0, valid, mask)


def _lstm_scan(w_h, w_proj, x_proj, h0, c0, valid, mask, *, dtype, unroll, saves, transposed):
    """The forward loop; ``saves`` None, ``'factors'`` or ``'states'`` (see ``_saves``)."""
    out, hidden = x_proj.dtype, c0.shape[-1]
    # One sigmoid over all four gates: tanh(z) = 2 * sigmoid(2 z) - 1 for the candidate g.
    scale = jnp.repeat(jnp.array([1.0, 1.0, 2.0, 1.0], out), hidden)
    mask = None if mask is None else (mask.T if transposed else mask)

    def step(carry, xs):
        h_in, c_prev = carry  # h_in: h, or h.T when transposed
        xp, v = xs
        h_rec = h_in if mask is None else h_in * mask
        s = jax.nn.sigmoid((xp + recurrent_product(h_rec, w_h, dtype, out, transposed)) * scale)
        i, f, s_g, o = jnp.split(s, 4, axis=-1)
        c = f * c_prev + i * (2.0 * s_g - 1.0)
        r = o * jnp.tanh(c)
        h = r if w_proj is None else matmul(r, w_proj, dtype, out)
        if saves == "factors":
            saved = _lstm_backward_factors(s, c_prev, c) + ((r,) if w_proj is not None else ())
        if v is not None:  # past a sequence's end its carry stays
            h = jnp.where(v, h, h_in.T if transposed else h_in)
            c = jnp.where(v, c, c_prev)
        if saves == "states":
            saved = (c, s)
        elif saves is None:
            saved = ()
        return (h.T if transposed else h, c), (h, saved)

    (h, c), (hs, saved) = jax.lax.scan(step, (h0.T if transposed else h0, c0), (x_proj, valid), unroll=unroll)
    return (h.T if transposed else h, c, hs), (hs, saved)


def _lstm_backward_factors(s, c_prev, c):
    """The parts of the LSTM derivative that do not depend on the incoming gradients, from the
    sigmoids ``s`` (i, f, (g+1)/2, o) and the cell state before and after the step(s):
    ``dc += dh * dc_dh`` and ``dz = [dc, dc, dc, dh] * coef`` (gates i, f, g, o); ``dc_prev = dc * f``."""
    i, f, s_g, o = jnp.split(s, 4, axis=-1)
    g, tc = 2.0 * s_g - 1.0, jnp.tanh(c)
    coef = jnp.concatenate([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g), tc * o * (1.0 - o)], -1)
    return o * (1.0 - tc * tc), coef, f


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _fused_lstm(w_h, w_proj, x_proj, h0, c0, valid, mask, dtype, unroll, transposed, loop_factors):
    return _lstm_forward(w_h, w_proj, x_proj, h0, c0, valid, mask, dtype, unroll, transposed, loop_factors)[0]


def _fused_lstm_fwd(w_h, w_proj, x_proj, h0, c0, valid, mask, dtype, unroll, transposed, loop_factors):
    outputs, (hs, saved) = _lstm_forward(w_h, w_proj, x_proj, h0, c0, valid, mask, dtype, unroll, transposed,
                                         loop_factors, True)
    return outputs, (w_h, w_proj, h0, c0, valid, mask, hs, saved)


def _fused_lstm_bwd(dtype, unroll, transposed, loop_factors, residuals, cotangents):
    w_h, w_proj, h0, c0, valid, mask, hs, saved = residuals
    if loop_factors:
        dc_dh, coef, f, *rs = saved
    else:  # cell states and gates: the factors in one pass over all steps
        cs, gates = saved
        dc_dh, coef, f = _lstm_backward_factors(gates, _previous(c0, cs), cs)
        rs = [] if w_proj is None else [jnp.split(gates, 4, axis=-1)[3] * jnp.tanh(cs)]
    dh_t, dc_t, dys = cotangents
    w_t = w_h.T
    w_proj_t = None if w_proj is None else w_proj.T

    def step(carry, xs):
        dh_next, dc_next = carry
        dy, dc_dh_t, coef_t, f_t, v = xs
        dh = dy + dh_next
        dr = dh if w_proj_t is None else matmul(dh, w_proj_t, dtype, dh.dtype)
        dc = dc_next + dr * dc_dh_t
        dz = coef_t * jnp.concatenate([dc, dc, dc, dr], axis=-1)
        dh_prev, dc_prev = matmul(dz, w_t, dtype, dz.dtype), dc * f_t
        if mask is not None:
            dh_prev = dh_prev * mask
        if v is not None:  # a step past the end: no gate gradients, the carry's passes through
            dz = jnp.where(v, dz, jnp.zeros_like(dz))
            dh_prev, dc_prev = jnp.where(v, dh_prev, dh), jnp.where(v, dc_prev, dc_next)
            dh = jnp.where(v, dh, jnp.zeros_like(dh))
        return (dh_prev, dc_prev), (dz, dh if w_proj is not None else ())

    (dh0, dc0), (dzs, dhs) = jax.lax.scan(step, (dh_t, dc_t), (dys, dc_dh, coef, f, valid), reverse=True,
                                          unroll=unroll)
    h_prev = _previous(h0, hs)
    dw_h = weight_gradient(h_prev if mask is None else h_prev * mask, dzs, dtype, w_h.dtype)
    dw_proj = None if w_proj is None else weight_gradient(rs[0], dhs, dtype, w_proj.dtype)
    return dw_h, dw_proj, dzs, dh0, dc0, _zero(valid), _zero(mask)


_fused_lstm.defvjp(_fused_lstm_fwd, _fused_lstm_bwd)


def _valid(seq_lengths: Array | None, x_proj: Array) -> Array | None:
    """``(T, N, 1)`` booleans, step ``t`` of row ``n`` within its sequence (None without lengths)."""
    if seq_lengths is None:
        return None
    steps = jnp.arange(x_proj.shape[0], dtype=jnp.int32)[:, None]
    return (steps < jnp.asarray(seq_lengths, jnp.int32)[None, :])[..., None]


def _constant(mask: Array | None) -> Array | None:
    return None if mask is None else jax.lax.stop_gradient(mask)


def _zero(x: Array | None):
    """The cotangent of a constant input: zeros (``float0`` for booleans), None for None."""
    if x is None:
        return None
    if x.dtype == jnp.bool_:
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


def _previous(x0: Array, xs: Array) -> Array:
    """The value before each step: ``[x0, xs[0], ..., xs[T-2]]``."""
    return jnp.concatenate([x0[None], xs[:-1]], axis=0)


def _saves(loop_factors: bool, differentiated: bool) -> str | None:
    """What a forward loop saves for the backward pass: nothing when not differentiated; the
    backward factors with ``loop_factors``; otherwise the states and gates."""
    if not differentiated:
        return None
    return "factors" if loop_factors else "states"


def _by_layout(scan, transposed: bool, *arrays):
    """``scan(*arrays, transposed=...)``: transposed where asked and the program runs on CPU."""
    if not transposed:
        return scan(*arrays, transposed=False)
    return jax.lax.platform_dependent(*arrays, cpu=functools.partial(scan, transposed=True),
                                      default=functools.partial(scan, transposed=False))


def recurrent_product(h: Array, w_h: Array, dtype: Any, out_dtype: Any, transposed: bool) -> Array:
    """``h @ w_h`` ``(N, G*H)``; with ``transposed`` the carry is held as ``h.T`` ``(H, N)`` and
    contracted on its first axis (same numbers, another kernel; see ``lstm_jax.dispatch``)."""
    if not transposed:
        return matmul(h, w_h, dtype, out_dtype)
    return transposed_product(*in_dtype(dtype, h, w_h), out_dtype)


# --- GRU (reset gate after the recurrent product, as PyTorch and cuDNN) --------------------------

def fused_gru(w_h: Array, b_h: Array, x_proj: Array, h0: Array, dtype: Any = None, unroll: int = 1,
              transposed: bool = False, loop_factors: bool = False, *, seq_lengths: Array | None = None,
              recurrent_mask: Array | None = None):
    """GRU (reset gate after the product) over ``x_proj`` ``(T, N, 3H)`` (gates r, z, n; recurrent
    bias ``b_h``); ``h0`` ``(N, H)``. Returns ``(h_T, ys)``; ``seq_lengths`` and ``recurrent_mask``
    as in the module docstring."""
    valid, mask = _valid(seq_lengths, x_proj), _constant(recurrent_mask)
    return _fused_gru(w_h, b_h, x_proj, h0, valid, mask, dtype, unroll, transposed, loop_factors)


def _gru_forward(w_h, b_h, x_proj, h0, valid, mask, dtype, unroll, transposed, loop_factors, differentiated=False):
    scan = functools.partial(_gru_scan, dtype=dtype, unroll=unroll, saves=_saves(loop_factors, differentiated))
    return _by_layout(scan, transposed, w_h, b_h, x_proj, h0, valid, mask)


def _gru_scan(w_h, b_h, x_proj, h0, valid, mask, *, dtype, unroll, saves, transposed):
    """The forward loop; ``saves`` None, ``'factors'`` or ``'states'`` (see ``_saves``)."""
    out = x_proj.dtype
    mask = None if mask is None else (mask.T if transposed else mask)

    def step(carry, xs):
        h_prev, h = carry  # h_prev: h, or h.T when transposed
        xp, v = xs
        h_rec = h_prev if mask is None else h_prev * mask
        u = recurrent_product(h_rec, w_h, dtype, out, transposed) + b_h
        a_r, a_z, a_n = jnp.split(xp, 3, axis=-1)
        u_r, u_z, u_n = jnp.split(u, 3, axis=-1)
        r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
        n = jnp.tanh(a_n + r * u_n)
        h_new = (1.0 - z) * n + z * h
        if saves == "factors":
            saved = _gru_backward_factors(r, z, n, u_n, h)
        else:
            saved = jnp.concatenate([r, z, n, u_n], axis=-1) if saves == "states" else ()
        if v is not None:  # past a sequence's end its carry stays
            h_new = jnp.where(v, h_new, h)
        return (h_new.T if transposed else h_new, h_new), (h_new, saved)

    (_, h), (hs, saved) = jax.lax.scan(step, (h0.T if transposed else h0, h0), (x_proj, valid), unroll=unroll)
    return (h, hs), (hs, saved)


def _gru_backward_factors(r, z, n, u_n, h_prev):
    """Every GRU gate gradient is ``dh`` times a factor known from the forward pass: recurrent-side
    ``du = dh * coef_u`` (gates r, z, n on axis -2), input-side the same but ``da_n = dh * d_n``
    for the last gate; ``dh_prev = dh * z + du @ W_h.T``. Returns ``(coef_u, d_n, z)``."""
    d_n = (1.0 - z) * (1.0 - n * n)
    d_r = d_n * u_n * r * (1.0 - r)
    d_z = (h_prev - n) * z * (1.0 - z)
    return jnp.stack([d_r, d_z, d_n * r], axis=-2), d_n, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _fused_gru(w_h, b_h, x_proj, h0, valid, mask, dtype, unroll, transposed, loop_factors):
    return _gru_forward(w_h, b_h, x_proj, h0, valid, mask, dtype, unroll, transposed, loop_factors)[0]


def _fused_gru_fwd(w_h, b_h, x_proj, h0, valid, mask, dtype, unroll, transposed, loop_factors):
    outputs, (hs, saved) = _gru_forward(w_h, b_h, x_proj, h0, valid, mask, dtype, unroll, transposed, loop_factors,
                                        True)
    return outputs, (w_h, h0, valid, mask, hs, saved)


def _fused_gru_bwd(dtype, unroll, transposed, loop_factors, residuals, cotangents):
    w_h, h0, valid, mask, hs, saved = residuals
    dh_t, dys = cotangents
    h_prev = _previous(h0, hs)
    if not isinstance(saved, tuple):  # gates and u_n: the factors in one pass over all steps
        saved = _gru_backward_factors(*jnp.split(saved, 4, axis=-1), h_prev)
    coef_u, d_n, z = saved
    w_t = w_h.T
    tile = lambda dh: dh[..., None, :]
    flat = lambda a: a.reshape(a.shape[:-2] + (-1,))

    def step(dh_next, xs):
        dy, coef_t, z_t, v = xs
        dh = dy + dh_next
        du = flat(coef_t * tile(dh))
        back = matmul(du, w_t, dtype, du.dtype)
        dh_prev = dh * z_t + (back if mask is None else back * mask)
        if v is not None:  # a step past the end: no gate gradients, the carry's passes through
            return jnp.where(v, dh_prev, dh), jnp.where(v, dh, jnp.zeros_like(dh))
        return dh_prev, dh

    dh0, dhs = jax.lax.scan(step, dh_t, (dys, coef_u, z, valid), reverse=True, unroll=unroll)
    dus = flat(coef_u * tile(dhs))
    dw_h = weight_gradient(h_prev if mask is None else h_prev * mask, dus, dtype, w_h.dtype)
    dxs = jnp.concatenate([dus[..., : 2 * dhs.shape[-1]], d_n * dhs], axis=-1)
    return dw_h, dus.sum(axis=(0, 1)), dxs, dh0, _zero(valid), _zero(mask)


_fused_gru.defvjp(_fused_gru_fwd, _fused_gru_bwd)


# --- plain RNN ----------------------------------------------------------------------------------

def fused_rnn(w_h: Array, x_proj: Array, h0: Array, activation: str = "tanh", dtype: Any = None, unroll: int = 1,
              *, seq_lengths: Array | None = None, recurrent_mask: Array | None = None):
    """Elman RNN over ``x_proj`` ``(T, N, H)`` (input projection plus bias); ``activation`` tanh or
    relu; ``seq_lengths`` and ``recurrent_mask`` as in the module docstring."""
    valid, mask = _valid(seq_lengths, x_proj), _constant(recurrent_mask)
    return _fused_rnn(w_h, x_proj, h0, valid, mask, activation, dtype, unroll)


def _rnn_forward(w_h, x_proj, h0, valid, mask, activation, dtype, unroll):
    act, out = ACTIVATIONS[activation], x_proj.dtype

    def step(h, xs):
        xp, v = xs
        h_new = act(xp + matmul(h if mask is None else h * mask, w_h, dtype, out))
        if v is not None:  # past a sequence's end its carry stays
            h_new = jnp.where(v, h_new, h)
        return h_new, h_new

    h, hs = jax.lax.scan(step, h0, (x_proj, valid), unroll=unroll)
    return (h, hs), hs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_rnn(w_h, x_proj, h0, valid, mask, activation, dtype, unroll):
    return _rnn_forward(w_h, x_proj, h0, valid, mask, activation, dtype, unroll)[0]


def _fused_rnn_fwd(w_h, x_proj, h0, valid, mask, activation, dtype, unroll):
    outputs, hs = _rnn_forward(w_h, x_proj, h0, valid, mask, activation, dtype, unroll)
    return outputs, (w_h, h0, valid, mask, hs)


def _fused_rnn_bwd(activation, dtype, unroll, residuals, cotangents):
    w_h, h0, valid, mask, hs = residuals
    dh_t, dys = cotangents
    slope = 1.0 - hs * hs if activation == "tanh" else (hs > 0).astype(hs.dtype)  # activation'(a)
    w_t = w_h.T

    def step(dh_next, xs):
        dy, slope_t, v = xs
        dh = dy + dh_next
        da = dh * slope_t
        if v is not None:  # a step past the end: no gate gradients, the carry's passes through
            da = jnp.where(v, da, jnp.zeros_like(da))
        dh_prev = matmul(da, w_t, dtype, da.dtype)
        if mask is not None:
            dh_prev = dh_prev * mask
        if v is not None:
            dh_prev = jnp.where(v, dh_prev, dh)
        return dh_prev, da

    dh0, das = jax.lax.scan(step, dh_t, (dys, slope, valid), reverse=True, unroll=unroll)
    h_prev = _previous(h0, hs)
    dw_h = weight_gradient(h_prev if mask is None else h_prev * mask, das, dtype, w_h.dtype)
    return dw_h, das, dh0, _zero(valid), _zero(mask)


_fused_rnn.defvjp(_fused_rnn_fwd, _fused_rnn_bwd)
