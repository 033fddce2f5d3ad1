"""MGUCell: parity with Flax linen ``MGUCell`` (values and gradients, through ``from_flax_mgu``), finite
differences, the by-name and stacked paths, and the import's refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lstm_jax import ConfigError, MGUCell, RecurrentStack, from_flax_mgu, make_cell, scan_cell
from lstm_jax.dispatch.plan import plan_layer

nn = pytest.importorskip("flax.linen")

ATOL = 1e-5
RESET = pytest.mark.parametrize("reset_gate", [True, False], ids=["reset", "no_reset"])


def _flax(reset_gate, features=5, input_size=3):
    """A linen MGUCell and its variables, every leaf perturbed so all biases and gates matter."""
    cell_f = nn.MGUCell(features=features, reset_gate=reset_gate)
    variables = cell_f.init(jax.random.key(2), jnp.zeros((2, features)), jnp.zeros((2, input_size)))
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    variables = jax.tree.unflatten(tree, [a + 0.4 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    return cell_f, variables


def _inputs(batch=2, steps=7, input_size=3, features=5):
    x = jax.random.normal(jax.random.key(1), (batch, steps, input_size))
    h0 = jax.random.normal(jax.random.key(3), (batch, features))
    return x, h0


def _rnn_params(variables):
    return {"params": {"cell": variables["params"]}}


@RESET
def test_flax_parity_one_step_and_sequence(reset_gate):
    cell_f, variables = _flax(reset_gate)
    cell, params = from_flax_mgu(variables, reset_gate=reset_gate)
    assert cell == MGUCell(5, reset_gate=reset_gate)
    assert ("recurrent_bias" in params) == reset_gate
    x, h0 = _inputs()
    h_f, y_f = cell_f.apply(variables, h0, x[:, 0])
    h, y = cell.apply(params, h0, x[:, 0])
    np.testing.assert_allclose(y, y_f, atol=ATOL)
    np.testing.assert_allclose(h, h_f, atol=ATOL)
    rnn = nn.RNN(cell_f, return_carry=True)
    h_f, ys_f = rnn.apply(_rnn_params(variables), x, initial_carry=h0)
    h, ys = scan_cell(cell, params, x, initial_carry=h0)
    np.testing.assert_allclose(ys, ys_f, atol=ATOL)
    np.testing.assert_allclose(h, h_f, atol=ATOL)
    _, ys_jit = jax.jit(lambda p, xs: scan_cell(cell, p, xs))(params, x)  # zero initial carry, under jit
    np.testing.assert_allclose(ys_jit, rnn.apply(_rnn_params(variables), x)[1], atol=ATOL)


@RESET
def test_gradients_match_flax_through_the_conversion(reset_gate):
    cell_f, variables = _flax(reset_gate)
    cell, params = from_flax_mgu(variables, reset_gate=reset_gate)
    x, h0 = _inputs()
    rnn = nn.RNN(cell_f, return_carry=True)

    def loss_f(v, xs):
        h, ys = rnn.apply(_rnn_params(v), xs, initial_carry=h0)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h ** 2)

    def loss(p, xs):
        h, ys = scan_cell(cell, p, xs, initial_carry=h0)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h ** 2)

    g_vf, g_xf = jax.grad(loss_f, argnums=(0, 1))(variables, x)
    g_p, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(g_x, g_xf, atol=ATOL)
    _, converted = from_flax_mgu(g_vf, reset_gate=reset_gate)  # the conversion is linear: it maps gradients too
    for name in ("input_kernel", "recurrent_kernel", "bias"):
        np.testing.assert_allclose(g_p[name], converted[name], atol=ATOL, err_msg=name)
    if reset_gate:  # Flax has no recurrent bias on f; ours there adds to bias, so it gets bias's gradient
        np.testing.assert_allclose(g_p["recurrent_bias"][5:], converted["recurrent_bias"][5:], atol=ATOL)
        np.testing.assert_allclose(g_p["recurrent_bias"][:5], g_p["bias"][:5], atol=ATOL)


@RESET
def test_gradients_match_finite_differences(reset_gate):
    with jax.enable_x64(True):
        cell = MGUCell(4, reset_gate=reset_gate, param_dtype=jnp.float64)
        params = cell.init(jax.random.key(0), 3)
        params = {k: v + 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(1), i), v.shape, jnp.float64)
                  for i, (k, v) in enumerate(sorted(params.items()))}
        x = jax.random.normal(jax.random.key(2), (2, 4, 3), jnp.float64)
        h0 = jax.random.normal(jax.random.key(3), (2, 4), jnp.float64)

        def one_step(p, h, x_t):
            return jnp.sum(cell.apply(p, h, x_t)[1] ** 2)

        def sequence(p, xs):
            h, ys = scan_cell(cell, p, xs, seq_lengths=jnp.array([4, 2]))
            return jnp.sum(ys ** 2) + jnp.sum(h)

        check_grads(one_step, (params, h0, x[:, 0]), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
        check_grads(sequence, (params, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@RESET
def test_by_name_stacked_and_planned_as_the_plain_scan(reset_gate):
    cell = make_cell("mgu", 4, reset_gate=reset_gate, forget_bias=0.5)
    assert cell == MGUCell(4, reset_gate=reset_gate, forget_bias=0.5)
    params = cell.init(jax.random.key(0), 3)
    assert params["input_kernel"].shape == (3, 8) and params["recurrent_kernel"].shape == (4, 8)
    np.testing.assert_array_equal(params["bias"], [0.5] * 4 + [0.0] * 4)
    assert ("recurrent_bias" in params) == reset_gate
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    carry, ys = scan_cell(cell, params, x)
    h, loop = cell.initial_carry((2,)), []
    for t in range(5):
        h, y = cell.apply(params, h, x[:, t])
        loop.append(y)
    np.testing.assert_allclose(ys, jnp.stack(loop, 1), atol=1e-6)
    np.testing.assert_allclose(carry, h, atol=1e-6)
    assert plan_layer(cell, steps=5, rows=2, features=3).impl == "scan"
    with pytest.raises(ConfigError, match="impl='fused'"):
        scan_cell(cell, params, x, impl="fused")
    for bidirectional in (False, True):
        stack = RecurrentStack(cell, num_layers=2, bidirectional=bidirectional)
        carries, ys = jax.jit(stack.apply)(stack.init(jax.random.key(2), 3), x)
        assert ys.shape == (2, 5, 8 if bidirectional else 4) and len(carries) == 2
    tokens = make_cell("mgu", 4, reset_gate=reset_gate, token_inputs=True)
    p_tok = tokens.init(jax.random.key(3), 11)
    ids = jax.random.randint(jax.random.key(4), (2, 5), 0, 11)
    np.testing.assert_allclose(scan_cell(tokens, p_tok, ids)[1],
                               scan_cell(dataclasses.replace(tokens, token_inputs=False), p_tok,
                                         jax.nn.one_hot(ids, 11))[1], atol=1e-6)


def test_bf16_compute_stays_close_to_f32():
    cell = MGUCell(6)
    params = cell.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    _, ref = scan_cell(cell, params, x)
    _, ys = scan_cell(dataclasses.replace(cell, dtype=jnp.bfloat16), params, x)
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(ys, ref, atol=3e-2)


@RESET
def test_flax_import_refuses_extra_missing_and_misshapen_entries(reset_gate):
    _, variables = _flax(reset_gate)
    inner = jax.tree.map(np.asarray, variables["params"])
    extra = {**inner, "Dense_0": {"kernel": np.zeros((3, 5))}}
    with pytest.raises(ConfigError, match="flax_params .*unexpected \\['Dense_0/kernel'\\]"):
        from_flax_mgu(extra, reset_gate=reset_gate)
    missing = {**inner, "in": {"kernel": inner["in"]["kernel"]}}
    with pytest.raises(ConfigError, match="flax_params .*lacks \\['in/bias'\\]"):
        from_flax_mgu({"params": missing}, reset_gate=reset_gate)
    with pytest.raises(ConfigError, match=f"MGUCell\\(reset_gate={reset_gate}\\), so pass reset_gate={reset_gate}"):
        from_flax_mgu(inner, reset_gate=not reset_gate)
    with pytest.raises(ConfigError, match="unexpected \\['batch_stats/mean'\\]"):
        from_flax_mgu({**variables, "batch_stats": {"mean": np.zeros(5)}}, reset_gate=reset_gate)
    bad_shape = {**inner, "hf": {"kernel": np.zeros((4, 5))}}
    with pytest.raises(ConfigError, match="shapes .*'hf/kernel'"):
        from_flax_mgu(bad_shape, reset_gate=reset_gate)
    with pytest.raises(ConfigError, match="flax_params must be a mapping"):
        from_flax_mgu([inner], reset_gate=reset_gate)
