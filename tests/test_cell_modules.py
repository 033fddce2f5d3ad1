"""The Flax NNX and linen modules select MGU, the leaky RNN, ConvLSTM and the LSTM options (peepholes, layer_norm)
by name: each equals the functional stack of that cell, builds the cell the options name, and round-trips its params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConvLSTMCell, LeakyRNNCell, LSTMCell, MGUCell, scan_cell

nnx = pytest.importorskip("flax.nnx")
from lstm_jax import linen as lj_linen  # noqa: E402
from lstm_jax import nnx as lj_nnx  # noqa: E402

# name -> (nnx class, linen class, cell options, the cell they build, input shape (batch, T, *spatial, C))
CASES = {
    "mgu": (lj_nnx.MGU, lj_linen.MGU, {"reset_gate": False}, MGUCell(4, reset_gate=False), (2, 5, 3)),
    "leaky_rnn": (lj_nnx.LeakyRNN, lj_linen.LeakyRNN, {"alpha": 0.3}, LeakyRNNCell(4, alpha=0.3), (2, 5, 3)),
    "peepholes": (lj_nnx.LSTM, lj_linen.LSTM, {"peepholes": True}, LSTMCell(4, peepholes=True), (2, 5, 3)),
    "layer_norm": (lj_nnx.LSTM, lj_linen.LSTM, {"layer_norm": True}, LSTMCell(4, layer_norm=True), (2, 5, 3)),
    "convlstm": (lj_nnx.ConvLSTM, lj_linen.ConvLSTM, {"kernel_size": (3, 3)}, ConvLSTMCell(4, (3, 3)),
                 (2, 5, 6, 5, 3)),
}
NAMES = pytest.mark.parametrize("name", list(CASES))


def _perturbed(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@NAMES
def test_nnx_module_is_the_named_cell_and_equals_the_functional_stack(name):
    nnx_cls, _, options, cell, shape = CASES[name]
    x = jax.random.normal(jax.random.key(1), shape)
    model = nnx_cls(3, 4, num_layers=2, rngs=nnx.Rngs(0), **options)
    assert model.stack.cell == cell and model.stack.num_layers == 2
    params = _perturbed(model.to_params())
    model = nnx_cls.from_params(model.stack, params)  # the functional params in, the same stack rebuilt
    ys = model(x)
    assert ys.shape == shape[:-1] + (4,)
    np.testing.assert_allclose(ys, model.stack.apply(params, x)[1], atol=1e-6)
    reverse = nnx_cls(3, 4, reverse=True, rngs=nnx.Rngs(0), **options)  # the time axis is found per cell
    one = reverse.to_params()[0]
    np.testing.assert_allclose(reverse(x), scan_cell(cell, one, x, reverse=True)[1], atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    g_ref = jax.grad(lambda p: jnp.sum(model.stack.apply(p, x)[1] ** 2))(params)
    np.testing.assert_allclose(grads.layers[1].recurrent_kernel[...], g_ref[1]["recurrent_kernel"], atol=1e-5)


@NAMES
def test_linen_module_is_the_named_cell_and_converts_both_ways(name):
    _, linen_cls, options, cell, shape = CASES[name]
    x = jax.random.normal(jax.random.key(1), shape)
    model = linen_cls(hidden_size=4, bidirectional=True, **options)
    assert model.stack().cell == cell
    variables = model.init(jax.random.key(0), x)
    params = model.to_params(variables)
    assert set(params[0][0]) == set(cell.init(jax.random.key(0), 3))
    ys = model.apply(variables, x)
    assert ys.shape == shape[:-1] + (8,)
    np.testing.assert_allclose(ys, model.stack().apply(params, x)[1], atol=1e-6)
    moved = _perturbed(params)
    np.testing.assert_allclose(model.apply(model.from_params(moved), x), model.stack().apply(moved, x)[1],
                               atol=1e-6)
