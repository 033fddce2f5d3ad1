"""Keras import: parity with Keras 3 on its JAX backend (each layer's outputs and final states), and
the refusals. Skipped where keras (or h5py) is not installed (the `keras` extra)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConfigError, GRUCell, LSTMCarry, LSTMCell, RNNCell, from_keras

ATOL = 1e-5


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "jax"  # before keras is first imported; its default is TensorFlow
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was imported earlier with the {keras.backend.backend()} backend")
    return keras


def _perturbed(layer, seed=0):
    """Give every weight random values, so that every bias and gate matters."""
    rng = np.random.default_rng(seed)
    layer.set_weights([0.5 * rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()])
    return layer


def _x(batch=3, steps=6, features=4, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


LAYERS = {
    "lstm": lambda k, u: k.layers.LSTM(u, return_sequences=True, return_state=True),
    "gru_reset_after": lambda k, u: k.layers.GRU(u, return_sequences=True, return_state=True),
    "gru_reset_before": lambda k, u: k.layers.GRU(u, reset_after=False, return_sequences=True, return_state=True),
    "rnn_tanh": lambda k, u: k.layers.SimpleRNN(u, return_sequences=True, return_state=True),
    "rnn_relu": lambda k, u: k.layers.SimpleRNN(u, activation="relu", return_sequences=True, return_state=True),
}
CELLS = {"lstm": LSTMCell(5), "gru_reset_after": GRUCell(5, reset_after=True),
         "gru_reset_before": GRUCell(5, reset_after=False), "rnn_tanh": RNNCell(5),
         "rnn_relu": RNNCell(5, activation="relu")}


def _ours_state(carry):
    return [carry.h, carry.c] if isinstance(carry, LSTMCarry) else [carry]


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("units,features,steps", [(5, 4, 6), (2, 1, 3), (9, 7, 11)], ids=["5x4", "2x1", "9x7"])
def test_layer_parity(keras, kind, units, features, steps):
    layer = LAYERS[kind](keras, units)
    x = _x(steps=steps, features=features)
    layer(x)  # build
    _perturbed(layer)
    y_k, *state_k = layer(x)
    stack, params = from_keras(layer)
    assert stack.cell == dataclasses.replace(CELLS[kind], hidden_size=units)
    carries, ys = stack.apply(params, jnp.asarray(x))
    np.testing.assert_allclose(ys, np.asarray(y_k), atol=ATOL)
    for ours, theirs in zip(_ours_state(carries[0]), state_k, strict=True):
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=ATOL)
    # jitted, from a nonzero initial state (Keras's state list -> our carry)
    rng = np.random.default_rng(5)
    init = [rng.standard_normal((x.shape[0], units)).astype(np.float32) for _ in state_k]
    y_k = layer(x, initial_state=init)[0]
    carry0 = LSTMCarry(h=jnp.asarray(init[0]), c=jnp.asarray(init[1])) if kind == "lstm" else jnp.asarray(init[0])
    _, ys = jax.jit(lambda p, xs, c: stack.apply(p, xs, initial_carry=[c]))(params, jnp.asarray(x), carry0)
    np.testing.assert_allclose(ys, np.asarray(y_k), atol=ATOL)


@pytest.mark.parametrize("kind", ["lstm", "gru_reset_after", "gru_reset_before", "rnn_tanh"])
def test_bidirectional_parity(keras, kind):
    layer = keras.layers.Bidirectional(LAYERS[kind](keras, 4))
    x = _x(steps=5, features=3)
    layer(x)
    _perturbed(layer, seed=3)
    y_k, *state_k = layer(x)
    stack, params = from_keras(layer)
    assert stack.bidirectional and stack.num_layers == 1
    carries, ys = stack.apply(params, jnp.asarray(x))
    np.testing.assert_allclose(ys, np.asarray(y_k), atol=ATOL)
    fwd, bwd = carries[0]
    for ours, theirs in zip(_ours_state(fwd) + _ours_state(bwd), state_k, strict=True):
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=ATOL)
    # the same from get_weights() and keras.layers.serialize(layer)
    stack2, params2 = from_keras(layer.get_weights(), keras.layers.serialize(layer))
    assert stack2 == stack
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_weights_and_config_equal_the_layer(keras, kind):
    layer = LAYERS[kind](keras, 3)
    layer(_x(features=2))
    _perturbed(layer, seed=4)
    stack, params = from_keras(layer)
    for config in (layer.get_config(), keras.layers.serialize(layer)):
        stack2, params2 = from_keras(layer.get_weights(), config)
        assert stack2 == stack
        jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("kind", ["lstm", "gru_reset_after", "gru_reset_before", "rnn_tanh"])
def test_use_bias_false_imports_exact_zero_biases(keras, kind):
    base = LAYERS[kind](keras, 4)
    layer = type(base).from_config({**base.get_config(), "use_bias": False})
    x = _x(features=3)
    layer(x)
    _perturbed(layer, seed=6)
    assert len(layer.get_weights()) == 2
    stack, params = from_keras(layer)
    assert all(not np.any(params[0][k]) for k in ("bias", "recurrent_bias") if k in params[0])
    carries, ys = stack.apply(params, jnp.asarray(x))
    np.testing.assert_allclose(ys, np.asarray(layer(x)[0]), atol=ATOL)


def test_gru_gate_order_is_permuted(keras):
    """Keras's z, r, h columns land in our r, z, n slots (a check that fails if they were copied)."""
    layer = keras.layers.GRU(2)
    layer(_x(features=1))
    kernel = np.arange(6, dtype=np.float32).reshape(1, 6)
    layer.set_weights([kernel, np.zeros((2, 6), np.float32), np.zeros((2, 6), np.float32)])
    _, params = from_keras(layer)
    np.testing.assert_array_equal(params[0]["input_kernel"], [[2, 3, 0, 1, 4, 5]])


REFUSALS = [
    ("LSTM", dict(go_backwards=True), "go_backwards=True"),
    ("LSTM", dict(stateful=True), "stateful=True"),
    ("LSTM", dict(unroll=True), "unroll=True"),
    ("LSTM", dict(activation="relu"), "activation='relu'"),
    ("GRU", dict(recurrent_activation="hard_sigmoid"), "recurrent_activation='hard_sigmoid'"),
    ("SimpleRNN", dict(activation="sigmoid"), "activation='sigmoid'"),
]


@pytest.mark.parametrize("cls,options,words", REFUSALS, ids=[w for _, _, w in REFUSALS])
def test_refuses_options_it_cannot_reproduce(keras, cls, options, words):
    layer = getattr(keras.layers, cls)(3, **options)
    layer(_x(batch=1 if options.get("stateful") else 3, features=2))
    with pytest.raises(ConfigError, match="from_keras") as err:
        from_keras(layer)
    assert words in str(err.value) and str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_refuses_other_layers_and_misplaced_weights(keras):
    dense = keras.layers.Dense(3)
    dense(_x(features=2))
    with pytest.raises(ConfigError, match="is a Keras Dense; only LSTM, GRU, SimpleRNN and Bidirectional"):
        from_keras(dense)
    bi = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True), merge_mode="sum")
    bi(_x(features=2))
    with pytest.raises(ConfigError, match="merge_mode='sum'; only 'concat'"):
        from_keras(bi)
    lstm = keras.layers.LSTM(3)
    lstm(_x(features=2))
    weights, config = lstm.get_weights(), lstm.get_config()
    with pytest.raises(ConfigError, match=r"must have 3 weights .* got 4"):  # an extra array is not dropped
        from_keras(weights + [np.zeros(3)], config)
    with pytest.raises(ConfigError, match=r"must have weights of shapes"):
        from_keras([weights[0], weights[1], weights[2][:-1]], config)
    with pytest.raises(ConfigError, match="config must be the layer's get_config"):
        from_keras(weights)
    with pytest.raises(ConfigError, match="layer_or_weights must be a Keras"):
        from_keras("lstm")
