"""Text generation: the prime run in one scanned pass, then one jitted ``lax.scan`` of sampling steps.

All samples are one batch: row ``i`` uses ``temperatures[i]`` (0 means greedy), so several
temperatures cost one scan. ``top_k`` and ``top_p`` (nucleus) filter the distribution first.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.errors import ConfigError
from lstm_jax.model import CharLM

__all__ = ["generate", "generate_stream", "check_sampling_args"]

Array = jax.Array
MAX_SCAN_STEPS = 8192


def check_sampling_args(temperatures: Sequence[float], length: int, top_k: int = 0, top_p: float = 1.0) -> None:
    bad = [t for t in temperatures if not t >= 0]
    if bad:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {bad[0]}; pass e.g. 0.5.")
    if not temperatures:
        raise ConfigError("Give at least one --temperature, e.g. 0.5.")
    if length <= 0:
        raise ConfigError(f"--length must be a positive number of characters, got {length}.")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {top_k}.")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (1 = off), got {top_p}.")


def _filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _sample(noise: Array, logits: Array, temperatures: Array, top_k: int, top_p: float) -> Array:
    """Categorical sampling as argmax(logits / T + Gumbel noise), greedy where T = 0."""
    logits = _filter_logits(logits, top_k, top_p)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperatures, 1e-6)[:, None]
    sampled = jnp.argmax(scaled + noise, axis=-1)
    return jnp.where(temperatures > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _prime(model: CharLM, params, prime: Array) -> tuple[Any, Array]:
    """Run the prime (``(S, P)`` token ids) through the model; returns (carry, last logits)."""
    carry, logits = model.apply(params, model.initial_carry((prime.shape[0],)), prime)
    return carry, logits[:, -1]


@functools.partial(jax.jit, static_argnames=("model", "top_k", "top_p"))
def _sample_scan(model: CharLM, params, carry, logits, step_keys, temperatures, top_k: int, top_p: float):
    params = model.fold_embedding(params)  # once, not once per character
    # The Gumbel noise of every step at once, outside the loop: the same draws as
    # jax.random.categorical(step_key, ...) would make inside it.
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape, logits.dtype))(step_keys)

    def body(state, step_noise):
        carry, logits = state
        token = _sample(step_noise, logits, temperatures, top_k, top_p)
        carry, next_logits = model.apply(params, carry, token[:, None])
        return (carry, next_logits[:, 0]), token

    (carry, logits), tokens = jax.lax.scan(body, (carry, logits), noise)
    return carry, logits, tokens.T


def generate_stream(model: CharLM, params, prime_ids: np.ndarray, temperatures: Sequence[float], length: int,
                    key: Array, *, top_k: int = 0, top_p: float = 1.0, chunk: int | None = None) -> Iterator[np.ndarray]:
    """Yield ``(num_samples, n)`` token chunks; ``chunk=None`` generates everything in one scan
    (in scans of at most ``MAX_SCAN_STEPS`` steps; the tokens are the same whatever the chunking).

    ``prime_ids`` (at least one id) is run through the model in one pass; row ``i`` samples at
    ``temperatures[i]``.
    """
    check_sampling_args(list(temperatures), length, top_k, top_p)
    if len(prime_ids) == 0:
        raise ConfigError("The prime text is empty after encoding; pass --prime with at least one known character.")
    temps = jnp.asarray(temperatures, jnp.float32)
    prime = jnp.broadcast_to(jnp.asarray(prime_ids, jnp.int32), (len(temperatures), len(prime_ids)))
    carry, logits = _prime(model, params, prime)
    step_keys = jax.random.split(key, length)  # the same samples whatever the chunking
    chunk = min(chunk or length, MAX_SCAN_STEPS)  # bounds the pre-drawn noise: steps x samples x vocab
    for start in range(0, length, chunk):
        carry, logits, tokens = _sample_scan(model, params, carry, logits, step_keys[start : start + chunk],
                                             temps, top_k, float(top_p))
        yield np.asarray(tokens)


def generate(model: CharLM, params, prime_ids: np.ndarray, temperatures: Sequence[float], length: int,
             key: Array, *, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """``(len(temperatures), length)`` generated token ids, from one jitted scan."""
    return next(generate_stream(model, params, prime_ids, temperatures, length, key, top_k=top_k, top_p=top_p))
