"""Fused recurrent layers with a hand-written backward pass (``jax.custom_vjp``), as cuDNN does it.

Automatic differentiation of ``lax.scan`` accumulates the recurrent-kernel gradient inside the
backward loop: two small matmuls per step (``dz @ W_h.T`` and ``h.T @ dz``). Here the backward
scan runs only the ``dh`` recursion (one matmul per step) and saves each step's gate
pre-activation gradients ``dz``; the recurrent-kernel gradient is then one large matmul over all
steps (``H_prev.T @ dZ``), and the input-kernel and bias gradients follow by autodiff of the
hoisted input projection. Same numbers as the plain scan (to float32 rounding), fewer and larger
matmuls.

``fused_lstm(w_h, x_proj, h0, c0, dtype, unroll)`` and ``fused_gru(w_h, b_h, x_proj, h0, dtype, unroll)`` take the
hoisted input projection ``x_proj`` of shape ``(T, N, G*H)`` and return ``(h_T, c_T, ys)`` /
``(h_T, ys)``. ``scan_cell`` uses them when ``impl='fused'`` (or ``'auto'``) applies.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.cells import matmul

__all__ = ["fused_lstm", "fused_gru"]

Array = jax.Array


# --- LSTM ---------------------------------------------------------------------------------------

def _lstm_forward(w_h, x_proj, h0, c0, dtype, unroll):
    out = x_proj.dtype

    def step(carry, xp):
        h, c = carry
        z = xp + matmul(h, w_h, dtype, out)
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), (h, c, jnp.concatenate([i, f, g, o], axis=-1))

    (h, c), (hs, cs, gates) = jax.lax.scan(step, (h0, c0), x_proj, unroll=unroll)
    return (h, c, hs), (hs, cs, gates)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_lstm(w_h: Array, x_proj: Array, h0: Array, c0: Array, dtype: Any = None, unroll: int = 1):
    """LSTM over ``x_proj`` ``(T, N, 4H)`` (input projection plus bias, gates i, f, g, o)."""
    return _lstm_forward(w_h, x_proj, h0, c0, dtype, unroll)[0]


def _fused_lstm_fwd(w_h, x_proj, h0, c0, dtype, unroll):
    outputs, (hs, cs, gates) = _lstm_forward(w_h, x_proj, h0, c0, dtype, unroll)
    return outputs, (w_h, h0, c0, hs, cs, gates)


def _fused_lstm_bwd(dtype, unroll, residuals, cotangents):
    w_h, h0, c0, hs, cs, gates = residuals
    dh_t, dc_t, dys = cotangents
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    w_t = w_h.T

    def step(carry, xs):
        dh_next, dc_next = carry
        dy, gate, c, cp = xs
        i, f, g, o = jnp.split(gate, 4, axis=-1)
        dh = dy + dh_next
        tc = jnp.tanh(c)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate([dc * g * i * (1.0 - i), dc * cp * f * (1.0 - f),
                              dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], axis=-1)
        return (matmul(dz, w_t, dtype, dz.dtype), dc * f), dz

    (dh0, dc0), dzs = jax.lax.scan(step, (dh_t, dc_t), (dys, gates, cs, c_prev), reverse=True, unroll=unroll)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    dw_h = _weight_grad(h_prev, dzs, dtype, w_h.dtype)
    return dw_h, dzs, dh0, dc0


fused_lstm.defvjp(_fused_lstm_fwd, _fused_lstm_bwd)


def _weight_grad(h_prev: Array, dz: Array, dtype: Any, out_dtype: Any) -> Array:
    """``sum_t h_prev[t].T @ dz[t]`` as one matmul over all steps and sequences."""
    hidden, gates = h_prev.shape[-1], dz.shape[-1]
    return matmul(h_prev.reshape(-1, hidden).T, dz.reshape(-1, gates), dtype, out_dtype)


# --- GRU (reset gate after the recurrent product, as PyTorch and cuDNN) --------------------------

def _gru_forward(w_h, b_h, x_proj, h0, dtype, unroll):
    out = x_proj.dtype

    def step(h, xp):
        u = matmul(h, w_h, dtype, out) + b_h
        a_r, a_z, a_n = jnp.split(xp, 3, axis=-1)
        u_r, u_z, u_n = jnp.split(u, 3, axis=-1)
        r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
        n = jnp.tanh(a_n + r * u_n)
        h_new = (1.0 - z) * n + z * h
        return h_new, (h_new, jnp.concatenate([r, z, n, u_n], axis=-1))

    h, (hs, saved) = jax.lax.scan(step, h0, x_proj, unroll=unroll)
    return (h, hs), (hs, saved)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_gru(w_h: Array, b_h: Array, x_proj: Array, h0: Array, dtype: Any = None, unroll: int = 1):
    """GRU over ``x_proj`` ``(T, N, 3H)`` (gates r, z, n; recurrent bias ``b_h``)."""
    return _gru_forward(w_h, b_h, x_proj, h0, dtype, unroll)[0]


def _fused_gru_fwd(w_h, b_h, x_proj, h0, dtype, unroll):
    outputs, (hs, saved) = _gru_forward(w_h, b_h, x_proj, h0, dtype, unroll)
    return outputs, (w_h, h0, hs, saved)


def _fused_gru_bwd(dtype, unroll, residuals, cotangents):
    w_h, h0, hs, saved = residuals
    dh_t, dys = cotangents
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    w_t = w_h.T

    def step(dh_next, xs):
        dy, gate, hp = xs
        r, z, n, u_n = jnp.split(gate, 4, axis=-1)
        dh = dy + dh_next
        da_n = dh * (1.0 - z) * (1.0 - n * n)
        da_r = da_n * u_n * r * (1.0 - r)
        da_z = dh * (hp - n) * z * (1.0 - z)
        du = jnp.concatenate([da_r, da_z, da_n * r], axis=-1)
        return dh * z + matmul(du, w_t, dtype, du.dtype), (jnp.concatenate([da_r, da_z, da_n], axis=-1), du)

    dh0, (dx, dus) = jax.lax.scan(step, dh_t, (dys, saved, h_prev), reverse=True, unroll=unroll)
    dw_h = _weight_grad(h_prev, dus, dtype, w_h.dtype)
    return dw_h, dus.sum(axis=(0, 1)), dx, dh0


fused_gru.defvjp(_fused_gru_fwd, _fused_gru_bwd)
