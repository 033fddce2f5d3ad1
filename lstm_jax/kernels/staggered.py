"""Two stacked LSTM layers in one ``lax.scan``, the second a step behind the first.

``staggered_lstm2(w_h1, w_x2, b2, w_h2, x_proj1, carry1, carry2, dtype, unroll)`` runs layer 1 at
step ``t`` and layer 2 at step ``t - 1`` in the same scan step: layer 2's input ``h1_{t-1}`` is
already in the carry, so the two layers' products do not wait on each other and the loop has
``T + 1`` sequential steps instead of ``2T`` (cuDNN schedules stacked layers the same way). Per
step::

    z1 = x_proj1[t] + h1_{t-1} @ W_h1              # layer 1, step t      (idle at t = T)
    z2 = h1_{t-1} @ W_x2 + b2 + h2_{t-2} @ W_h2    # layer 2, step t - 1  (idle at t = 0)

with ``h1_{t-1} @ [W_h1 | W_x2]`` as one product. Gates ``i, f, g, o`` as ``LSTMCell``. The
gradient is JAX's own through the scan (as the ``'scan'`` route). A lever for accelerators,
measured by ``benchmarks/speed.py --set device``; no dispatch rule takes it yet.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.core.cells import LSTMCarry
from lstm_jax.core.products import matmul

__all__ = ["staggered_lstm2"]

Array = jax.Array


def _gates(z: Array, c: Array) -> tuple[Array, Array]:
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def staggered_lstm2(w_h1: Array, w_x2: Array, b2: Array, w_h2: Array, x_proj1: Array, carry1: LSTMCarry,
                    carry2: LSTMCarry, dtype: Any = None, unroll: int = 1
                    ) -> tuple[LSTMCarry, LSTMCarry, Array, Array]:
    """Layers 1 and 2 of an LSTM stack over ``x_proj1`` ``(T, N, 4H)`` (layer 1's projected inputs,
    bias included); ``w_h1 (H, 4H)``, ``w_x2 (H, 4H)``, ``b2 (4H,)``, ``w_h2 (H, 4H)``; carries
    ``(N, H)``. Returns ``(carry1, carry2, ys1, ys2)``, outputs ``(T, N, H)`` per layer.
    ``dtype``: the products' compute dtype (None: the params')."""
    steps, hidden = x_proj1.shape[0], w_h1.shape[0]
    out = b2.dtype
    w_1 = jnp.concatenate([w_h1, w_x2], axis=1)  # h1 feeds layer 1's recurrence and layer 2's input
    xp = jnp.concatenate([x_proj1, jnp.zeros_like(x_proj1[:1])])  # step T: layer 1 idles

    def step(carry, inputs):
        (h1, c1), (h2, c2) = carry
        xp1, t = inputs
        z = matmul(h1, w_1, dtype, out)
        z1 = xp1 + z[..., : 4 * hidden]
        z2 = z[..., 4 * hidden :] + b2 + matmul(h2, w_h2, dtype, out)
        n1, n2 = _gates(z1, c1), _gates(z2, c2)
        n1 = jax.tree.map(lambda new, old: jnp.where(t == steps, old, new), n1, (h1, c1))
        n2 = jax.tree.map(lambda new, old: jnp.where(t == 0, old, new), n2, (h2, c2))
        return (n1, n2), (n1[0], n2[0])

    init = ((carry1.h, carry1.c), (carry2.h, carry2.c))
    ((h1, c1), (h2, c2)), (ys1, ys2) = jax.lax.scan(step, init, (xp, jnp.arange(steps + 1)), unroll=unroll)
    return LSTMCarry(h=h1, c=c1), LSTMCarry(h=h2, c=c2), ys1[:steps], ys2[1:]
