"""ConvLSTMCell over 1, 2 and 3 spatial dimensions: parity with Flax linen ``ConvLSTMCell`` (values and gradients,
through ``from_flax_convlstm``), strides and padding, finite differences, the scanned, stacked and by-name paths,
and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lstm_jax import ConfigError, ConvLSTMCell, RecurrentStack, from_flax_convlstm, make_cell, scan_cell
from lstm_jax.dispatch.plan import plan_layer

nn = pytest.importorskip("flax.linen")

ATOL = 2e-5
RTOL = 1e-5  # gradients summed over many positions: float32 rounding grows with them
SPATIAL = {1: (6,), 2: (5, 4), 3: (3, 4, 3)}
KERNEL = {1: (3,), 2: (3, 2), 3: (2, 3, 3)}  # even sizes too: 'SAME' pads them unevenly
DIMS = pytest.mark.parametrize("n", [1, 2, 3], ids=["1d", "2d", "3d"])


def _flax(n, features=3, channels=2, padding="SAME", use_bias=True):
    """A linen ConvLSTMCell and its variables, every leaf perturbed so both biases matter."""
    cell_f = nn.ConvLSTMCell(features=features, kernel_size=KERNEL[n], padding=padding, use_bias=use_bias)
    x = jnp.zeros((2, *SPATIAL[n], channels))
    variables = cell_f.init(jax.random.key(2), cell_f.initialize_carry(jax.random.key(0), x.shape), x)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    variables = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    return cell_f, variables


def _inputs(n, batch=2, steps=4, channels=2, features=3):
    x = jax.random.normal(jax.random.key(1), (batch, steps, *SPATIAL[n], channels))
    c0 = jax.random.normal(jax.random.key(3), (batch, *SPATIAL[n], features))
    h0 = jax.random.normal(jax.random.key(4), (batch, *SPATIAL[n], features))
    return x, (c0, h0)


@DIMS
def test_flax_parity_one_step_and_sequence(n):
    cell_f, variables = _flax(n)
    cell, params = from_flax_convlstm(variables)
    assert cell == ConvLSTMCell(3, kernel_size=KERNEL[n])
    x, (c0, h0) = _inputs(n)
    carry0 = cell.initial_carry(x[:, 0].shape[:-1])._replace(h=h0, c=c0)
    (c_f, h_f), y_f = cell_f.apply(variables, (c0, h0), x[:, 0])
    carry, y = cell.apply(params, carry0, x[:, 0])
    np.testing.assert_allclose(y, y_f, atol=ATOL)
    np.testing.assert_allclose(carry.c, c_f, atol=ATOL)
    rnn = nn.RNN(cell_f, return_carry=True)
    (c_f, h_f), ys_f = rnn.apply({"params": {"cell": variables["params"]}}, x, initial_carry=(c0, h0))
    carry, ys = scan_cell(cell, params, x, initial_carry=carry0)
    assert ys.shape == (2, 4, *SPATIAL[n], 3)
    np.testing.assert_allclose(ys, ys_f, atol=ATOL)
    np.testing.assert_allclose(carry.h, h_f, atol=ATOL)
    np.testing.assert_allclose(carry.c, c_f, atol=ATOL)
    if n == 2:  # zero initial carry, under jit
        _, ys_jit = jax.jit(lambda p, xs: scan_cell(cell, p, xs))(params, x)
        np.testing.assert_allclose(ys_jit, rnn.apply({"params": {"cell": variables["params"]}}, x)[1], atol=ATOL)


@DIMS
def test_gradients_match_flax_through_the_conversion(n):
    cell_f, variables = _flax(n)
    cell, params = from_flax_convlstm(variables)
    x, (c0, h0) = _inputs(n)
    rnn = nn.RNN(cell_f, return_carry=True)
    carry0 = cell.initial_carry(x[:, 0].shape[:-1])._replace(h=h0, c=c0)

    def loss_f(v, xs):
        (c, _), ys = rnn.apply({"params": {"cell": v["params"]}}, xs, initial_carry=(c0, h0))
        return jnp.sum(jnp.sin(ys)) + jnp.sum(c ** 2)

    def loss(p, xs):
        carry, ys = scan_cell(cell, p, xs, initial_carry=carry0)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(carry.c ** 2)

    g_vf, g_xf = jax.grad(loss_f, argnums=(0, 1))(variables, x)
    g_p, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(g_x, g_xf, atol=ATOL)
    reorder = lambda a: np.concatenate([np.split(np.asarray(a), 4, axis=-1)[i] for i in (0, 2, 1, 3)], axis=-1)
    g = g_vf["params"]
    np.testing.assert_allclose(g_p["input_kernel"], reorder(g["ih"]["kernel"]), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(g_p["recurrent_kernel"], reorder(g["hh"]["kernel"]), atol=ATOL, rtol=RTOL)
    # both Flax biases get the same gradient, our one bias too
    np.testing.assert_allclose(g_p["bias"], reorder(g["ih"]["bias"]), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(g_p["bias"], reorder(g["hh"]["bias"]), atol=ATOL, rtol=RTOL)


def test_explicit_padding_and_no_bias_match_flax():
    cell_f, variables = _flax(2, padding=((1, 1), (1, 0)), use_bias=False)
    cell, params = from_flax_convlstm(variables, padding=((1, 1), (1, 0)))
    assert cell.recurrent_padding == ((1, 1), (1, 0))  # keeps the shape: Flax's own recurrent padding
    x, (c0, h0) = _inputs(2)
    rnn = nn.RNN(cell_f)
    ys_f = rnn.apply({"params": {"cell": variables["params"]}}, x, initial_carry=(c0, h0))
    _, ys = scan_cell(cell, params, x, initial_carry=cell.initial_carry((2, 5, 4))._replace(h=h0, c=c0))
    np.testing.assert_allclose(ys, ys_f, atol=ATOL)


def test_strides_and_valid_padding_shrink_the_state_and_equal_the_step_loop():
    cell = ConvLSTMCell(3, kernel_size=(3, 3), strides=(2, 1), padding="VALID")
    params = cell.init(jax.random.key(0), 2)
    x = jax.random.normal(jax.random.key(1), (2, 4, 9, 6, 2))
    assert cell.output_spatial((9, 6)) == (4, 4) and cell.recurrent_padding == "SAME"
    carry, ys = jax.jit(lambda p, xs: scan_cell(cell, p, xs))(params, x)
    assert ys.shape == (2, 4, 4, 4, 3) and carry.h.shape == (2, 4, 4, 3)
    state, loop = cell.initial_carry((2, 9, 6)), []
    for t in range(4):
        state, y = cell.apply(params, state, x[:, t])
        loop.append(y)
    np.testing.assert_allclose(ys, jnp.stack(loop, 1), atol=1e-5)
    # the input convolution is lax's with these strides and padding
    proj = cell.input_projection(params, x[:, 0])
    ref = jax.lax.conv_general_dilated(x[:, 0], params["input_kernel"], (2, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
    np.testing.assert_allclose(proj, ref, atol=1e-5)


def test_gradients_match_finite_differences_with_lengths():
    with jax.enable_x64(True):
        cell = ConvLSTMCell(2, kernel_size=(3,), param_dtype=jnp.float64)
        params = cell.init(jax.random.key(0), 2)
        params = {k: v + 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(1), i), v.shape, jnp.float64)
                  for i, (k, v) in enumerate(sorted(params.items()))}
        x = jax.random.normal(jax.random.key(2), (2, 4, 5, 2), jnp.float64)

        def sequence(p, xs):
            carry, ys = scan_cell(cell, p, xs, seq_lengths=jnp.array([4, 2]))
            return jnp.sum(jnp.sin(ys)) + jnp.sum(carry.c ** 2)

        check_grads(sequence, (params, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_lengths_reverse_stack_and_by_name():
    cell = make_cell("convlstm", 3, kernel_size=(3, 3))
    assert cell == ConvLSTMCell(3, kernel_size=[3, 3]) and hash(cell) == hash(ConvLSTMCell(3, (3, 3)))
    params = cell.init(jax.random.key(0), 2)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 4, 2))
    carry, ys = scan_cell(cell, params, x, seq_lengths=jnp.array([5, 3]))
    short_carry, short = scan_cell(cell, params, x[1:, :3])
    np.testing.assert_allclose(ys[1, :3], short[0], atol=1e-6)
    np.testing.assert_array_equal(ys[1, 3:], 0.0)
    np.testing.assert_allclose(carry.c[1], short_carry.c[0], atol=1e-6)
    _, rev = scan_cell(cell, params, x, reverse=True, time_major=False)
    _, fwd = scan_cell(cell, params, x[:, ::-1])
    np.testing.assert_allclose(rev, fwd[:, ::-1], atol=1e-6)
    assert plan_layer(cell, steps=5, rows=2, features=2).impl == "scan"
    with pytest.raises(ConfigError, match="impl='fused' supports"):
        scan_cell(cell, params, x, impl="fused")
    stack = RecurrentStack(cell, num_layers=2, bidirectional=True)
    carries, ys = jax.jit(stack.apply)(stack.init(jax.random.key(2), 2), x)
    assert ys.shape == (2, 5, 4, 4, 6) and carries[1][1].h.shape == (2, 4, 4, 3)
    _, ys_tm = stack.apply(stack.init(jax.random.key(2), 2), jnp.moveaxis(x, 1, 0), time_major=True)
    np.testing.assert_allclose(jnp.moveaxis(ys_tm, 0, 1), ys, atol=1e-6)


def test_bad_options_inputs_and_imports_are_refused():
    with pytest.raises(ConfigError, match="kernel_size must be 1 to 3 positive ints.*got \\(3, 3, 3, 3\\)"):
        ConvLSTMCell(3, kernel_size=(3, 3, 3, 3))
    with pytest.raises(ConfigError, match="strides must be 2 positive ints .*got \\(1,\\)"):
        ConvLSTMCell(3, kernel_size=(3, 3), strides=(1,))
    with pytest.raises(ConfigError, match="padding must be 'SAME', 'VALID' or 2 .*got 'FULL'"):
        ConvLSTMCell(3, kernel_size=(3, 3), padding="FULL")
    with pytest.raises(ConfigError, match="needs the option\\(s\\) \\['kernel_size'\\]"):
        make_cell("convlstm", 3)
    cell = ConvLSTMCell(3, kernel_size=(3, 3))
    params = cell.init(jax.random.key(0), 2)
    with pytest.raises(ConfigError, match="inputs must end with 2 spatial axes and 2 channels"):
        scan_cell(cell, params, jnp.ones((2, 5, 4, 4, 3)))
    with pytest.raises(ConfigError, match="at least 4 dimension"):
        scan_cell(cell, params, jnp.ones((4, 4, 2)))
    _, variables = _flax(2)
    inner = jax.tree.map(np.asarray, variables["params"])
    with pytest.raises(ConfigError, match="unexpected \\['Dense_0/kernel'\\]"):
        from_flax_convlstm({**inner, "Dense_0": {"kernel": np.zeros((3, 5))}})
    with pytest.raises(ConfigError, match="lacks \\['hh/bias'\\]"):
        from_flax_convlstm({**inner, "hh": {"kernel": inner["hh"]["kernel"]}})
    with pytest.raises(ConfigError, match="must have the shapes"):
        from_flax_convlstm({**inner, "hh": {**inner["hh"], "kernel": np.zeros((3, 2, 4, 12))}})


def test_bf16_compute_stays_close_to_f32_and_differentiates():
    cell = ConvLSTMCell(4, kernel_size=(3, 3))
    params = cell.init(jax.random.key(0), 2)
    x = jax.random.normal(jax.random.key(1), (2, 3, 5, 5, 2))
    bf16 = ConvLSTMCell(4, kernel_size=(3, 3), dtype=jnp.bfloat16)
    ys = scan_cell(bf16, params, x)[1]
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(ys, scan_cell(cell, params, x)[1], atol=3e-2)
    grads = jax.grad(lambda p: jnp.sum(scan_cell(bf16, p, x)[1]))(params)
    assert grads["input_kernel"].dtype == jnp.float32 and np.all(np.isfinite(grads["input_kernel"]))
