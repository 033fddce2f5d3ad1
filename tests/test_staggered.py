"""The staggered two-layer LSTM scan (``lstm_jax.kernels.staggered``) equals a two-layer stack run
layer after layer by the scan: outputs, final carries and gradients, for any unroll."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import LSTMCarry, LSTMCell, RecurrentStack
from lstm_jax.kernels.staggered import staggered_lstm2

B, T, I, H = 3, 5, 4, 6


def _setup():
    stack = RecurrentStack(LSTMCell(H), num_layers=2)
    params = stack.init(jax.random.key(0), I)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    x = jax.random.normal(jax.random.key(2), (T, B, I))
    carries = [LSTMCarry(*(0.5 * jax.random.normal(jax.random.key(10 + 2 * k + j), (B, H)) for j in range(2)))
               for k in range(2)]
    return stack, params, x, carries


def _by_stack(stack, params, x, carries):
    out, ys = stack.apply(params, x, initial_carry=carries, time_major=True, impl="scan")
    return out[0], out[1], ys


def _by_staggered(params, x, carries, unroll=1):
    p1, p2 = params
    x_proj = x @ p1["input_kernel"] + p1["bias"]
    c1, c2, _, ys2 = staggered_lstm2(p1["recurrent_kernel"], p2["input_kernel"], p2["bias"], p2["recurrent_kernel"],
                                     x_proj, carries[0], carries[1], None, unroll)
    return c1, c2, ys2


@pytest.mark.gpu
@pytest.mark.parametrize("unroll", [1, 4])
def test_staggered_equals_the_stack_values_and_gradients(unroll):
    stack, params, x, carries = _setup()
    want = _by_stack(stack, params, x, carries)
    got = jax.jit(_by_staggered, static_argnums=3)(params, x, carries, unroll)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, atol=1e-5)
    probe = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape), want)
    loss = lambda run: lambda p, c: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(probe),
                                                                     jax.tree.leaves(run(p, c))))
    g_want = jax.grad(loss(lambda p, c: _by_stack(stack, p, x, c)), argnums=(0, 1))(params, carries)
    g_got = jax.grad(loss(lambda p, c: _by_staggered(p, x, c, unroll)), argnums=(0, 1))(params, carries)
    for w, g in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_layer_ones_outputs_and_a_single_step():
    stack, params, x, carries = _setup()
    p1 = params[0]
    xs = x[:1]
    c1, c2, ys1, ys2 = staggered_lstm2(p1["recurrent_kernel"], params[1]["input_kernel"], params[1]["bias"],
                                       params[1]["recurrent_kernel"], xs @ p1["input_kernel"] + p1["bias"],
                                       carries[0], carries[1])
    one = RecurrentStack(LSTMCell(H), num_layers=1)
    (w1,), y1 = one.apply([p1], xs, initial_carry=[carries[0]], time_major=True, impl="scan")
    np.testing.assert_allclose(ys1, y1, atol=1e-6)
    np.testing.assert_allclose(c1.c, w1.c, atol=1e-6)
    assert ys2.shape == (1, B, H) and not np.allclose(c2.h, carries[1].h)  # layer 2 took its one step
