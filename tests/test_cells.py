"""Cells and sequences: hand-computed steps, scan vs Python loop, seq_lengths, jit/grad/vmap, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lstm_jax import (
    ConfigError,
    GRUCell,
    LSTMCarry,
    LSTMCell,
    RecurrentStack,
    RNNCell,
    make_cell,
    scan_cell,
)

jax.config.update("jax_enable_x64", False)
KEY = jax.random.key(0)
CELLS = [LSTMCell(6), GRUCell(6), GRUCell(6, reset_after=False), RNNCell(6), RNNCell(6, activation="relu")]
IDS = ["lstm", "gru", "gru_cho", "rnn", "rnn_relu"]


def _random_params(cell, input_size, key=KEY, scale=0.5):
    """Init, then perturb every leaf so biases are non-zero and all gates matter."""
    params = cell.init(key, input_size)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_lstm_step_matches_hand_computed_numpy():
    cell = LSTMCell(3)
    p = _random_params(cell, 2)
    x = np.array([[0.5, -1.0]], np.float32)
    h0, c0 = np.array([[0.1, -0.2, 0.3]], np.float32), np.array([[0.0, 0.5, -0.5]], np.float32)
    wi, wh, b = (np.asarray(p[k]) for k in ("input_kernel", "recurrent_kernel", "bias"))
    z = x @ wi + h0 @ wh + b
    i, f, g, o = np.split(z, 4, axis=-1)
    c = _sigmoid(f) * c0 + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    carry, y = cell.apply(p, LSTMCarry(jnp.asarray(h0), jnp.asarray(c0)), jnp.asarray(x))
    np.testing.assert_allclose(carry.c, c, atol=1e-6)
    np.testing.assert_allclose(y, h, atol=1e-6)


def test_gru_cho_step_matches_hand_computed_numpy():
    cell = GRUCell(3, reset_after=False)
    p = _random_params(cell, 2)
    x, h0 = np.array([0.5, -1.0], np.float32), np.array([0.1, -0.2, 0.3], np.float32)
    wi, wh, b = (np.asarray(p[k]) for k in ("input_kernel", "recurrent_kernel", "bias"))
    a = x @ wi + b
    r = _sigmoid(a[:3] + h0 @ wh[:, :3])
    z = _sigmoid(a[3:6] + h0 @ wh[:, 3:6])
    n = np.tanh(a[6:] + (r * h0) @ wh[:, 6:])
    _, y = cell.apply(p, jnp.asarray(h0), jnp.asarray(x))
    np.testing.assert_allclose(y, (1 - z) * n + z * h0, atol=1e-6)


def test_lstm_default_init_is_keras():
    p = LSTMCell(4).init(KEY, 3)
    np.testing.assert_array_equal(p["bias"], [0] * 4 + [1] * 4 + [0] * 8)
    w = np.asarray(p["recurrent_kernel"])  # (4, 16): orthogonal rows
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-5)
    limit = np.sqrt(6 / (3 + 16))
    assert np.abs(p["input_kernel"]).max() <= limit


def test_initialisers_are_overridable():
    cell = LSTMCell(4, kernel_init=jax.nn.initializers.ones, forget_bias=0.0,
                    recurrent_kernel_init=jax.nn.initializers.zeros)
    p = cell.init(KEY, 2)
    assert float(p["input_kernel"].min()) == 1.0 and float(jnp.abs(p["recurrent_kernel"]).max()) == 0.0
    assert float(jnp.abs(p["bias"]).max()) == 0.0


@pytest.mark.parametrize("cell", CELLS, ids=IDS)
def test_scan_equals_python_loop(cell):
    p = _random_params(cell, 5)
    x = jax.random.normal(KEY, (3, 7, 5))
    carry, ys = scan_cell(cell, p, x)
    ref_carry, ref = cell.initial_carry((3,)), []
    for t in range(7):
        ref_carry, y = cell.apply(p, ref_carry, x[:, t])
        ref.append(y)
    np.testing.assert_allclose(ys, jnp.stack(ref, 1), atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), carry, ref_carry)


@pytest.mark.parametrize("cell", CELLS, ids=IDS)
def test_reverse_equals_flipped_forward(cell):
    p = _random_params(cell, 5)
    x = jax.random.normal(KEY, (2, 6, 5))
    carry, ys = scan_cell(cell, p, x, reverse=True)
    ref_carry, ref = scan_cell(cell, p, x[:, ::-1])
    np.testing.assert_allclose(ys, ref[:, ::-1], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), carry, ref_carry)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS, ids=IDS)
def test_seq_lengths_match_unpadded_runs_and_padding_is_invisible(cell, reverse):
    p = _random_params(cell, 4)
    lengths = [5, 2, 7]
    x = jax.random.normal(KEY, (3, 7, 4))
    carry, ys = scan_cell(cell, p, x, seq_lengths=jnp.array(lengths), reverse=reverse)
    for b, n in enumerate(lengths):
        c_b, y_b = scan_cell(cell, p, x[b, :n], reverse=reverse)
        np.testing.assert_allclose(ys[b, :n], y_b, atol=1e-6)
        assert float(jnp.abs(ys[b, n:]).max(initial=0.0)) == 0.0
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a[b], r, atol=1e-6), carry, c_b)
    # Appending more padding (of any value) changes no valid output and no final carry.
    x_more = jnp.concatenate([x, 100.0 * jnp.ones((3, 4, 4))], axis=1)
    carry2, ys2 = scan_cell(cell, p, x_more, seq_lengths=jnp.array(lengths), reverse=reverse)
    np.testing.assert_allclose(ys2[:, :7], ys, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), carry2, carry)


def test_time_major_and_unbatched_and_extra_batch_dims():
    cell = LSTMCell(4)
    p = _random_params(cell, 3)
    x = jax.random.normal(KEY, (2, 5, 6, 3))  # batch (2, 5), T=6
    _, ys = scan_cell(cell, p, x)
    _, ys_tm = scan_cell(cell, p, jnp.moveaxis(x, 2, 0), time_major=True)
    np.testing.assert_allclose(ys, jnp.moveaxis(ys_tm, 0, 2), atol=1e-6)
    _, y_single = scan_cell(cell, p, x[1, 3])
    np.testing.assert_allclose(ys[1, 3], y_single, atol=1e-6)


def test_vmap_over_apply_and_scan_matches_batched():
    cell = GRUCell(4)
    p = _random_params(cell, 3)
    x = jax.random.normal(KEY, (5, 8, 3))
    _, batched = scan_cell(cell, p, x)
    _, vmapped = jax.vmap(lambda xi: scan_cell(cell, p, xi))(x)
    np.testing.assert_allclose(batched, vmapped, atol=1e-6)
    step = jax.vmap(cell.apply, in_axes=(None, 0, 0))
    c, y = step(p, cell.initial_carry((5,)), x[:, 0])
    np.testing.assert_allclose(y, batched[:, 0], atol=1e-6)


def test_initial_carry_is_used():
    cell = LSTMCell(4)
    p = _random_params(cell, 3)
    x = jax.random.normal(KEY, (2, 6, 3))
    c_mid, _ = scan_cell(cell, p, x[:, :3])
    c_end, ys_second = scan_cell(cell, p, x[:, 3:], initial_carry=c_mid)
    c_full, ys = scan_cell(cell, p, x)
    np.testing.assert_allclose(ys[:, 3:], ys_second, atol=1e-6)
    np.testing.assert_allclose(c_full.c, c_end.c, atol=1e-6)


def test_token_inputs_are_a_row_gather_of_one_hot():
    cell = LSTMCell(5, token_inputs=True)
    p = _random_params(cell, 11)
    tokens = jax.random.randint(KEY, (3, 9), 0, 11)
    _, ys = scan_cell(cell, p, tokens)
    _, ref = scan_cell(dataclasses.replace(cell, token_inputs=False), p, jax.nn.one_hot(tokens, 11))
    np.testing.assert_allclose(ys, ref, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS, ids=IDS)
@pytest.mark.parametrize("remat", [False, True])
def test_gradients_match_finite_differences(cell, remat):
    lengths = jnp.array([4, 2])
    with jax.enable_x64(True):
        cell = dataclasses.replace(cell, param_dtype=jnp.float64)
        p = jax.tree.map(lambda a: a.astype(jnp.float64), _random_params(cell, 3, scale=0.3))
        x = jax.random.normal(KEY, (2, 4, 3), jnp.float64)

        def loss(params, xs):
            carry, ys = scan_cell(cell, params, xs, seq_lengths=lengths, remat=remat)
            return jnp.sum(ys ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))

        check_grads(loss, (p, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_remat_gives_identical_gradients():
    cell = LSTMCell(8)
    p = _random_params(cell, 3)
    x = jax.random.normal(KEY, (2, 10, 3))
    g = [jax.grad(lambda q: jnp.sum(scan_cell(cell, q, x, remat=r)[1] ** 2))(p) for r in (False, True)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g[0], g[1])


def test_jit_compiles_once_for_repeated_calls():
    cell = LSTMCell(8)
    p = cell.init(KEY, 3)
    traces = []

    @jax.jit
    def run(params, xs):
        traces.append(1)
        return scan_cell(cell, params, xs)[1].sum()

    for i in range(3):
        run(p, jax.random.normal(jax.random.key(i), (4, 12, 3)))
    assert len(traces) == 1


@pytest.mark.parametrize("cell", [LSTMCell(16, dtype=jnp.bfloat16), GRUCell(16, dtype=jnp.bfloat16),
                                  RNNCell(16, dtype=jnp.bfloat16)], ids=["lstm", "gru", "rnn"])
def test_bf16_compute_with_f32_params_stays_close_to_f32(cell):
    p = cell.init(KEY, 8)
    assert p["input_kernel"].dtype == jnp.float32
    x = jax.random.normal(KEY, (4, 20, 8))
    carry, ys = scan_cell(cell, p, x)
    _, ref = scan_cell(dataclasses.replace(cell, dtype=None), p, x)
    assert jax.tree.leaves(carry)[0].dtype == jnp.float32
    assert float(jnp.abs(ys - ref).max()) < 5e-2
    g = jax.grad(lambda q: scan_cell(cell, q, x)[1].sum())(p)
    assert all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(g))


def test_stack_equals_layers_run_by_hand():
    stack = RecurrentStack(LSTMCell(5), num_layers=2, bidirectional=True)
    params = stack.init(KEY, 3)
    x = jax.random.normal(KEY, (2, 6, 3))
    carries, ys = stack.apply(params, x)
    cell = stack.cell
    f0 = scan_cell(cell, params[0][0], x)
    b0 = scan_cell(cell, params[0][1], x, reverse=True)
    x1 = jnp.concatenate([f0[1], b0[1]], -1)
    f1 = scan_cell(cell, params[1][0], x1)
    b1 = scan_cell(cell, params[1][1], x1, reverse=True)
    np.testing.assert_allclose(ys, jnp.concatenate([f1[1], b1[1]], -1), atol=1e-6)
    np.testing.assert_allclose(carries[1][1].h, b1[0].h, atol=1e-6)
    assert ys.shape == (2, 6, 10)


def test_stack_dropout_needs_a_key_and_uses_one_mask_per_sequence():
    stack = RecurrentStack(RNNCell(4), num_layers=2, dropout=0.5)
    params = stack.init(KEY, 3)
    x = jax.random.normal(KEY, (2, 6, 3))
    _, a = stack.apply(params, x)
    _, b = stack.apply(params, x)
    np.testing.assert_array_equal(a, b)
    _, d1 = stack.apply(params, x, dropout_key=jax.random.key(1))
    _, d2 = stack.apply(params, x, dropout_key=jax.random.key(2))
    assert not np.allclose(d1, a) and not np.allclose(d1, d2)
    # No dropout after the last layer, so a one-layer stack ignores the key.
    one = RecurrentStack(RNNCell(4), num_layers=1, dropout=0.5)
    p1 = one.init(KEY, 3)
    np.testing.assert_array_equal(one.apply(p1, x)[1], one.apply(p1, x, dropout_key=KEY)[1])
    # One mask per sequence for all its steps (unlike PyTorch's per-step masks): with a second
    # layer that passes its input through (identity input kernel, no recurrence, no bias), the
    # zeros of the output are the mask, and they are the same features at every step.
    see = [params[0], {"input_kernel": jnp.eye(4), "recurrent_kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}]
    _, y = stack.apply(see, jax.random.normal(KEY, (8, 20, 3)), dropout_key=jax.random.key(3))
    dropped = np.asarray(y == 0)
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(dropped, np.broadcast_to(dropped[:, :1], dropped.shape))


def test_stack_carries_across_batches_truncated_bptt():
    stack = RecurrentStack(GRUCell(4), num_layers=2)
    params = stack.init(KEY, 3)
    x = jax.random.normal(KEY, (2, 8, 3))
    c, y1 = stack.apply(params, x[:, :5])
    _, y2 = stack.apply(params, x[:, 5:], initial_carry=c)
    _, y = stack.apply(params, x)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, atol=1e-6)


# --- bad input -----------------------------------------------------------------------------------

def test_wrong_feature_size_is_a_clear_error():
    cell = LSTMCell(4)
    p = cell.init(KEY, 3)
    with pytest.raises(ConfigError, match="input_size=3"):
        jax.jit(lambda x: scan_cell(cell, p, x))(jnp.ones((2, 5, 7)))


def test_integer_data_into_a_float_cell_is_a_clear_error():
    cell = GRUCell(4)
    p = cell.init(KEY, 3)
    with pytest.raises(ConfigError, match="embed the tokens first"):
        scan_cell(cell, p, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ConfigError, match="token ids"):
        scan_cell(GRUCell(4, token_inputs=True), p, jnp.ones((2, 5), jnp.float32))


def test_bad_seq_lengths_shape_is_a_clear_error():
    cell = RNNCell(4)
    p = cell.init(KEY, 3)
    with pytest.raises(ConfigError, match=r"seq_lengths must be integers of shape \(2,\)"):
        scan_cell(cell, p, jnp.ones((2, 5, 3)), seq_lengths=jnp.array([5, 5, 5]))


def test_unknown_cell_options_are_clear_errors():
    with pytest.raises(ConfigError, match="Unknown option.*'forgetbias'.*valid options"):
        make_cell("lstm", 8, forgetbias=1.0)
    with pytest.raises(ConfigError, match="Unknown cell kind 'lstn'"):
        make_cell("lstn", 8)
    with pytest.raises(ConfigError, match="activation"):
        RNNCell(4, activation="gelu")
    with pytest.raises(ConfigError, match="hidden_size"):
        LSTMCell(0)
    assert make_cell("gru", 8, reset_after=False) == GRUCell(8, reset_after=False)


def test_leaky_rnn_cell_equals_a_hand_computation_and_runs_in_every_path():
    from lstm_jax import LeakyRNNCell, RecurrentStack, make_cell, scan_cell

    cell = make_cell("leaky_rnn", 4, alpha=0.3)
    assert isinstance(cell, LeakyRNNCell)
    params = cell.init(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3))
    w_i, w_h, b = (np.asarray(params[k], np.float64) for k in ("input_kernel", "recurrent_kernel", "bias"))
    h, expected = np.zeros((2, 4)), []
    for t in range(5):
        h = 0.7 * h + 0.3 * np.tanh(np.asarray(x[:, t], np.float64) @ w_i + h @ w_h + b)
        expected.append(h)
    for impl in ("auto", "scan"):
        carry, ys = scan_cell(cell, params, x, impl=impl)
        np.testing.assert_allclose(ys, np.stack(expected, 1), atol=1e-5)
        np.testing.assert_allclose(carry, expected[-1], atol=1e-5)
    with pytest.raises(ConfigError, match="impl='fused'"):
        scan_cell(cell, params, x, impl="fused")
    one = make_cell("leaky_rnn", 4, alpha=1.0)  # alpha = 1 is the plain RNN
    np.testing.assert_allclose(scan_cell(one, params, x)[1],
                               scan_cell(make_cell("rnn", 4), params, x)[1], atol=1e-6)
    _, ys = RecurrentStack(cell, num_layers=2, bidirectional=True).apply(
        RecurrentStack(cell, num_layers=2, bidirectional=True).init(jax.random.PRNGKey(2), 3), x)
    assert ys.shape == (2, 5, 8)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="alpha must be in"):
            make_cell("leaky_rnn", 4, alpha=bad)
