"""LSTMCell(peepholes=True) and LSTMCell(layer_norm=True): values against a NumPy transcription of the
equations (Gers & Schmidhuber 2000 as TF's PeepholeLSTMCell; Ba et al. 2016 as TF-Addons' LayerNormLSTMCell),
gradients against finite differences, the dispatch's refusals and bad options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lstm_jax import ConfigError, LSTMCell, RecurrentStack, make_cell, scan_cell
from lstm_jax.dispatch.plan import fused_kind, onednn_kind, plan_layer

OPTIONS = pytest.mark.parametrize("option", ["peepholes", "layer_norm"])


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _ln(v, gain, beta, eps):
    """Ba et al.'s LN over the last axis: (v - mu) / sqrt(sigma^2 + eps) * gain + beta."""
    mu = v.mean(-1, keepdims=True)
    sigma2 = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(sigma2 + eps) * gain + beta


def _numpy_lstm(p, xs, h, c, option, eps=1e-3):
    """The equations step by step with one weight matrix per gate, in float64: an independent
    transcription (no fused gates, no hoisted projection)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    H = h.shape[-1]
    blk = lambda a, k: a[..., k * H:(k + 1) * H]
    W = {g: blk(p["input_kernel"], k) for k, g in enumerate("ifgo")}
    U = {g: blk(p["recurrent_kernel"], k) for k, g in enumerate("ifgo")}
    b = {g: blk(p["bias"], k) for k, g in enumerate("ifgo")}
    ys = []
    for x in np.moveaxis(np.asarray(xs, np.float64), 1, 0):
        if option == "layer_norm":
            # TF-Addons: kernel_norm(x W) + recurrent_norm(h U) + b over all 4H pre-activations
            zx = _ln(x @ p["input_kernel"], p["ln_input_scale"], 0.0, eps)
            zh = _ln(h @ p["recurrent_kernel"], p["ln_recurrent_scale"], 0.0, eps)
            z = zx + zh + p["bias"]
            a = {g: blk(z, k) for k, g in enumerate("ifgo")}
            c = _sigmoid(a["f"]) * c + _sigmoid(a["i"]) * np.tanh(a["g"])
            c = _ln(c, p["ln_cell_scale"], p["ln_cell_offset"], eps)  # state_norm: the carried state
            h = _sigmoid(a["o"]) * np.tanh(c)
        else:
            i = _sigmoid(x @ W["i"] + h @ U["i"] + b["i"] + p["peephole_i"] * c)
            f = _sigmoid(x @ W["f"] + h @ U["f"] + b["f"] + p["peephole_f"] * c)
            c = f * c + i * np.tanh(x @ W["g"] + h @ U["g"] + b["g"])
            o = _sigmoid(x @ W["o"] + h @ U["o"] + b["o"] + p["peephole_o"] * c)  # the new state
            h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys, 1), h, c


def _perturbed(cell, input_size, seed=0, dtype=jnp.float32):
    """Params with every leaf moved off its initial value, so peepholes and gains all matter."""
    params = cell.init(jax.random.key(seed), input_size)
    return {k: (v + 0.5 * jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i), v.shape)).astype(dtype)
            for i, (k, v) in enumerate(sorted(params.items()))}


@OPTIONS
def test_values_match_the_numpy_transcription(option):
    cell = LSTMCell(5, **{option: True})
    params = _perturbed(cell, 3)
    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    h0 = jax.random.normal(jax.random.key(2), (2, 5))
    c0 = jax.random.normal(jax.random.key(3), (2, 5))
    carry, ys = scan_cell(cell, params, x, initial_carry=cell.initial_carry((2,))._replace(h=h0, c=c0))
    ys_np, h_np, c_np = _numpy_lstm(params, x, np.asarray(h0, np.float64), np.asarray(c0, np.float64), option)
    np.testing.assert_allclose(ys, ys_np, atol=2e-5)
    np.testing.assert_allclose(carry.h, h_np, atol=2e-5)
    np.testing.assert_allclose(carry.c, c_np, atol=2e-5)
    _, ys_jit = jax.jit(lambda p, xs: scan_cell(cell, p, xs))(params, x)  # zero carry, under jit
    zeros = np.zeros((2, 5))
    np.testing.assert_allclose(ys_jit, _numpy_lstm(params, x, zeros, zeros, option)[0], atol=2e-5)


@OPTIONS
def test_the_options_change_the_function_and_start_where_documented(option):
    plain, cell = LSTMCell(4), LSTMCell(4, **{option: True})
    params = cell.init(jax.random.key(0), 3)
    extra = set(params) - set(plain.init(jax.random.key(0), 3))
    assert extra == ({"peephole_i", "peephole_f", "peephole_o"} if option == "peepholes" else
                     {"ln_input_scale", "ln_recurrent_scale", "ln_cell_scale", "ln_cell_offset"})
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    base = {k: params[k] for k in ("input_kernel", "recurrent_kernel", "bias")}
    same = scan_cell(plain, base, x)[1]
    if option == "peepholes":  # zero peepholes: the plain LSTM; nonzero ones: not
        np.testing.assert_allclose(scan_cell(cell, params, x)[1], same, atol=1e-6)
        moved = {**params, "peephole_o": jnp.ones(4)}
        assert np.abs(scan_cell(cell, moved, x)[1] - same).max() > 1e-2
    else:  # layer norm changes the function even at its initial gains
        assert np.abs(scan_cell(cell, params, x)[1] - same).max() > 1e-2


@OPTIONS
def test_gradients_match_finite_differences(option):
    with jax.enable_x64(True):
        cell = LSTMCell(4, param_dtype=jnp.float64, **{option: True})
        params = _perturbed(cell, 3, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(2), (2, 4, 3), jnp.float64)

        def sequence(p, xs):
            carry, ys = scan_cell(cell, p, xs, seq_lengths=jnp.array([4, 2]))
            return jnp.sum(jnp.sin(ys)) + jnp.sum(carry.c ** 2)

        check_grads(sequence, (params, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@OPTIONS
def test_dispatch_runs_the_scan_and_refuses_the_fast_kernels(option):
    cell = make_cell("lstm", 4, **{option: True})
    assert cell == LSTMCell(4, **{option: True})
    assert fused_kind(cell) is None and onednn_kind(cell) is None
    assert fused_kind(LSTMCell(4)) == "lstm" and onednn_kind(LSTMCell(4)) == "lstm"
    assert plan_layer(cell, steps=50, rows=64, features=256).impl == "scan"
    params = cell.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    for impl in ("fused", "onednn"):
        with pytest.raises(ConfigError, match=f"impl='{impl}' supports .*got LSTMCell\\(.*{option}=True"):
            scan_cell(cell, params, x, impl=impl)
    _, ys = scan_cell(cell, params, x, impl="auto")
    h, loop = cell.initial_carry((2,)), []
    for t in range(5):
        h, y = cell.apply(params, h, x[:, t])
        loop.append(y)
    np.testing.assert_allclose(ys, jnp.stack(loop, 1), atol=1e-6)
    stack = RecurrentStack(cell, num_layers=2, bidirectional=True)
    carries, ys = jax.jit(stack.apply)(stack.init(jax.random.key(2), 3), x)
    assert ys.shape == (2, 5, 8) and carries[1][0].c.shape == (2, 4)


def test_layer_norm_with_token_inputs_is_the_one_hot_layer():
    cell = LSTMCell(4, layer_norm=True, token_inputs=True)
    params = _perturbed(cell, 11)
    ids = jax.random.randint(jax.random.key(4), (2, 5), 0, 11)
    np.testing.assert_allclose(scan_cell(cell, params, ids)[1],
                               scan_cell(dataclasses.replace(cell, token_inputs=False), params,
                                         jax.nn.one_hot(ids, 11))[1], atol=1e-5)


def test_bad_options_are_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="peepholes=True and layer_norm=True cannot be combined"):
        LSTMCell(4, peepholes=True, layer_norm=True)
    with pytest.raises(ConfigError, match="LSTMCell: peepholes must be True or False, got 'yes'"):
        LSTMCell(4, peepholes="yes")
    with pytest.raises(ConfigError, match="norm_epsilon must be a positive number, got 0"):
        LSTMCell(4, layer_norm=True, norm_epsilon=0)
    with pytest.raises(ConfigError, match="Unknown option.*peephole'"):
        make_cell("lstm", 4, peephole=True)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_torch_modules_without_bias_import_with_zero_biases(kind):
    """PyTorch ``bias=False`` (nn.LSTM's is in test_interop): the import fills zero biases, the same outputs."""
    torch = pytest.importorskip("torch")
    from lstm_jax import from_torch

    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(input_size=3, hidden_size=4, num_layers=2, bias=False)
    stack, params = from_torch(module.state_dict())
    assert not np.any(np.asarray(params[0]["bias"]))
    x = np.random.default_rng(4).normal(size=(5, 2, 3)).astype(np.float32)
    y_t, _ = module(torch.from_numpy(x))
    _, ys = stack.apply(params, jnp.asarray(x), time_major=True)
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=1e-5)
