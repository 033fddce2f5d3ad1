"""Bad and unusual input: long samples, damaged checkpoints, leftovers, locked run folders, odd text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import sample as sample_script
import train as train_script
from lstm_jax.errors import ConfigError
from lstm_jax.model import CharLM, CharLMConfig
from lstm_jax.sampling import MAX_SCAN_STEPS, generate, generate_stream

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "16", "--num-layers", "1", "--batch-size", "4", "--seq-len", "20", "--chunk-steps", "3",
        "--sample-length", "30", "--eval-streams", "2"]


@pytest.fixture(scope="module")
def tiny_model():
    model = CharLM(CharLMConfig(12, hidden_size=8, num_layers=1))
    return model, model.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("length", [1, MAX_SCAN_STEPS - 1, MAX_SCAN_STEPS, MAX_SCAN_STEPS + 1, 20000])
def test_every_path_returns_exactly_length_characters(tiny_model, length):
    model, params = tiny_model
    key, temps = jax.random.PRNGKey(3), [0.5, 1.0]
    out = generate(model, params, np.array([1, 2]), temps, length, key)
    assert out.shape == (2, length)
    for chunk in (None, 1000, MAX_SCAN_STEPS + 5):
        streamed = np.concatenate(list(generate_stream(model, params, np.array([1, 2]), temps, length, key,
                                                       chunk=chunk)), axis=1)
        np.testing.assert_array_equal(streamed, out)  # streamed and one-shot are the same characters


def test_generate_refuses_an_output_that_cannot_fit(tiny_model):
    model, params = tiny_model
    with pytest.raises(ConfigError, match="stream it with generate_stream"):
        generate(model, params, np.array([1]), [1.0], 10**12, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="chunk must be a positive"):
        next(generate_stream(model, params, np.array([1]), [1.0], 10, jax.random.PRNGKey(0), chunk=0))


def test_a_stream_of_a_million_characters_runs_in_bounded_memory(tmp_path):
    """Peak RSS grows by far less than the output would take (10^9 characters would be 4 GB)."""
    code = """
import resource, sys, jax, numpy as np
from lstm_jax.model import CharLM, CharLMConfig
from lstm_jax.sampling import generate_stream
model = CharLM(CharLMConfig(12, hidden_size=8, num_layers=1))
params = model.init(jax.random.PRNGKey(0))
stream = generate_stream(model, params, np.array([1]), [1.0], 10**9, jax.random.PRNGKey(0), chunk=4096)
first = next(stream)
for _ in range(3):
    next(stream)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
total = 4 * 4096
for chunk in stream:
    total += chunk.shape[1]
    if total >= 10**6:
        break
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, total)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth, total = map(int, proc.stdout.split())
    assert total >= 10**6 and growth < 32 * 2**20, (growth, total)


def _trained_run(text_corpus, tmp_path, epochs=3, *extra):
    run = tmp_path / "run"
    assert train_script.main([str(a) for a in ["--corpus", text_corpus, "--run-dir", run, "--epochs", epochs,
                                                *TINY, *extra]]) == 0
    return run


def test_sample_script_prints_exactly_length_characters(text_corpus, tmp_path, capsys):
    run = _trained_run(text_corpus, tmp_path, 1, "--sample-length", MAX_SCAN_STEPS + 1)
    out = capsys.readouterr().out
    sample = out.split("----- temperature 0.2:\n", 1)[1].split("\n----- temperature", 1)[0]
    assert len(sample) == 40 + MAX_SCAN_STEPS + 1 + 1  # prime, sample, the f-string's closing newline
    for temps in (["0.5"], ["0.5", "1.0"]):
        assert sample_script.main(["--checkpoint", str(run), "--prime", "The", "--length", str(MAX_SCAN_STEPS + 1),
                                   "--temperature", *temps]) == 0
        out = capsys.readouterr().out
        if len(temps) == 1:
            assert len(out) == len("The") + MAX_SCAN_STEPS + 1 + 1
        else:
            body = out.split("----- temperature 1.0:\n", 1)[1]
            assert len(body) == len("The") + MAX_SCAN_STEPS + 1 + 2
    assert sample_script.main(["--checkpoint", str(run), "--num-samples", "0"]) == 2
    assert "--num-samples" in capsys.readouterr().err
