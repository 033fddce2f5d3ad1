"""Keras import: parity with Keras 3 on its JAX backend (each layer's outputs and final states, the
seed model's next-character distribution from its Keras 3 and Keras 2 weight files), sample.py from
those files, and the refusals. Skipped where keras (or h5py) is not installed (the `keras` extra)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import CheckpointError, ConfigError, GRUCell, LSTMCarry, LSTMCell, RNNCell, from_keras, from_keras_seed

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


def test_unroll_is_accepted_and_changes_nothing(keras):
    layer = keras.layers.GRU(3, unroll=True, return_sequences=True)
    x = _x(features=2)
    layer(x)
    _perturbed(layer, seed=9)
    stack, params = from_keras(layer)
    np.testing.assert_allclose(stack.apply(params, jnp.asarray(x))[1], np.asarray(layer(x)), atol=ATOL)


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
    with pytest.raises(ConfigError, match=r"has no weights yet; build it first"):
        from_keras(keras.layers.LSTM(3))


# ---------------------------------------------------------------- the seed's model

def _seed_model(keras, vocab_size=11, hidden=16, fit=True):
    """The lesson's model, small, trained one step so that the file also holds optimizer state."""
    model = keras.Sequential([keras.Input((40, vocab_size)), keras.layers.LSTM(hidden),
                              keras.layers.Dense(vocab_size), keras.layers.Activation("softmax")])
    _perturbed(model.layers[0], seed=8)
    if fit:
        model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.RMSprop(0.01))
        ids = np.random.default_rng(0).integers(0, vocab_size, (8, 41))
        model.fit(np.eye(vocab_size, dtype=np.float32)[ids[:, :40]], np.eye(vocab_size)[ids[:, 40]], verbose=0)
    return model


def _write_keras2_h5(path, model):
    """The Keras 2 ``model.save_weights('x.h5')`` layout, by hand (Keras 2 cannot be installed beside 3)."""
    h5py = pytest.importorskip("h5py")
    lstm, dense, act = model.layers
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"lstm_1", b"dense_1", b"activation_1"])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.4.0"
        for group, names, arrays in (
                ("lstm_1", ["lstm_1/lstm_cell_1/kernel:0", "lstm_1/lstm_cell_1/recurrent_kernel:0",
                            "lstm_1/lstm_cell_1/bias:0"], lstm.get_weights()),
                ("dense_1", ["dense_1/kernel:0", "dense_1/bias:0"], dense.get_weights()),
                ("activation_1", [], [])):
            g = f.create_group(group)
            g.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S") if names else np.array([])
            for name, array in zip(names, arrays):
                g.create_dataset(name, data=array)


VOCAB = "\n !',.?abcde"[:11]


@pytest.fixture(scope="module")
def seed_files(keras, tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    model = _seed_model(keras)
    files = {"keras3": folder / "seed.weights.h5", "keras2": folder / "seed.hdf5", "keras3_legacy": folder / "m.h5"}
    model.save_weights(files["keras3"])
    _write_keras2_h5(files["keras2"], model)
    model.save(files["keras3_legacy"])  # Keras 3's own writer of the legacy layout, under model_weights
    return model, files


@pytest.mark.parametrize("layout", ["keras3", "keras2", "keras3_legacy"])
def test_seed_model_next_character_distribution(keras, seed_files, layout):
    keras_model, files = seed_files
    model, params, vocab = from_keras_seed(files[layout], VOCAB)
    assert model.config.hidden_size == 16 and model.config.num_layers == 1 and model.config.embed_size == 0
    assert vocab.chars == VOCAB
    windows = np.random.default_rng(2).integers(0, len(VOCAB), (5, 40))
    expected = keras_model.predict(np.eye(len(VOCAB), dtype=np.float32)[windows], verbose=0)
    _, logits = jax.jit(model.apply)(params, model.initial_carry((5,)), jnp.asarray(windows, jnp.int32))
    np.testing.assert_allclose(jax.nn.softmax(logits[:, -1]), expected, atol=ATOL)


def test_windowed_generation_is_the_lessons_keras_loop(keras, seed_files):
    """``window=40``: each greedy character is Keras's argmax over the last 40 characters."""
    from lstm_jax.charlm.sampling import generate

    keras_model, files = seed_files
    model, params, _ = from_keras_seed(files["keras2"], VOCAB)
    prime = [int(i) for i in np.random.default_rng(3).integers(0, len(VOCAB), 45)]
    ours = generate(model, params, np.asarray(prime), [0.0], 8, jax.random.key(0), window=40)[0]
    ids = list(prime)
    for _ in range(8):
        probs = keras_model.predict(np.eye(len(VOCAB), dtype=np.float32)[ids[-40:]][None], verbose=0)
        ids.append(int(np.argmax(probs)))
    assert list(ours) == ids[45:]
    with pytest.raises(ConfigError, match="window=40 needs a prime of at least 40 characters, but the prime has 39"):
        generate(model, params, np.asarray(prime[:39]), [0.0], 8, jax.random.key(0), window=40)


def test_seed_refusals(keras, seed_files, tmp_path):
    _, files = seed_files
    with pytest.raises(ConfigError, match="vocab has 10 characters but the model in .* was trained on 11"):
        from_keras_seed(files["keras3"], VOCAB[:10])
    other = keras.Sequential([keras.Input((40, 11)), keras.layers.GRU(8), keras.layers.Dense(11)])
    other.save_weights(tmp_path / "gru.weights.h5")
    with pytest.raises(CheckpointError, match=r"gru\.weights\.h5 holds layers .*; expected the seed's Keras model"):
        from_keras_seed(tmp_path / "gru.weights.h5", VOCAB)
    two = keras.Sequential([keras.Input((40, 11)), keras.layers.LSTM(8, return_sequences=True),
                            keras.layers.LSTM(8), keras.layers.Dense(11)])
    two.save_weights(tmp_path / "two.weights.h5")
    with pytest.raises(CheckpointError, match="expected the seed's Keras model"):
        from_keras_seed(tmp_path / "two.weights.h5", VOCAB)
    (tmp_path / "notes.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match=r"notes\.h5 is not an HDF5 file"):
        from_keras_seed(tmp_path / "notes.h5", VOCAB)
    with pytest.raises(CheckpointError, match="does not exist"):
        from_keras_seed(tmp_path / "missing.h5", VOCAB)


def test_sample_py_generates_from_the_keras_weights(keras, seed_files, tmp_path, capsys):
    """Greedy sampling after a 40-character prime starts with Keras's most likely next character."""
    from lstm_jax.charlm import sample

    keras_model, files = seed_files
    text = tmp_path / "corpus.txt"
    text.write_text(VOCAB[::-1] * 3)  # its sorted distinct characters are VOCAB
    prime = (VOCAB[1:] * 4)[:40]
    first = VOCAB[int(np.argmax(keras_model.predict(np.eye(11, dtype=np.float32)[[VOCAB.index(c) for c in prime]][None],
                                                    verbose=0)))]
    for layout in ("keras3", "keras2"):
        assert sample.main(["--keras-weights", str(files[layout]), "--vocab", str(text), "--prime", prime,
                            "--length", "30", "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(prime + first) and len(out) == 40 + 30 + 1
    assert sample.main(["--keras-weights", str(files["keras3"]), "--prime", "a"]) == 2
    assert "--keras-weights needs --vocab" in capsys.readouterr().err
    (tmp_path / "small.txt").write_text("abc")
    assert sample.main(["--keras-weights", str(files["keras3"]), "--vocab", str(tmp_path / "small.txt")]) == 2
    assert "error: --vocab has 3 characters" in capsys.readouterr().err
    assert sample.main(["--keras-weights", str(files["keras3"]), "--vocab", str(text), "--window", "40",
                        "--prime", "ab"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "error: --window=40 needs a prime of at least 40 characters" in out.err
    assert sample.main(["--keras-weights", str(files["keras3"]), "--vocab", str(text), "--window", "40",
                        "--prime", prime + "ab", "--length", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(prime + "ab")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_rates_come_with_the_layer_and_act_only_with_a_key(keras, bidirectional):
    """Keras's LSTM(dropout=, recurrent_dropout=) becomes the stack's variational input and recurrent
    dropout: without a dropout key the output is Keras's inference output, with one it is not."""
    lstm = keras.layers.LSTM(5, dropout=0.2, recurrent_dropout=0.3, return_sequences=True)
    layer = keras.layers.Bidirectional(lstm) if bidirectional else lstm
    x = _x()
    layer(x)
    _perturbed(layer)
    stack, params = from_keras(layer)
    assert (stack.input_dropout, stack.recurrent_dropout, stack.bidirectional) == (0.2, 0.3, bidirectional)
    expected = np.asarray(layer(x, training=False))
    np.testing.assert_allclose(stack.apply(params, jnp.asarray(x))[1], expected, atol=ATOL)
    key = jax.random.key(3)
    dropped = stack.apply(params, jnp.asarray(x), dropout_key=key)[1]
    assert np.abs(np.asarray(dropped) - expected).max() > 1e-3
    np.testing.assert_array_equal(dropped, stack.apply(params, jnp.asarray(x), dropout_key=key)[1])
