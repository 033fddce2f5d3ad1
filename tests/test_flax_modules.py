"""lstm_jax.nnx and lstm_jax.linen: the same numbers as the functional layers, and Flax's ways."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lstm_jax import cross_entropy
from lstm_jax import linen as lj_linen
from lstm_jax import nnx as lj_nnx

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"lstm": (lj_nnx.LSTM, lj_linen.LSTM), "gru": (lj_nnx.GRU, lj_linen.GRU), "rnn": (lj_nnx.RNN, lj_linen.RNN)}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_nnx_module_equals_the_functional_stack_values_and_gradients(kind, bidirectional):
    model = KINDS[kind][0](5, 8, num_layers=2, bidirectional=bidirectional, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 6, 5))
    lengths = jnp.array([6, 2, 4])

    @nnx.jit
    def loss(model, x):
        return (model(x, seq_lengths=lengths) ** 2).mean()

    stack, params = model.stack, model.to_params()
    ref = lambda p: (stack.apply(p, x, seq_lengths=lengths)[1] ** 2).mean()
    np.testing.assert_allclose(loss(model, x), ref(params), rtol=1e-6)
    grads = nnx.grad(loss)(model, x)
    ref_grads = jax.grad(ref)(params)
    for i, layer in enumerate(ref_grads):
        for d, direction in enumerate(layer if bidirectional else (layer,)):
            got = grads["layers"][i]
            got = (got["forward"], got["backward"])[d] if bidirectional else got
            for name, value in direction.items():
                np.testing.assert_allclose(got[name][...], value, atol=1e-6)


def test_reverse_runs_from_the_last_valid_step_and_keeps_the_order():
    model = lj_nnx.LSTM(4, 6, reverse=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 5, 4))
    lengths = jnp.array([5, 3])
    from lstm_jax import scan_cell

    expected = scan_cell(model.stack.cell, model.to_params()[0], x, seq_lengths=lengths, reverse=True)[1]
    np.testing.assert_allclose(model(x, seq_lengths=lengths), expected, atol=1e-6)


def test_a_small_nnx_character_model_trains_with_nnx_optimizer():
    class CharModel(nnx.Module):
        def __init__(self, vocab, rngs):
            self.embed = nnx.Embed(vocab, 8, rngs=rngs)
            self.rnn = lj_nnx.LSTM(8, 32, num_layers=2, dropout=0.1, rngs=rngs)
            self.head = nnx.Linear(32, vocab, rngs=rngs)

        def __call__(self, tokens):
            return self.head(self.rnn(self.embed(tokens)))

    text = "the state of our union is strong and the people are free. " * 20
    vocab = sorted(set(text))
    ids = jnp.array([vocab.index(c) for c in text])
    batch = jnp.stack([ids[i : i + 33] for i in range(0, 320, 40)])
    model = CharModel(len(vocab), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.rmsprop(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(batch[:, :-1]), batch[:, 1:]))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_dropout_follows_train_and_eval_mode_and_the_rngs():
    make = lambda seed: lj_nnx.GRU(4, 16, num_layers=3, dropout=0.5, rngs=nnx.Rngs(seed))
    x = jnp.ones((2, 5, 4))
    a, b = make(0), make(0)
    train_a, train_b = a(x), b(x)
    np.testing.assert_array_equal(train_a, train_b)  # reproducible from the same Rngs
    assert not np.allclose(a(x), train_a)  # the stream advances: a new mask next call
    a.eval()
    eval_1, eval_2 = a(x), a(x)
    np.testing.assert_array_equal(eval_1, eval_2)
    np.testing.assert_allclose(eval_1, a.stack.apply(a.to_params(), x)[1], atol=1e-6)
    assert not np.allclose(eval_1, train_a)
    a.train()
    assert not np.allclose(a(x), eval_1)


def test_split_merge_and_an_orbax_round_trip_of_the_module_state(tmp_path):
    model = lj_nnx.LSTM(3, 7, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4, 3))
    model.eval()
    expected = model(x)
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), expected)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "module", nnx.state(model))
    checkpointer.wait_until_finished()
    fresh = lj_nnx.LSTM(3, 7, num_layers=2, bidirectional=True, rngs=nnx.Rngs(99))
    fresh.eval()
    graphdef, abstract = nnx.split(fresh)
    restored = checkpointer.restore(tmp_path / "module", abstract)
    np.testing.assert_array_equal(nnx.merge(graphdef, restored)(x), expected)


def test_pytorch_weights_in_an_nnx_module_give_pytorch_outputs():
    torch = pytest.importorskip("torch")
    from lstm_jax import from_torch

    torch.manual_seed(0)
    for layer in (torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True),
                  torch.nn.GRU(5, 6, num_layers=1, batch_first=True)):
        module = lj_nnx.from_params(*from_torch(layer.state_dict()))
        x = torch.randn(3, 7, 5)
        expected, _ = layer(x)
        np.testing.assert_allclose(module(jnp.asarray(x.numpy())), expected.detach().numpy(), atol=1e-5)
        stack, params = from_torch(layer.state_dict())
        jax.tree.map(np.testing.assert_array_equal, module.to_params(), params)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_linen_module_equals_the_functional_stack_and_converts_both_ways(kind):
    model = KINDS[kind][1](hidden_size=8, num_layers=2, dropout=0.3, bidirectional=kind == "gru")
    x = jax.random.normal(jax.random.key(1), (3, 6, 5))
    variables = model.init(jax.random.key(0), x)
    params = model.to_params(variables)
    ys = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(ys, model.stack().apply(params, x)[1], atol=1e-6)
    np.testing.assert_array_equal(model.apply(model.from_params(params), x), ys)
    grads = jax.grad(lambda v: (model.apply(v, x) ** 2).sum())(variables)
    ref = jax.grad(lambda p: (model.stack().apply(p, x)[1] ** 2).sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), model.to_params(grads), ref)
    drop = lambda seed: model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(drop(1), drop(1))
    assert not np.allclose(drop(1), ys) and not np.allclose(drop(1), drop(2))


def test_lstm_jax_imports_without_nnx_and_lstm_jax_nnx_says_what_is_missing():
    code = ("import sys; sys.modules['flax.nnx'] = None\n"
            "import lstm_jax\n"
            "try:\n    import lstm_jax.nnx\nexcept ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lstm_jax.nnx needs Flax with the NNX API" in out.stdout
