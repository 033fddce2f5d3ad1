"""Variational dropout (Keras's ``dropout`` and ``recurrent_dropout``): the fused and scan layers
against a per-step reference loop given the same masks, against Keras 3's own cells given the same
masks, one mask per sequence whatever the batch split, nothing at inference, bad rates refused."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConfigError, ConvLSTMCell, GRUCell, LSTMCell, RecurrentStack, RNNCell, scan_cell
from lstm_jax.layers.sequence import sequence_masks

KEY = jax.random.key(0)
CELLS = {"lstm": LSTMCell(6), "gru": GRUCell(6), "rnn": RNNCell(6)}


def _params(cell, n_in):
    params = cell.init(KEY, n_in)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _masks(key, batch, n_in, width, rate, rec_rate):
    """The masks scan_cell draws, scaled: input from fold_in(key, 0), recurrent from fold_in(key, 1)."""
    m_x = sequence_masks(key, 1.0 - rate, batch, n_in, salt=0) / (1.0 - rate)
    m_h = sequence_masks(key, 1.0 - rec_rate, batch, width, salt=1) / (1.0 - rec_rate)
    return m_x, m_h


def _reference(cell, params, x, m_x, m_h, lengths=None):
    """One step at a time in Python: inputs times m_x, the state entering the product times m_h."""
    carry, ys = cell.initial_carry(x.shape[:1]), []
    for t in range(x.shape[1]):
        new, y = cell.step(params, carry, cell.input_projection(params, x[:, t] * m_x), recurrent_mask=m_h)
        if lengths is not None:
            valid = (t < lengths)[:, None]
            new = jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, carry)
            y = jnp.where(valid, y, 0.0)
        carry = new
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_fused_and_scan_equal_a_per_step_loop_given_the_same_masks(name, with_lengths):
    cell, batch, steps, n_in = CELLS[name], 4, 7, 5
    params = _params(cell, n_in)
    x = jax.random.normal(jax.random.key(1), (batch, steps, n_in))
    lengths = jnp.array([7, 3, 0, 5]) if with_lengths else None
    key = jax.random.split(jax.random.key(2), batch)  # one key per sequence
    m_x, m_h = _masks(key, (batch,), n_in, 6, 0.3, 0.4)
    assert 0 < float((m_h == 0).mean()) < 1 and 0 < float((m_x == 0).mean()) < 1

    def loss(run):
        def f(p, x):
            carry, ys = run(p, x)
            w = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
            return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))
        return jax.value_and_grad(f, argnums=(0, 1))(params, x)

    v_ref, g_ref = loss(lambda p, x: _reference(cell, p, x, m_x, m_h, lengths))
    for impl in ("fused", "scan"):
        run = lambda p, x: scan_cell(cell, p, x, seq_lengths=lengths, dropout=0.3, recurrent_dropout=0.4,
                                     dropout_key=key, impl=impl)
        v, g = loss(run)
        np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)
    # the mask matters: without it the numbers differ
    v_plain, _ = loss(lambda p, x: scan_cell(cell, p, x, seq_lengths=lengths, impl="fused"))
    assert abs(float(v_plain) - float(v_ref)) > 1e-3


def test_masks_are_per_sequence_so_a_split_batch_draws_the_same():
    """Keys per sequence: the first half of a batch gets the masks it gets alone (as on 2 devices)."""
    stack = RecurrentStack(LSTMCell(6), num_layers=2, bidirectional=True, dropout=0.2, input_dropout=0.3,
                           recurrent_dropout=0.4)
    params = stack.init(KEY, 5)
    x = jax.random.normal(jax.random.key(1), (4, 7, 5))
    keys = jax.random.split(jax.random.key(2), 4)
    whole = stack.apply(params, x, dropout_key=keys)[1]
    half = stack.apply(params, x[:2], dropout_key=keys[:2])[1]
    np.testing.assert_allclose(half, whole[:2], rtol=1e-6, atol=1e-6)
    inference = stack.apply(params, x)[1]
    assert float(jnp.abs(whole - inference).max()) > 1e-2  # dropout acted while training
    plain = RecurrentStack(LSTMCell(6), num_layers=2, bidirectional=True)
    np.testing.assert_array_equal(inference, plain.apply(params, x)[1])  # nothing at inference


def test_convlstm_stack_takes_keys_per_sequence_between_its_layers():
    """A ConvLSTM stack's dropout between layers with one key per sequence: a mask per example over
    its spatial axes and channels, so the first half of a batch gets the masks it gets alone."""
    stack = RecurrentStack(ConvLSTMCell(3, (3, 3)), num_layers=2, dropout=0.5)
    params = stack.init(KEY, 2)
    x = jax.random.normal(jax.random.key(1), (4, 3, 5, 5, 2))  # (batch, T, H, W, C)
    keys = jax.random.split(jax.random.key(2), 4)
    whole = stack.apply(params, x, dropout_key=keys)[1]
    half = stack.apply(params, x[:2], dropout_key=keys[:2])[1]
    np.testing.assert_allclose(half, whole[:2], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(whole - stack.apply(params, x)[1]).max()) > 1e-2  # dropout acted while training
    with pytest.raises(ConfigError, match="one key per sequence"):
        stack.apply(params, x, dropout_key=keys[:3])


def test_input_dropout_on_an_embedding_drops_its_features_and_token_ids_without_one_are_refused():
    cell = LSTMCell(6, token_inputs=True)
    table = jax.random.normal(jax.random.key(3), (11, 4))
    params = {**LSTMCell(6).init(KEY, 4), "embedding": table}
    ids = jax.random.randint(KEY, (3, 5), 0, 11)
    key = jax.random.split(jax.random.key(2), 3)
    got = scan_cell(cell, params, ids, dropout=0.5, dropout_key=key)[1]
    m_x = sequence_masks(key, 0.5, (3,), 4, salt=0) / 0.5
    want = scan_cell(LSTMCell(6), LSTMCell(6).init(KEY, 4), table[ids] * m_x[:, None], impl="scan")[1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="dropout on a token-input LSTMCell needs an 'embedding'"):
        scan_cell(cell, cell.init(KEY, 11), ids, dropout=0.5, dropout_key=key)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.2"])
def test_rates_outside_0_1_are_refused_in_one_sentence(bad):
    cell = LSTMCell(4)
    with pytest.raises(ConfigError, match=r"scan_cell: recurrent_dropout must be a number in \[0, 1\)"):
        scan_cell(cell, cell.init(KEY, 3), jnp.ones((2, 5, 3)), recurrent_dropout=bad)
    with pytest.raises(ConfigError, match=r"scan_cell: dropout must be a number in \[0, 1\)"):
        scan_cell(cell, cell.init(KEY, 3), jnp.ones((2, 5, 3)), dropout=bad)
    with pytest.raises(ConfigError, match=r"RecurrentStack: recurrent_dropout must be a number in \[0, 1\)"):
        RecurrentStack(cell, recurrent_dropout=bad)


def test_recurrent_dropout_keeps_the_fused_layer_and_never_takes_onednn():
    from lstm_jax.dispatch import plan

    shape = dict(steps=100, rows=64, features=512)
    assert plan.plan_layer(LSTMCell(256), recurrent_dropout=True, **shape).impl == "fused"
    with pytest.raises(ConfigError, match="impl='onednn' supports .* got LSTMCell with recurrent_dropout"):
        plan.plan_layer(LSTMCell(256), impl="onednn", recurrent_dropout=True, **shape)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_equals_keras_cells_given_the_same_masks(kind):
    """Keras 3's own cells (JAX backend) stepped with ``training=True`` and their cached dropout
    masks set to ours (the same mask for every gate): the same outputs. This pins where the masks
    act, e.g. the GRU's ``z * h`` term sees the unmasked state."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("keras is imported with another backend")
    batch, steps, n_in, units = 3, 5, 4, 6
    layer = {"lstm": keras.layers.LSTMCell, "gru": keras.layers.GRUCell, "simple_rnn": keras.layers.SimpleRNNCell}
    k_cell = layer[kind](units, dropout=0.3, recurrent_dropout=0.4)
    k_cell.build((batch, n_in))
    rng = np.random.default_rng(0)
    for w in k_cell.weights:
        w.assign(0.5 * rng.standard_normal(w.shape).astype(np.float32))
    kernel, rec, bias = (np.asarray(w) for w in k_cell.weights)
    if kind == "gru":  # Keras: gates z, r, h and bias (2, 3H) with reset_after; ours r, z, n
        order = lambda a: np.concatenate([a[..., units:2 * units], a[..., :units], a[..., 2 * units:]], -1)
        cell = GRUCell(units)
        params = {"input_kernel": order(kernel), "recurrent_kernel": order(rec), "bias": order(bias[0]),
                  "recurrent_bias": order(bias[1])}
    else:
        cell = LSTMCell(units) if kind == "lstm" else RNNCell(units)
        params = {"input_kernel": kernel, "recurrent_kernel": rec, "bias": bias}
    params = jax.tree.map(jnp.asarray, params)
    x = rng.standard_normal((batch, steps, n_in)).astype(np.float32)
    key = jax.random.split(jax.random.key(5), batch)
    m_x, m_h = _masks(key, (batch,), n_in, units, 0.3, 0.4)
    gates = {"lstm": 4, "gru": 3, "simple_rnn": None}[kind]
    k_cell._dropout_mask = [m_x] * gates if gates else m_x
    k_cell._recurrent_dropout_mask = [m_h] * gates if gates else m_h
    state = [np.zeros((batch, units), np.float32)] * (2 if kind == "lstm" else 1)
    ys = []
    for t in range(steps):
        y, state = k_cell(x[:, t], state, training=True)
        ys.append(np.asarray(y))
    ours = scan_cell(cell, params, x, dropout=0.3, recurrent_dropout=0.4, dropout_key=key, impl="fused")[1]
    np.testing.assert_allclose(ours, np.stack(ys, axis=1), rtol=1e-5, atol=1e-5)


def test_flax_modules_take_the_variational_dropout_and_proj_size():
    """NNX and linen modules: recurrent/input dropout acts in training mode only (eval equals the
    functional stack), ``proj_size`` reaches the LSTM, and a PyTorch LSTMP converts to an NNX module."""
    nnx = pytest.importorskip("flax.nnx")
    from lstm_jax import linen as lj_linen
    from lstm_jax import nnx as lj_nnx

    x = jax.random.normal(jax.random.key(1), (3, 6, 5))
    module = lj_nnx.LSTM(5, 8, proj_size=3, input_dropout=0.2, recurrent_dropout=0.4, rngs=nnx.Rngs(0))
    train = module(x)
    assert train.shape == (3, 6, 3)
    module.eval()
    np.testing.assert_allclose(module(x), module.stack.apply(module.to_params(), x)[1], atol=1e-6)
    assert not np.allclose(module(x), train)
    model = lj_linen.LSTM(hidden_size=8, proj_size=3, recurrent_dropout=0.4)
    variables = model.init(jax.random.key(0), x)
    ys = model.apply(variables, x)
    np.testing.assert_allclose(ys, model.stack().apply(model.to_params(variables), x)[1], atol=1e-6)
    dropped = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert ys.shape == (3, 6, 3) and not np.allclose(dropped, ys)
    torch = pytest.importorskip("torch")
    from lstm_jax import from_torch

    layer = torch.nn.LSTM(5, 6, proj_size=2, num_layers=2, batch_first=True)
    converted = lj_nnx.from_params(*from_torch(layer.state_dict()))
    expected, _ = layer(torch.from_numpy(np.array(x)))
    np.testing.assert_allclose(converted(x), expected.detach().numpy(), atol=1e-5)
