"""lstm_jax.runtime: the allocator setting (an explicit call, never an import's side effect), its opt-out,
and what it changes (page faults of a repeated jitted call, counted by the kernel; no timing)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Appended to each probe: the median minor page faults of ``calls`` calls of ``call()`` (the
# median, as a step of the tuned run may still fault its temporaries in once while the heap settles)
MEDIAN_FAULTS = r"""
import json, resource
import lstm_jax
lstm_jax.runtime.tune_malloc()

def report(call, calls):
    faults = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        call()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"tuned": lstm_jax.runtime.malloc_tuned(), "faults": sorted(faults)[calls // 2]}))
"""

PROBE = r"""
import jax, jax.numpy as jnp, optax
from lstm_jax import CharLM, CharLMConfig, cross_entropy

# a library user's own train step, one step per call (the seed LSTM: B=128, T=40, H=128)
model = CharLM(CharLMConfig(92, hidden_size=128, num_layers=1, embed_size=64))
tx = optax.rmsprop(1e-3)
loss = lambda p, x: cross_entropy(model.apply(p, None, x)[1], x)

@jax.jit
def step(p, o, x):
    g = jax.grad(loss)(p, x)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

p = model.init(jax.random.PRNGKey(0))
state, x = [p, tx.init(p)], jax.random.randint(jax.random.PRNGKey(1), (128, 40), 0, 92)

def call():
    state[:] = jax.block_until_ready(step(*state, x))

for _ in range(3):
    call()
report(call, 15)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting applies to glibc only")


def _probe(script: str = PROBE, *argv: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "LSTM_JAX_MALLOC"} | env
    environ["JAX_PLATFORMS"] = "cpu"
    # XLA's own temporaries only: a layer measured faster on oneDNN runs on the extension's thread,
    # whose malloc arena made the tuned count vary from 3 to 7,000 faults per step between runs
    environ["LSTM_JAX_ONEDNN"] = "0"
    out = subprocess.run([sys.executable, "-c", MEDIAN_FAULTS + script, *argv], env=environ, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tune_malloc_keeps_freed_memory_for_the_next_call_and_can_be_opted_out():
    tuned, default = _probe(), _probe(LSTM_JAX_MALLOC="default")
    assert tuned["tuned"] and not default["tuned"]
    # the median step: glibc's defaults give the step's freed temporaries back to the kernel and
    # fault them in again at the next call (about 8,700 faults of 4 KiB per step measured); tuned,
    # the next call reuses the pages the last one freed (0 in most steps: while the heap settles,
    # an early step may still fault its temporaries in once, which a mean over 10 steps counted)
    assert default["faults"] > 1000, default
    assert tuned["faults"] < default["faults"] / 4, (tuned, default)


def test_tune_malloc_is_idempotent_and_honours_the_environment(monkeypatch):
    from lstm_jax import runtime

    monkeypatch.setenv("LSTM_JAX_MALLOC", "default")
    assert runtime.tune_malloc() is False
    monkeypatch.delenv("LSTM_JAX_MALLOC")
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.tune_malloc() is expected and runtime.tune_malloc() is expected


BIG_TEMPORARY = r"""
import sys
import jax, jax.numpy as jnp
if sys.argv[1] == "sync":
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # before the first computation

@jax.jit
def f(x):
    t = jnp.cumsum(x, axis=0)  # a 96 MiB temporary, more than a thread's malloc heap (64 MiB)
    return (t[::-1] * x).sum()

x = jnp.ones((6144, 4096), jnp.float32)
for _ in range(3):
    f(x).block_until_ready()
report(lambda: f(x).block_until_ready(), 9)
"""


@glibc_only
def test_synchronous_dispatch_reuses_temporaries_too_big_for_a_worker_threads_arena():
    # What the README recommends for a large model trained one step per call: with JAX's default
    # asynchronous dispatch a one-device program runs on a worker thread, whose malloc arena maps
    # a block over 64 MiB with mmap whatever M_MMAP_MAX says (about 50,000 faults of 4 KiB per
    # call here); run on the calling thread, the block comes from the main heap and is reused
    asynchronous, synchronous = _probe(BIG_TEMPORARY, "async"), _probe(BIG_TEMPORARY, "sync")
    assert asynchronous["tuned"] and synchronous["tuned"]
    assert asynchronous["faults"] > 10_000, asynchronous
    assert synchronous["faults"] < asynchronous["faults"] / 10, (synchronous, asynchronous)
