"""Training, checkpoints and exact resume, sampling, and the command-line scripts, end to end."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lstm_jax.charlm import sample as sample_script
from lstm_jax.charlm import train as train_script
from lstm_jax.charlm.checkpoint import Checkpointer, load_run
from lstm_jax.charlm.data import Vocabulary, load_corpus, split_documents
from lstm_jax.charlm.model import CharLM, CharLMConfig
from lstm_jax.charlm.sampling import generate, generate_stream
from lstm_jax.charlm.training import TrainConfig, Trainer, eval_params, evaluate_bpc, make_optimizer
from lstm_jax.core.cells import make_cell
from lstm_jax.core.errors import ConfigError
from lstm_jax.layers.sequence import RecurrentStack

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "16", "--num-layers", "2", "--batch-size", "4", "--seq-len", "20", "--chunk-steps", "3",
        "--sample-length", "30", "--eval-streams", "2"]


def _ids(text_corpus):
    corpus = load_corpus(str(text_corpus))
    train, val = split_documents(corpus, 1992)
    vocab = Vocabulary.from_text(train, val)
    return vocab, vocab.encode(train), vocab.encode(val)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_folded_embedding_equals_embedding_then_projection(cell):
    """CharLM folds the embedding into the first input kernel; values and gradients must equal
    the textbook order (gather embeddings, then project them) computed with the unfolded stack."""
    model = CharLM(CharLMConfig(11, cell=cell, hidden_size=8, num_layers=2, embed_size=5))
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    plain = RecurrentStack(make_cell(cell, 8), num_layers=2)

    def reference(p):
        _, ys = plain.apply(p["rnn"], p["embedding"][tokens])
        return ys @ p["head"]["kernel"] + p["head"]["bias"]

    def folded(p):
        return model.apply(p, None, tokens)[1]

    np.testing.assert_allclose(folded(params), reference(params), atol=1e-5)
    np.testing.assert_allclose(model.apply(model.fold_embedding(params), None, tokens)[1], folded(params), atol=1e-6)
    g_ref = jax.grad(lambda p: (reference(p) ** 2).mean())(params)
    g_fold = jax.grad(lambda p: (folded(p) ** 2).mean())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_fold, g_ref)
    assert float(jnp.abs(g_fold["embedding"]).max()) > 0


def test_output_dropout_drops_the_last_layer_outputs_with_one_mask_per_sequence():
    """With a key, the head sees the last layer's outputs times one keep-mask per sequence (the same
    units zeroed at every step, the kept ones scaled by 1/(1-p)); each sequence's mask comes from its
    own key; without a key the model is the one without output dropout."""
    hidden, vocab, p = 4, 9, 0.5
    model = CharLM(CharLMConfig(vocab, hidden_size=hidden, num_layers=2, embed_size=3, output_dropout=p))
    params = model.init(jax.random.key(0))
    params["head"] = {"kernel": jnp.eye(hidden, vocab), "bias": jnp.zeros(vocab)}  # logits[..., :H] = the outputs
    tokens = jax.random.randint(jax.random.key(1), (64, 6), 0, vocab)
    keys = jax.random.split(jax.random.key(2), 64)
    plain = CharLM(dataclasses.replace(model.config, output_dropout=0.0))
    ys = np.asarray(plain.apply(params, None, tokens, dropout_key=keys)[1][..., :hidden])
    np.testing.assert_array_equal(model.apply(params, None, tokens)[1], plain.apply(params, None, tokens)[1])
    dropped = np.asarray(model.apply(params, None, tokens, dropout_key=keys)[1][..., :hidden])
    kept = dropped != 0
    assert (kept == kept[:, :1]).all()  # one mask per sequence: the same units at every step
    np.testing.assert_allclose(dropped[kept], ys[kept] / (1 - p), rtol=1e-6)
    assert 0.3 < kept[:, 0].mean() < 0.7 and len({tuple(m) for m in kept[:, 0]}) > 4  # masks differ by sequence
    half = np.asarray(model.apply(params, None, tokens[:8], dropout_key=keys[:8])[1][..., :hidden])
    np.testing.assert_allclose(half, dropped[:8], rtol=1e-6)  # a sequence's mask is its key's alone
    with pytest.raises(ConfigError, match=r"output_dropout must be in \[0, 1\)"):
        CharLMConfig(vocab, output_dropout=1.0)


@pytest.mark.parametrize("preset", [pytest.param("lm", marks=pytest.mark.gpu), "keras"])
def test_resume_equals_uninterrupted_training_bitwise(text_corpus, tmp_path, preset):
    vocab, train_ids, _ = _ids(text_corpus)
    model = CharLM(CharLMConfig(len(vocab), hidden_size=16, num_layers=2, dropout=0.1))
    config = TrainConfig(preset=preset, batch_size=4, seq_len=20, chunk_steps=4)
    trainer = Trainer(model, config, train_ids, epochs=2)
    spe = trainer.steps_per_epoch
    assert spe > 6

    state, full = trainer.init_state(), []
    for _ in range(2):
        state, losses = trainer.train_epoch(state)
        full.append(losses)
    full = np.concatenate(full)

    # Interrupted mid-epoch at a chunk boundary, saved, restored by a fresh trainer and checkpointer.
    state = trainer.init_state()
    state, first = trainer.run_chunk(state, 4)
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(4, state, {"epoch": 0})
    ckpt.close()
    trainer2 = Trainer(model, config, train_ids, epochs=2)
    ckpt = Checkpointer(tmp_path / "run")
    restored, _ = ckpt.restore(trainer2.init_state())
    ckpt.close()
    rest = []
    while int(restored.step) < 2 * spe:
        restored, losses = trainer2.train_epoch(restored)
        rest.append(losses)
    np.testing.assert_array_equal(np.concatenate([first] + rest), full)
    # final params equal those of the uninterrupted run
    state_full = trainer.init_state()
    for _ in range(2):
        state_full, _ = trainer.train_epoch(state_full)
    jax.tree.map(np.testing.assert_array_equal, restored.params, state_full.params)


@pytest.mark.gpu
def test_training_lowers_the_loss_and_compiles_once(text_corpus):
    vocab, train_ids, val_ids = _ids(text_corpus)
    model = CharLM(CharLMConfig(len(vocab), hidden_size=32, num_layers=1))
    trainer = Trainer(model, TrainConfig(batch_size=4, seq_len=25, chunk_steps=5, learning_rate=1e-2), train_ids)
    state = trainer.init_state()
    before = evaluate_bpc(model, state.params, val_ids, 2)
    for _ in range(6):
        state, _ = trainer.train_epoch(state)
    after = evaluate_bpc(model, state.params, val_ids, 2)
    assert after < before - 1.0, (before, after)
    assert trainer._chunk._cache_size() <= 2  # one shape per chunk length: full and remainder


def test_evaluate_bpc_scores_every_character_once(text_corpus):
    vocab, _, val_ids = _ids(text_corpus)
    model = CharLM(CharLMConfig(len(vocab), hidden_size=8, num_layers=1))
    params = model.init(jax.random.PRNGKey(0))
    _, logits = model.apply(params, model.initial_carry(()), val_ids[:-1])
    logp = jax.nn.log_softmax(logits)
    expected = -float(np.mean(np.asarray(logp)[np.arange(len(val_ids) - 1), val_ids[1:]])) / np.log(2)
    assert abs(evaluate_bpc(model, params, val_ids, streams=1, chunk_len=64) - expected) < 1e-4


def test_generation_temperatures_greedy_and_chunking(text_corpus):
    vocab, train_ids, _ = _ids(text_corpus)
    model = CharLM(CharLMConfig(len(vocab), hidden_size=16, num_layers=1))
    params = model.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    out = generate(model, params, train_ids[:10], [0.0, 0.0, 1.0], 40, key)
    assert out.shape == (3, 40)
    np.testing.assert_array_equal(out[0], out[1])  # greedy is deterministic
    # greedy equals argmax decoding step by step
    carry, logits = model.apply(params, model.initial_carry(()), train_ids[:10])
    token, expected = int(np.argmax(logits[-1])), []
    for _ in range(10):
        expected.append(token)
        carry, logits = model.apply(params, carry, np.array([token]))
        token = int(np.argmax(logits[-1]))
    np.testing.assert_array_equal(out[0, :10], expected)
    chunks = np.concatenate(list(generate_stream(model, params, train_ids[:10], [0.0, 0.0, 1.0], 40, key, chunk=16)), 1)
    np.testing.assert_array_equal(chunks, out)
    top1 = generate(model, params, train_ids[:10], [1.5], 20, key, top_k=1)
    np.testing.assert_array_equal(top1[0], out[0, :20])


def test_sampling_equals_categorical_draws_step_by_step():
    """The scan pre-draws each step's Gumbel noise; the tokens must be those that
    jax.random.categorical(step_key, logits / T) gives one step at a time."""
    model = CharLM(CharLMConfig(13, hidden_size=16, num_layers=2, embed_size=4))
    params = model.init(jax.random.PRNGKey(0))
    key, prime, temps = jax.random.PRNGKey(5), np.array([1, 2, 3]), [0.7, 1.3]
    out = generate(model, params, prime, temps, 25, key)
    carry, logits = model.apply(params, model.initial_carry((2,)), np.tile(prime, (2, 1)))
    logits, expected = logits[:, -1], []
    for step_key in [jax.random.fold_in(key, i) for i in range(25)]:
        token = jax.random.categorical(step_key, logits / jnp.array(temps)[:, None], axis=-1)
        expected.append(np.asarray(token))
        carry, logits = model.apply(params, carry, token[:, None])
        logits = logits[:, 0]
    np.testing.assert_array_equal(out, np.stack(expected, 1))
    assert len(set(out[0].tolist())) > 3  # really sampled, not stuck on one character


# --- the scripts ----------------------------------------------------------------------------------

def _train(args):
    return train_script.main([str(a) for a in args])


def test_weight_average_is_the_ema_of_the_trained_weights_and_resumes_bitwise(text_corpus, tmp_path):
    """``TrainConfig.ema_decay``: after every step ema = d * ema + (1 - d) * params, from the initial
    weights (Keras's use_ema), kept in the optimizer state, so a checkpoint round trip continues it."""
    vocab, train_ids, _ = _ids(text_corpus)
    model = CharLM(CharLMConfig(len(vocab), hidden_size=16, num_layers=1))
    config = TrainConfig(batch_size=4, seq_len=20, chunk_steps=1, learning_rate=1e-2, ema_decay=0.8)
    trainer = Trainer(model, config, train_ids)
    state = trainer.init_state()
    average = jax.tree.map(np.asarray, state.params)
    for _ in range(5):
        state, _ = trainer.run_chunk(state, 1)
        average = jax.tree.map(lambda e, p: 0.8 * e + 0.2 * np.asarray(p), average, state.params)
    got = eval_params(state.params, state.opt_state)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7), got, average)
    gap = max(float(np.abs(np.asarray(g) - np.asarray(p)).max()) for g, p in
              zip(jax.tree.leaves(got), jax.tree.leaves(state.params)))
    assert gap > 1e-4  # the average is not the weights themselves
    no_average = Trainer(model, dataclasses.replace(config, ema_decay=0.0), train_ids).init_state()
    assert eval_params(state.params, no_average.opt_state) is state.params

    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(5, state, {"epoch": 0})
    ckpt.close()
    trainer2 = Trainer(model, config, train_ids)
    ckpt = Checkpointer(tmp_path / "run")
    restored, _ = ckpt.restore(trainer2.init_state())
    ckpt.close()
    state, _ = trainer.run_chunk(state, 3)
    restored, _ = trainer2.run_chunk(restored, 3)
    jax.tree.map(np.testing.assert_array_equal, eval_params(restored.params, restored.opt_state),
                 eval_params(state.params, state.opt_state))


@pytest.mark.parametrize("name", ["rmsprop", "adam", "sgd", "adamw"])
def test_weight_decay_is_decoupled_and_scaled_by_the_scheduled_rate(name):
    """``weight_decay=wd`` adds ``-lr_t * wd * w`` to the optimizer's update of every matrix and
    nothing to the biases, whatever the optimizer (the AdamW rule; adamw's own default replaced)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(3)]
    base = "adam" if name == "adamw" else name  # adamw without decay is adam
    with_decay = make_optimizer(name, 0.01, schedule="cosine", total_steps=3, weight_decay=0.5)
    plain = make_optimizer(base, 0.01, schedule="cosine", total_steps=3)
    s1, s0 = with_decay.init(params), plain.init(params)
    for step, g in enumerate(grads):
        u1, s1 = with_decay.update(g, s1, params)
        u0, s0 = plain.update(g, s0, params)
        lr = 0.01 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / 3)))  # the cosine to 10%
        np.testing.assert_allclose(u1["w"] - u0["w"], -lr * 0.5 * params["w"], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(u1["b"], u0["b"], rtol=1e-6, atol=1e-8)
        params = optax.apply_updates(params, u1)


def test_adamw_weight_decay_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
    tx = make_optimizer("adamw", 1e-2, weight_decay=0.1)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    ref = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, eps=1e-8)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        ref.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params["w"], ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_train_and_sample_scripts_end_to_end(text_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(["--corpus", text_corpus, "--run-dir", run, "--epochs", 2, *TINY]) == 0
    out = capsys.readouterr().out
    assert "validation bpc" in out and "temperature 0.2" in out and "temperature 1.2" in out
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and (run / "bpc.png").stat().st_size > 1000
    config = json.loads((run / "config.json").read_text())
    assert config["vocab"] and config["model"]["hidden_size"] == 16
    assert sample_script.main(["--checkpoint", str(run), "--prime", "The state", "--length", "25"]) == 0
    assert capsys.readouterr().out.startswith("The state")
    assert sample_script.main(["--checkpoint", str(run), "--which", "best", "--temperature", "0", "0.5", "1.0",
                               "--length", "15", "--num-samples", "2", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.count("----- temperature") == 6


def test_cli_resume_after_sigkill_equals_uninterrupted(text_corpus, tmp_path):
    """Kill a real train.py after its first checkpoint, rerun the same command: same metrics, same params.

    Every run is its own train.py process, as a user runs them: the device split and the layers
    are chosen by measurement, cached per process layout, so all three read one choice (an
    in-process run, with this test process's devices, could measure a different one)."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--corpus", str(text_corpus), "--epochs", "3", "--dropout", "0.2", "--recurrent-dropout", "0.25",
             "--output-dropout", "0.3", "--ema-decay", "0.9", "--weight-decay", "0.01", *TINY]  # all of them resume
    command = lambda run: [sys.executable, str(ROOT / "train.py"), "--run-dir", str(run), *flags]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    done = subprocess.run(command(a), **quiet, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    proc = subprocess.Popen(command(b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((b / "checkpoints").glob("[0-9]*")) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(command(b), **quiet, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_bpc"], r["val_bpc"]) for r in rows(a)] == [(r["train_bpc"], r["val_bpc"]) for r in rows(b)]
    model_a, pa, _, _ = load_run(a)
    _, pb, _, _ = load_run(b)
    assert model_a.config.recurrent_dropout == 0.25 and model_a.stack.recurrent_dropout == 0.25  # round trip
    assert model_a.config.output_dropout == 0.3
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_cli_bad_inputs_get_one_line_errors(text_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on.\n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    cases = [
        (["--corpus", empty, "--run-dir", tmp_path / "r1"], "empty"),
        (["--corpus", binary, "--run-dir", tmp_path / "r2"], "binary"),
        (["--corpus", short, "--run-dir", tmp_path / "r3"], "too short"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r4", "--resume"], "holds no run"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r5", "--learning-rate", "-1"], "learning-rate"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r6", "--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r7", "--weight-decay", "-0.1"],
         "--weight-decay must be a number >= 0"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r8", "--output-dropout", "1"],
         "--output-dropout must be in [0, 1)"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r9", "--dropout", "1"], "--dropout must be in [0, 1)"),
        # options the model, the trainer or the epoch's end would meet only later: refused before anything is written
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r10", "--hidden-size", "0"], "--hidden-size must be"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r11", "--clip-norm", "-1"], "--clip-norm must be >= 0"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r12", "--sample-length", "0"],
         "--sample-length must be a positive number"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r13", "--temperatures", "0.5", "-1"],
         "--temperatures must be >= 0"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r14", "--epochs", "0"], "--epochs must be at least 1"),
        (["--corpus", text_corpus, "--run-dir", tmp_path / "r15", "--keep", "0"], "--keep must be at least 1"),
    ]
    for args, message in cases:
        assert _train(args[:4] + TINY + args[4:]) == 2  # the flag under test last, over TINY's
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert not (Path(args[3]) / "config.json").exists(), args

    assert _train(["--corpus", text_corpus, "--run-dir", run, "--epochs", 1, *TINY]) == 0
    capsys.readouterr()
    assert _train(["--run-dir", run, "--epochs", 2, "--hidden-size", "32"]) == 2
    assert "trained with --hidden-size 16 but 32 was given" in capsys.readouterr().err
    for args, message in [(["--checkpoint", tmp_path], "not an lstm_jax run folder"),
                          (["--checkpoint", tmp_path / "missing"], "does not exist"),
                          (["--checkpoint", run, "--prime", "Zebra\u00e9"], "outside the model's vocabulary"),
                          (["--checkpoint", run, "--temperature", "-0.5"], "must be >= 0"),
                          (["--checkpoint", run, "--length", "0"], "positive number")]:
        assert sample_script.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(text_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(["--corpus", text_corpus, "--run-dir", run, "--epochs", 1, *TINY]) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    _, params, _, _ = load_run(run)
    capsys.readouterr()
    assert _train(["--run-dir", run, "--epochs", 2, "--learning-rate", "1e37"]) == 3
    err = capsys.readouterr().err.strip()
    assert "training loss became" in err and "last good checkpoint is kept" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "metrics.jsonl").read_text() == metrics
    _, params_after, _, _ = load_run(run)
    jax.tree.map(np.testing.assert_array_equal, params, params_after)


def test_sigkill_during_training_loses_at_most_the_work_since_the_last_checkpoint(text_corpus, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "--corpus", str(text_corpus), "--run-dir", str(run),
            "--epochs", "400", *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((run / "checkpoints").glob("[0-9]*"))) < 3:
            time.sleep(0.05)
        assert len(list((run / "checkpoints").glob("[0-9]*"))) >= 3, "training made no checkpoints"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _, _, _, meta = load_run(run)  # the latest complete checkpoint restores
    saved_epoch = meta["epoch"]
    assert saved_epoch >= 2
    assert _train(["--run-dir", str(run), "--epochs", str(saved_epoch + 1)]) == 0
    _, _, _, meta = load_run(run)
    assert meta["epoch"] == saved_epoch + 1


@pytest.mark.skipif(not os.environ.get("NLTK_DATA"), reason="needs NLTK_DATA with state_union")
def test_keras_preset_runs_on_the_real_corpus_briefly(tmp_path):
    from conftest import nltk_state_union_available

    if not nltk_state_union_available():
        pytest.skip("NLTK's state_union data not found")
    vocab_corpus = load_corpus("state_union")
    train, val = split_documents(vocab_corpus, 2002)
    vocab = Vocabulary.from_text(train, val)
    model = CharLM(CharLMConfig(len(vocab), hidden_size=128, num_layers=1))
    trainer = Trainer(model, TrainConfig(preset="keras", seq_len=40, window_step=3, batch_size=128,
                                         learning_rate=0.01, clip_norm=0.0, chunk_steps=20), vocab.encode(train))
    assert trainer.num_windows == (len(vocab.encode(train)) - 41) // 3 + 1
    state, losses = trainer.run_chunk(trainer.init_state(), 20)
    assert losses[-1] < losses[0]


def test_scan_steps_equals_one_jitted_step_per_batch_and_donates_the_state():
    """A user's own step (CharLM + optax) k times in one call: the same losses and params as k calls."""
    import optax

    from lstm_jax import ConfigError, cross_entropy, scan_steps

    model = CharLM(CharLMConfig(vocab_size=20, hidden_size=16, num_layers=2, dropout=0.1))
    tx = optax.rmsprop(1e-2)

    def step(state, batch):
        params, opt_state = state
        x, y, key = batch
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(
                model.apply(p, None, x, dropout_key=jax.random.split(key, x.shape[0]))[1], y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, "step_key": key}

    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (5, 4, 13), 0, 20)
    keys = jax.random.split(jax.random.key(2), 5)
    batches = (ids[..., :-1], ids[..., 1:], keys)

    one = jax.jit(step)
    state, losses = (params, tx.init(params)), []
    for i in range(5):
        state, metrics = one(state, jax.tree.map(lambda b: b[i], batches))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]

    start = (params, tx.init(params))
    start = jax.tree.map(jnp.copy, start)
    many_state, many_metrics = scan_steps(step)(start, batches)
    np.testing.assert_allclose(many_metrics["loss"], losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), many_state, state)
    assert jax.random.key_data(many_metrics["step_key"]).shape[0] == 5
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(start))  # donated: given to the new state
    kept = jax.tree.map(jnp.copy, state)
    scan_steps(step, donate_state=False)(kept, batches)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))

    with pytest.raises(ConfigError, match=r"same leading \(step\) axis.*jnp.stack"):
        scan_steps(step)(kept, (ids[:3, :, :-1], ids[..., 1:], keys))
