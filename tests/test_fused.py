"""The fused (custom-VJP) LSTM, GRU and RNN layers against the plain autodiff scan: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConfigError, GRUCell, LSTMCell, RecurrentStack, RNNCell, scan_cell
from lstm_jax.kernels import fused

KEY = jax.random.key(0)


def _perturbed(cell, input_size):
    params = cell.init(KEY, input_size)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("cell", [LSTMCell(16), GRUCell(16), LSTMCell(16, token_inputs=True), RNNCell(16),
                                  RNNCell(16, activation="relu"), LSTMCell(128), GRUCell(128)],
                         ids=["lstm", "gru", "lstm_tokens", "rnn_tanh", "rnn_relu", "lstm_128", "gru_128"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.gpu
def test_fused_matches_scan_values_and_gradients(cell, reverse):
    input_size = 11
    params = _perturbed(cell, input_size)
    batch = (8, 8) if cell.hidden_size == 128 else (3, 2)  # extra batch dim; 64 x H=128: transposed carry on CPU
    if cell.token_inputs:
        x = jax.random.randint(KEY, (*batch, 9), 0, input_size)
    else:
        x = jax.random.normal(KEY, (*batch, 9, input_size))
    carry0 = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.key(3), a.shape), cell.initial_carry(batch))

    def loss(params, carry0, impl):
        carry, ys = scan_cell(cell, params, x, initial_carry=carry0, reverse=reverse, impl=impl)
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

    for impl_fn in (lambda f: f, jax.jit):
        (v_f, g_f) = impl_fn(jax.value_and_grad(lambda p, c: loss(p, c, "fused"), argnums=(0, 1)))(params, carry0)
        (v_s, g_s) = impl_fn(jax.value_and_grad(lambda p, c: loss(p, c, "scan"), argnums=(0, 1)))(params, carry0)
        np.testing.assert_allclose(v_f, v_s, rtol=1e-5, atol=1e-5)
        jax.tree.map(_close_to_float32_rounding, g_f, g_s)


def _close_to_float32_rounding(actual, desired):
    """Within 1e-5 of the reference, relative to the array's largest entry (sums over H=128 terms
    in another order differ by more than 1e-5 relative to an entry that is itself a small sum)."""
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kind, gates", [("lstm", 4), ("gru", 3)])
def test_transposed_carry_gives_the_same_numbers_and_is_used_when_chosen(kind, gates, monkeypatch):
    """The CPU layout of the forward loop (carry held as ``h.T``) against the row-major one, and
    the layer's program following ``LSTM_JAX_LAYOUT`` (the choice ``lstm_jax.dispatch`` makes)."""
    n, hidden, steps = 64, 128, 7
    keys = jax.random.split(KEY, 4)
    w_h = 0.1 * jax.random.normal(keys[0], (hidden, gates * hidden))
    x_proj = jax.random.normal(keys[1], (steps, n, gates * hidden))
    h0 = jax.random.normal(keys[2], (n, hidden))
    if kind == "lstm":
        run = lambda t: fused._lstm_scan(w_h, x_proj, h0, jnp.cos(h0), dtype=None, unroll=1, saves="factors",
                                         transposed=t)
    else:
        b_h = jax.random.normal(keys[3], (gates * hidden,))
        run = lambda t: fused._gru_scan(w_h, b_h, x_proj, h0, dtype=None, unroll=1, saves="factors", transposed=t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), run(True), run(False))
    cell = LSTMCell(hidden) if kind == "lstm" else GRUCell(hidden)
    params, x = cell.init(KEY, 3), jax.random.normal(KEY, (n, steps, 3))
    outputs = {}
    for layout in ("transposed", "row-major"):
        monkeypatch.setenv("LSTM_JAX_LAYOUT", layout)
        f = jax.jit(lambda p, x: scan_cell(cell, p, x, impl="fused")[1])
        hlo = f.lower(params, x).as_text()
        assert ("contracting_dims = [0] x [0]" in hlo) == (layout == "transposed" and jax.default_backend() == "cpu")
        outputs[layout] = f(params, x)
    np.testing.assert_allclose(outputs["transposed"], outputs["row-major"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fused_stack_matches_scan_stack_under_vmap():
    stack = RecurrentStack(LSTMCell(8), num_layers=2, bidirectional=True)
    params = stack.init(KEY, 4)
    x = jax.random.normal(KEY, (5, 3, 7, 4))
    run = lambda impl: jax.vmap(lambda xi: stack.apply(params, xi, impl=impl)[1])(x)
    np.testing.assert_allclose(run("fused"), run("scan"), atol=1e-6)


@pytest.mark.gpu
def test_fused_bf16_is_close_to_f32_scan():
    cell = LSTMCell(32, dtype=jnp.bfloat16)
    params = cell.init(KEY, 8)
    x = jax.random.normal(KEY, (4, 20, 8))
    g = lambda c, impl: jax.grad(lambda p: jnp.sum(scan_cell(c, p, x, impl=impl)[1] ** 2))(params)
    g_bf16 = g(cell, "fused")
    g_f32 = g(LSTMCell(32), "scan")
    for a, b in zip(jax.tree.leaves(g_bf16), jax.tree.leaves(g_f32)):
        assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(b).max()) + 1e-3


def test_fused_rejects_what_it_does_not_support():
    with pytest.raises(ConfigError, match="impl='fused' supports"):
        scan_cell(GRUCell(4, reset_after=False), GRUCell(4, reset_after=False).init(KEY, 3), jnp.ones((2, 5, 3)),
                  impl="fused")
    with pytest.raises(ConfigError, match="impl='fused' supports"):
        scan_cell(LSTMCell(4), LSTMCell(4).init(KEY, 3), jnp.ones((2, 5, 3)), impl="fused",
                  seq_lengths=jnp.array([5, 3]))
    with pytest.raises(ConfigError, match="impl must be"):
        scan_cell(LSTMCell(4), LSTMCell(4).init(KEY, 3), jnp.ones((2, 5, 3)), impl="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", [LSTMCell(8), GRUCell(8), RNNCell(8)], ids=lambda c: c.name)
@pytest.mark.parametrize("unroll", [4, 16])
def test_unrolled_fused_layers_equal_the_scan(cell, unroll):
    """``unroll``, the accelerator lever benchmarks/speed.py --set device measures, changes no number."""
    params = cell.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 7, 3))  # 7 steps: not a multiple of the unroll
    loss = lambda p, impl, u: jnp.sum(scan_cell(cell, p, x, impl=impl, unroll=u)[1] ** 2)
    want, g_want = jax.value_and_grad(loss)(params, "scan", 1)
    got, g_got = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(params, "fused", unroll)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for w, g in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
