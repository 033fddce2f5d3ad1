"""SLSTMCell and MLSTMCell against the authors' ``xlstm`` package (PyPI, PyTorch): its pure-PyTorch
``vanilla`` sLSTM loop and its ``*_stabilized_simple`` mLSTM backends, fed our weights and inputs.
Skipped when the package is absent (``pip install --no-deps xlstm==2.0.6``: only these modules,
which need torch alone, are used)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import scan_cell
from lstm_jax.core.xlstm import MLSTMCell, SLSTMCell

torch = pytest.importorskip("torch")
vanilla = pytest.importorskip("xlstm.blocks.slstm.src.vanilla")
backends = pytest.importorskip("xlstm.blocks.mlstm.backends")

T, B, I, H = 9, 3, 5, 8


def perturbed(cell, key=0, scale=0.5):
    params = cell.init(jax.random.key(key), I)
    keys = iter(jax.random.split(jax.random.key(key + 1), len(params)))
    return {k: v + scale * jax.random.normal(next(keys), v.shape) for k, v in sorted(params.items())}


def t64(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("heads", [1, 2])
def test_slstm_equals_the_vanilla_backend(heads):
    cell = SLSTMCell(H, num_heads=heads)
    params = perturbed(cell)
    x = jax.random.normal(jax.random.key(3), (T, B, I))
    carry, ys = scan_cell(cell, params, x, time_major=True, impl="scan")
    wx = t64(x) @ t64(params["input_kernel"])  # the package computes W x outside its cell
    r = t64(params["recurrent_kernel"]).transpose(1, 2)  # (heads, 4d, d): its per-head layout
    states = torch.zeros(4, B, H, dtype=torch.float64)
    all_states, last, _ = vanilla.slstm_forward(wx, states, r, t64(params["bias"]),
                                                vanilla.slstm_pointwise_function_registry["slstm"])
    np.testing.assert_allclose(ys, all_states[0, 1:].numpy(), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(carry, last):  # h, c, n, m: the same state, stabiliser included
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5)


def _heads(a, heads):  # (T, B, heads * d) -> (B, heads, T, d)
    return a.reshape(T, B, heads, -1).permute(1, 2, 0, 3)


@pytest.mark.parametrize("heads", [1, 2])
def test_mlstm_equals_the_recurrent_backend(heads):
    cell = MLSTMCell(H, num_heads=heads)
    params = perturbed(cell)
    x = jax.random.normal(jax.random.key(3), (T, B, I))
    pre = t64(cell.input_projection(params, x))
    q, k, v, o = (_heads(pre[..., j * H : (j + 1) * H], heads) for j in range(4))
    gates = pre[..., 4 * H :].reshape(T, B, 2, heads).permute(2, 1, 3, 0)[..., None]  # (2, B, heads, T, 1)
    d = H // heads
    c, n, m = (torch.zeros(B, heads, d, d, dtype=torch.float64), torch.zeros(B, heads, d, 1, dtype=torch.float64),
               torch.zeros(B, heads, 1, 1, dtype=torch.float64))
    outs = []
    for t in range(T):
        h, (c, n, m) = backends.recurrent_step_stabilized_simple(
            c, n, m, q[:, :, t : t + 1].clone(), k[:, :, t : t + 1].clone(), v[:, :, t : t + 1].clone(),
            gates[0, :, :, t : t + 1], gates[1, :, :, t : t + 1])
        outs.append(h.reshape(B, H))
    theirs = torch.sigmoid(pre[..., 3 * H : 4 * H]) * torch.stack(outs)  # the cell's output gate on h~
    for impl in ("scan", "parallel"):
        carry, ys = scan_cell(cell, params, x, time_major=True, impl=impl)
        np.testing.assert_allclose(ys, theirs.numpy(), rtol=1e-4, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(carry.C, c.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(carry.n, n[..., 0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(carry.m, m[..., 0, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(jnp.max(jnp.abs(ys))), float(theirs.abs().max()), rel_tol=1e-4)


def test_mlstm_parallel_equals_the_parallel_backend():
    """The package's parallel form leaves the initial state out of its stabiliser; where every
    input gate is >= 0 that makes no difference (the initial state's weight is never the largest)."""
    cell = MLSTMCell(H, num_heads=2)
    params = perturbed(cell)
    params["bias"] = params["bias"].at[4 * H : 4 * H + 2].add(10.0)
    x = jax.random.normal(jax.random.key(3), (T, B, I))
    pre = t64(cell.input_projection(params, x))
    assert float(pre[..., 4 * H : 4 * H + 2].min()) >= 0
    q, k, v = (_heads(pre[..., j * H : (j + 1) * H], 2) for j in range(3))
    gates = pre[..., 4 * H :].reshape(T, B, 2, 2).permute(2, 1, 3, 0)[..., None]
    h_tilde = backends.parallel_stabilized_simple(q, k, v, gates[0], gates[1])  # (B, heads, T, d)
    theirs = torch.sigmoid(pre[..., 3 * H : 4 * H]) * h_tilde.permute(2, 0, 1, 3).reshape(T, B, H)
    _, ys = scan_cell(cell, params, x, time_major=True, impl="parallel")
    np.testing.assert_allclose(ys, theirs.numpy(), rtol=1e-4, atol=1e-5)
