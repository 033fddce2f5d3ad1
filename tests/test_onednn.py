"""The oneDNN LSTM layer (lstm_jax.onednn) against the pure-JAX layers: values, gradients, the
model and Trainer, several devices, the measured choice, and what a wrong request gets."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import CharLM, CharLMConfig, ConfigError, GRUCell, LSTMCarry, LSTMCell, RNNCell, onednn, scan_cell
from lstm_jax.charlm.data import Vocabulary, load_corpus, split_documents
from lstm_jax.charlm.model import cross_entropy
from lstm_jax.charlm.training import TrainConfig, Trainer
from lstm_jax.dispatch import measure, plan
from lstm_jax.kernels import onednn as kernel

ROOT = Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)
needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN extension: {onednn.unavailable_reason()}")


def _perturbed(cell, input_size):
    params = cell.init(KEY, input_size)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _close(actual, desired, tol):
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype, block", [(None, 16), (jnp.bfloat16, 32)], ids=["float32", "bf16"])
def test_one_hot_inputs_pad_the_vocabulary_to_onednn_blocks_and_keep_the_product(dtype, block):
    ids = jax.random.randint(KEY, (7, 5), 0, 92)
    w_x = jax.random.normal(KEY, (92, 12))
    x, padded = onednn.one_hot_inputs(ids, w_x, dtype)
    assert x.shape == (7, 5, 96) and padded.shape == (96, 12) and 96 % block == 0
    assert x.dtype == (dtype or jnp.float32)
    np.testing.assert_array_equal(x.astype(jnp.float32) @ padded, w_x[ids])
    grad = jax.grad(lambda w: jnp.sum(onednn.one_hot_inputs(ids, w, dtype)[1] ** 2))(w_x)
    np.testing.assert_allclose(grad, 2 * w_x)  # the padded rows' gradient is dropped


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("vocab, embed, route", [(92, 64, "rows"), (92, 40, "rows"), (20, 64, "one-hot")])
def test_embedded_inputs_feed_the_narrower_input_and_keep_the_product_and_its_gradients(dtype, vocab, embed, route):
    ids = jax.random.randint(KEY, (7, 5), 0, vocab)
    table, w_x = jax.random.normal(KEY, (vocab, embed)), jax.random.normal(jax.random.key(3), (embed, 12))
    x, kernel = onednn.embedded_inputs(ids, table, w_x, dtype)
    block = 32 if dtype else 16
    width = embed + -embed % block if route == "rows" else vocab + -vocab % block
    assert x.shape == (7, 5, width) and kernel.shape == (width, 12) and x.dtype == (dtype or jnp.float32)
    weights = jax.random.normal(jax.random.key(4), (7, 5, 12))
    def product(t, w):
        x, kernel = onednn.embedded_inputs(ids, t, w, dtype)
        return jnp.sum((x.astype(jnp.float32) @ kernel) * weights)

    reference = lambda t, w: jnp.sum((t[ids] @ w) * weights)
    tol = 2e-2 if dtype else 1e-5  # bf16: the rows (or the folded table) are rounded to bf16
    _close(product(table, w_x), reference(table, w_x), tol)
    for got, want in zip(jax.grad(product, argnums=(0, 1))(table, w_x),
                         jax.grad(reference, argnums=(0, 1))(table, w_x)):
        assert got.shape == want.shape
        _close(got, want, tol)


@needs_onednn
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("tokens", [False, True, "embedded-rows", "embedded-one-hot"],
                         ids=["features", "tokens", "embedded-rows", "embedded-one-hot"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype, tol", [(None, 2e-5), (jnp.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_onednn_matches_the_fused_layer_values_and_gradients(kind, tokens, reverse, dtype, tol):
    if dtype is not None and not onednn.supports(9, 6, 11, 32, dtype, kind):
        pytest.skip(f"oneDNN has no bf16 {kind} on this CPU")
    cell = (LSTMCell if kind == "lstm" else GRUCell)(32, dtype=dtype, token_inputs=bool(tokens))
    # embedded: an (11, E) table before the input kernel; E=5 runs oneDNN on the rows, E=40 on the one-hot
    embed = {"embedded-rows": 5, "embedded-one-hot": 40}.get(tokens, 0)
    if embed and reverse:
        pytest.skip("the input route does not depend on the direction; the token cases cover reverse")
    params = _perturbed(cell, embed or 11)  # every bias non-zero: the GRU's four oneDNN biases are sums of ours
    if embed:
        params["embedding"] = jax.random.normal(jax.random.key(9), (11, embed))
    batch = (3, 2)  # two batch axes: flattened for oneDNN and restored
    x = jax.random.randint(KEY, (*batch, 9), 0, 11) if tokens else jax.random.normal(KEY, (*batch, 9, 11))
    states = [0.5 * jax.random.normal(k, (*batch, 32)) for k in jax.random.split(KEY)]
    carry0 = LSTMCarry(*states) if kind == "lstm" else states[0]

    def loss(params, carry0, impl):
        carry, ys = scan_cell(cell, params, x, initial_carry=carry0, reverse=reverse, impl=impl)
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin((i + 1) * c)) for i, c in enumerate(jax.tree.leaves(carry)))

    v_o, g_o = jax.jit(jax.value_and_grad(lambda p, c: loss(p, c, "onednn"), argnums=(0, 1)))(params, carry0)
    v_f, g_f = jax.jit(jax.value_and_grad(lambda p, c: loss(p, c, "fused"), argnums=(0, 1)))(params, carry0)
    _close(v_o, v_f, tol)
    jax.tree.map(lambda a, b: _close(a, b, tol), g_o, g_f)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_o))
    # The program really contains the custom call (and the fused one does not).
    hlo = jax.jit(lambda p, c: loss(p, c, "onednn")).lower(params, carry0).as_text()
    assert f"lstm_jax_onednn_{kind}_forward" in hlo
    if embed:  # the embedding is really used: the same value as a plain token cell on the product of the two
        folded = {**{k: v for k, v in params.items() if k != "embedding"},
                  "input_kernel": params["embedding"] @ params["input_kernel"]}
        _close(v_o, loss(folded, carry0, "fused"), tol)


@needs_onednn
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_char_model_with_dropout_gives_the_same_loss_and_gradients(kind):
    model = CharLM(CharLMConfig(vocab_size=40, cell=kind, hidden_size=24, num_layers=2, dropout=0.2, embed_size=8))
    params = model.init(KEY)
    tokens = jax.random.randint(jax.random.key(1), (4, 13), 0, 40)

    def loss(params, impl):
        _, logits = model.apply(params, model.initial_carry(4), tokens[:, :-1], impl=impl,
                                dropout_key=jax.random.key(5))
        return cross_entropy(logits, tokens[:, 1:])

    (l_o, g_o), (l_f, g_f) = (jax.value_and_grad(loss)(params, impl) for impl in ("onednn", "fused"))
    np.testing.assert_allclose(l_o, l_f, rtol=1e-6)
    jax.tree.map(lambda a, b: _close(a, b, 2e-5), g_o, g_f)


@needs_onednn
def test_vmap_over_the_onednn_layer():
    cell = LSTMCell(8)
    params = cell.init(KEY, 5)
    xs = jax.random.normal(KEY, (3, 4, 6, 5))  # vmapped axis of 3, batch of 4, 6 steps
    run = lambda impl: jax.vmap(lambda x: scan_cell(cell, params, x, impl=impl)[1])(xs)
    _close(run("onednn"), run("fused"), 2e-5)


@needs_onednn
def test_trainer_on_onednn_resumes_exactly_and_learns(text_corpus, tmp_path, monkeypatch):
    """LSTM_JAX_ONEDNN=1 takes oneDNN for every LSTM layer; the Trainer's chunked steps then agree
    with the fused layer's to float32 rounding, and a run split in two equals one run bitwise."""
    from lstm_jax.charlm.checkpoint import Checkpointer

    train, val = split_documents(load_corpus(str(text_corpus)), 1992)
    train_ids = Vocabulary.from_text(train, val).encode(train)
    model = CharLM(CharLMConfig(int(train_ids.max()) + 1, hidden_size=16, num_layers=2, dropout=0.1))
    config = TrainConfig(batch_size=4, seq_len=20, chunk_steps=4)
    monkeypatch.setenv(onednn.ENV, "0")
    fused = Trainer(model, config, train_ids, epochs=1)
    fused_losses = fused.run_chunk(fused.init_state(), 8)[1]
    monkeypatch.setenv(onednn.ENV, "1")
    traced = []
    real = kernel.onednn_lstm
    monkeypatch.setattr(kernel, "onednn_lstm", lambda *a: traced.append(a[0].shape) or real(*a))
    trainer = Trainer(model, config, train_ids, epochs=1)
    state, full = trainer.run_chunk(trainer.init_state(), 8)
    assert len(traced) == 2  # both layers, traced once for all chunks
    np.testing.assert_allclose(full, fused_losses, rtol=1e-5)
    assert full[-1] < full[0]
    state, first = trainer.run_chunk(trainer.init_state(), 4)
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(4, state, {"epoch": 0})
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "run")
    restored, _ = ckpt.restore(Trainer(model, config, train_ids, epochs=1).init_state())
    ckpt.close()
    _, rest = Trainer(model, config, train_ids, epochs=1).run_chunk(restored, 4)
    np.testing.assert_array_equal(np.concatenate([first, rest]), full)


FOUR_DEVICES = """
import json, jax, jax.numpy as jnp, numpy as np
from lstm_jax import CharLM, CharLMConfig, parallel
from lstm_jax.charlm.model import cross_entropy
mesh = parallel.data_mesh()
model = CharLM(CharLMConfig(vocab_size=30, hidden_size=16, num_layers=2))
params = model.init(jax.random.key(0))
tokens = np.random.default_rng(1).integers(0, 30, (8, 21)).astype(np.int32)
def loss_fn(impl):
    def f(params, tokens):
        _, logits = model.apply(params, model.initial_carry(tokens.shape[0]), tokens[:, :-1], impl=impl)
        return cross_entropy(logits, tokens[:, 1:])
    return f
hlo = jax.jit(parallel.value_and_grad(loss_fn("onednn"), mesh)).lower(
    parallel.replicate(params, mesh), parallel.shard_batch(tokens, mesh)).as_text()
loss, grads = jax.jit(parallel.value_and_grad(loss_fn("onednn"), mesh))(
    parallel.replicate(params, mesh), parallel.shard_batch(tokens, mesh))
ref_loss, ref_grads = jax.value_and_grad(loss_fn("fused"))(params, tokens)
diff = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
print(json.dumps([jax.device_count(), float(loss), float(ref_loss), diff, "lstm_jax_onednn_lstm" in hlo]))
"""


@needs_onednn
def test_four_devices_on_onednn_equal_one_device_on_the_fused_layer():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    devices, loss, ref_loss, diff, custom_call = json.loads(out.stdout.strip().splitlines()[-1])
    assert devices == 4 and custom_call
    assert abs(loss - ref_loss) < 1e-6 and diff < 1e-5 and ref_loss > 3.0


@needs_onednn
def test_auto_measures_once_and_caches_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(plan, "ONEDNN_MIN_LAYER_FLOPS", 0)
    monkeypatch.setattr(plan, "ROUNDS", 1)
    monkeypatch.setattr(plan, "_memo", {})
    calls = []
    real = measure.onednn_layer
    monkeypatch.setattr(measure, "onednn_layer", lambda *a, **k: calls.append(a) or real(*a, **k))
    threads = onednn.pays(5, 4, 3, 8)
    entry, = [v for k, v in json.loads((tmp_path / "layouts.json").read_text()).items()
              if f"onednn-lstm|v{onednn.MEASURE_VERSION}|5x4x3x8" in k]
    assert entry["threads"] == threads and set(entry["seconds"]) >= {"fused", "1"}
    assert all(t > 0 for t in entry["seconds"].values())
    monkeypatch.setattr(plan, "_memo", {})  # a new process: reads the file, measures nothing
    assert onednn.pays(5, 4, 3, 8) == threads and len(calls) == 1
    gru = onednn.pays(5, 4, 3, 8, cell="gru")  # the GRU's choice is its own entry
    entry, = [v for k, v in json.loads((tmp_path / "layouts.json").read_text()).items()
              if f"onednn-gru|v{onednn.MEASURE_VERSION}|5x4x3x8" in k]
    assert entry["threads"] == gru and len(calls) == 2
    embedded = onednn.pays(5, 4, 3, 8, tokens=True, embed=2)  # through an embedding: another entry
    entry, = [v for k, v in json.loads((tmp_path / "layouts.json").read_text()).items() if "|tokens-embed2|" in k]
    assert entry["threads"] == embedded and set(entry["seconds"]) >= {"fused", "1"} and len(calls) == 3
    monkeypatch.setenv(onednn.ENV, "0")
    assert onednn.pays(5, 4, 3, 8) == 0


def test_onednn_refuses_what_it_does_not_run_with_one_clear_error():
    x = jnp.ones((2, 5, 3))
    for other in (GRUCell(4, reset_after=False), RNNCell(4)):
        with pytest.raises(ConfigError, match="impl='onednn' supports LSTMCell and GRUCell.reset_after=True."):
            scan_cell(other, other.init(KEY, 3), x, impl="onednn")
    lstm = LSTMCell(4)
    with pytest.raises(ConfigError, match="impl='onednn' supports LSTMCell"):
        scan_cell(lstm, lstm.init(KEY, 3), x, impl="onednn", seq_lengths=jnp.array([5, 3]))
    with pytest.raises(ConfigError, match="impl='cudnn' cannot run this layer: it needs a CUDA or ROCm device"):
        scan_cell(lstm, lstm.init(KEY, 3), x, impl="cudnn")
    with pytest.raises(ConfigError, match="impl must be"):
        scan_cell(lstm, lstm.init(KEY, 3), x, impl="cuda")
    # an embedding in the params: only before a token-input cell, and only (vocab, E) for an (E, G*H) kernel
    tokens = LSTMCell(4, token_inputs=True)
    for cell, table in ((lstm, jnp.ones((7, 3))), (tokens, jnp.ones((7, 2))), (tokens, jnp.ones((3,)))):
        with pytest.raises(ConfigError, match="an 'embedding' in the params needs a cell with token_inputs=True"):
            scan_cell(cell, {**cell.init(KEY, 3), "embedding": table}, jnp.ones((2, 5), jnp.int32))


def test_without_the_extension_auto_runs_the_fused_layer_and_onednn_says_why(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "0")
    assert not onednn.available() and onednn.unavailable_reason() == f"{onednn.ENV}=0"
    lstm = LSTMCell(4)
    params, x = lstm.init(KEY, 3), jnp.ones((2, 5, 3))
    hlo = jax.jit(lambda p: scan_cell(lstm, p, x, impl="auto")[1]).lower(params).as_text()
    assert "onednn" not in hlo
    with pytest.raises(ConfigError, match=f"impl='onednn' is not available here: {onednn.ENV}=0"):
        scan_cell(lstm, params, x, impl="onednn")
    monkeypatch.delenv(onednn.ENV)
    monkeypatch.setattr(kernel, "_state", {"lib": None, "reason": "the extension was not built"})  # as if absent
    assert not onednn.available() and onednn.unavailable_reason() == "the extension was not built"
    assert "onednn" not in jax.jit(lambda p: scan_cell(lstm, p, x, impl="auto")[1]).lower(params).as_text()


@needs_onednn
def test_a_call_leaves_the_process_openmp_thread_count_as_it_found_it():
    """The OpenMP runtime is shared with other libraries (PyTorch's libgomp has the same soname):
    a oneDNN call with its own thread count must put the calling thread's count back."""
    import ctypes

    gomp = ctypes.CDLL("libgomp.so.1")
    gomp.omp_set_num_threads(3)
    cell = LSTMCell(8)
    params, x = cell.init(KEY, 5), jnp.ones((2, 6, 5))
    for threads in (1, 2):
        run = jax.jit(lambda p: onednn.onednn_lstm(jnp.moveaxis(x, 1, 0), p["input_kernel"], p["recurrent_kernel"],
                                                   p["bias"], jnp.zeros((2, 8)), jnp.zeros((2, 8)), None, threads))
        jax.block_until_ready(run(params))
        assert gomp.omp_get_max_threads() == 3


ONE_THREAD_STARTS_NO_TEAM = """
import os, jax, jax.numpy as jnp
from lstm_jax import onednn
threads_now = lambda: len(os.listdir("/proc/self/task"))
x, w_x, w_h, b = jnp.ones((20, 32, 64)), jnp.ones((64, 512)) * 0.01, jnp.ones((128, 512)) * 0.01, jnp.zeros(512)
h0 = jnp.zeros((32, 128))
layer = lambda x, w_x: jnp.sum(onednn.onednn_lstm(x, w_x, w_h, b, h0, h0, jnp.bfloat16, 1)[2])
step = jax.jit(jax.grad(layer, argnums=(0, 1))).lower(x, w_x).compile()  # the primitives are created here
other = jax.jit(lambda x: jnp.tanh(x @ x.T)).lower(x[0]).compile()
for _ in range(3):
    jax.block_until_ready(other(x[0]))  # XLA's own threads are up
before = threads_now()
for _ in range(3):
    jax.block_until_ready(step(x, w_x))
print(before, threads_now())
"""


@needs_onednn
def test_a_one_thread_bf16_call_runs_on_the_calling_thread_alone():
    """A primitive runs with the thread count it was created with: a one-thread bf16 layer created
    at trace time (on a thread with more) once ran on two threads, from a second OpenMP team,
    which slowed every later multi-thread call of the process by half."""
    if not onednn.supports(20, 32, 64, 128, jnp.bfloat16):
        pytest.skip("oneDNN has no bf16 LSTM on this CPU")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", ONE_THREAD_STARTS_NO_TEAM], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert after == before, f"the calls started {after - before} thread(s)"


def _tiny_lm(text_corpus):
    train, val = split_documents(load_corpus(str(text_corpus)), 1992)
    train_ids = Vocabulary.from_text(train, val).encode(train)
    return CharLM(CharLMConfig(int(train_ids.max()) + 1, hidden_size=16, num_layers=1)), train_ids


@needs_onednn
def test_fastest_setup_times_whole_trainer_steps_for_each_layer_and_caches_the_answer(text_corpus, tmp_path,
                                                                                      monkeypatch):
    """The fused layer against 'auto' (here forced onto oneDNN) on real Trainer steps; the answer
    is the Trainer set-up to build, read back from the cache without timing anything."""
    from lstm_jax.charlm.training import fastest_setup

    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(onednn.ENV, "1")
    model, train_ids = _tiny_lm(text_corpus)
    config = TrainConfig(batch_size=4, seq_len=20, chunk_steps=4)
    setup = fastest_setup(model, config, train_ids, [1], steps=2, rounds=1)
    assert set(setup.seconds) == {"1:fused", "1:auto"} and all(s > 0 for s in setup.seconds.values())
    expected = "fused" if setup.seconds["1:fused"] < 1.1 * setup.seconds["1:auto"] else "auto"
    assert (setup.devices, setup.impl) == (1, expected)
    dropped = fastest_setup(CharLM(dataclasses.replace(model.config, output_dropout=0.1)), config, train_ids, [1],
                            steps=2, rounds=1)  # a dropout turned on: another program, timed
    monkeypatch.setattr(Trainer, "run_chunk", lambda *a: pytest.fail("measured again"))
    assert fastest_setup(model, config, train_ids, [1], steps=2, rounds=1) == setup
    # how much is dropped changes no step's cost: read back, not timed
    assert fastest_setup(CharLM(dataclasses.replace(model.config, output_dropout=0.3)), config, train_ids, [1],
                         steps=2, rounds=1) == dropped
    trainer = Trainer(model, config, train_ids, impl=setup.impl)  # what train.py then builds
    hlo = trainer.lower(trainer.init_state(), 2).as_text()
    assert ("lstm_jax_onednn" in hlo) == (setup.impl == "auto")


@needs_onednn
def test_fastest_setup_does_not_time_auto_where_it_compiles_to_the_fused_layer(text_corpus, tmp_path, monkeypatch):
    from lstm_jax.charlm.training import fastest_setup

    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    # a 16-unit layer is under ONEDNN_MIN_LAYER_FLOPS: 'auto' keeps it fused
    monkeypatch.delenv(onednn.ENV, raising=False)
    model, train_ids = _tiny_lm(text_corpus)
    setup = fastest_setup(model, TrainConfig(batch_size=4, seq_len=20), train_ids, [1], steps=2, rounds=1)
    assert (setup.devices, setup.impl, list(setup.seconds)) == (1, "fused", ["1:fused"])


@needs_onednn
def test_step_impls_offer_every_layer_on_onednn_only_where_a_layer_could_take_it(monkeypatch):
    monkeypatch.delenv(onednn.ENV, raising=False)
    assert plan.step_impls("lstm", 100, 32, 256) == ("fused", "auto", "onednn")
    assert plan.step_impls("gru", 100, 32, 256) == ("fused", "auto", "onednn")
    assert plan.step_impls("lstm", 20, 4, 16) == ("fused", "auto")  # under ONEDNN_MIN_LAYER_FLOPS
    assert plan.step_impls("lstm", 100, 32, 256, recurrent_dropout=True) == ("fused", "auto")  # no hook for it
    assert plan.step_impls("mingru", 100, 32, 256) == ("auto",)
    assert plan.step_impls("lstm", 100, 32, 256, platform="tpu") == ("auto",)
    monkeypatch.setenv(onednn.ENV, "0")
    assert plan.step_impls("lstm", 100, 32, 256) == ("auto",)  # oneDNN switched off: nothing to choose


@needs_onednn
def test_fastest_setup_times_every_layer_on_onednn_once(text_corpus, tmp_path, monkeypatch):
    """With the bound lowered, the tiny model's candidates are the fused layer, 'auto' and every
    layer on oneDNN; a candidate that compiles to an earlier one's program is not timed again."""
    import dataclasses

    from lstm_jax.charlm.training import fastest_setup

    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(onednn.ENV, raising=False)
    monkeypatch.setattr(plan, "ONEDNN_MIN_LAYER_FLOPS", 0)
    model, train_ids = _tiny_lm(text_corpus)
    config = TrainConfig(batch_size=4, seq_len=20, chunk_steps=2)
    setup = fastest_setup(model, config, train_ids, [1], steps=2, rounds=1)
    short = dataclasses.replace(config, chunk_steps=2)
    hlo = {impl: Trainer(model, short, train_ids, impl=impl).lower(Trainer(model, short, train_ids).init_state(), 2)
           .as_text() for impl in ("fused", "auto", "onednn")}  # the layers' choices are memoised: the same
    timed = {k.split(":")[1] for k in setup.seconds}
    assert "lstm_jax_onednn" in hlo["onednn"] and "lstm_jax_onednn" not in hlo["fused"]
    assert "fused" in timed and ("auto" in timed) == (hlo["auto"] != hlo["fused"])
    assert ("onednn" in timed) == (hlo["onednn"] not in (hlo["fused"], hlo["auto"])), setup.seconds
    assert f"{setup.devices}:{setup.impl}" in setup.seconds


def test_the_simplest_candidate_is_kept_unless_a_later_one_is_ten_percent_faster():
    from lstm_jax.dispatch.measure import simplest_fast_enough

    assert simplest_fast_enough({"1:fused": 1.0, "1:auto": 0.95, "2:fused": 0.93}) == "1:fused"
    assert simplest_fast_enough({"1:fused": 1.0, "1:auto": 0.85, "2:fused": 0.80, "2:auto": 0.70}) == "2:auto"
    assert simplest_fast_enough({"1:fused": 1.0, "1:auto": 0.85, "2:fused": 0.80, "2:auto": 0.78}) == "1:auto"


def test_trainer_names_a_wrong_impl():
    model = CharLM(CharLMConfig(10, hidden_size=8, num_layers=1))
    with pytest.raises(ConfigError,
                       match="impl must be one of 'auto', 'scan', 'fused', 'onednn', 'cudnn', 'parallel', got 'cuda'"):
        Trainer(model, TrainConfig(batch_size=2, seq_len=5), np.arange(200) % 10, impl="cuda")


def test_an_extension_built_against_a_newer_jaxlib_is_refused_with_a_reason(tmp_path):
    """XLA accepts FFI handlers built with older headers only: the loader reads the build's record
    and refuses a newer one (it would stop JAX's CPU backend), naming both versions."""
    import jaxlib

    record = tmp_path / "_onednn_lstm.build.json"
    record.write_text(json.dumps({"jaxlib": "999.0.0"}))
    reason = kernel._built_against_newer_jaxlib(record)
    assert reason.startswith("the extension was built against jaxlib 999.0.0, newer than this process's jaxlib "
                             f"{jaxlib.__version__}; reinstall")
    for same_or_older in (jaxlib.__version__, "0.7.1"):
        record.write_text(json.dumps({"jaxlib": same_or_older}))
        assert kernel._built_against_newer_jaxlib(record) is None
    record.write_text("{damaged")
    assert kernel._built_against_newer_jaxlib(record) is None  # no usable record: loaded as before
