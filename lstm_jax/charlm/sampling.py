"""Text generation: the prime run in one scanned pass, then one jitted ``lax.scan`` of sampling steps.

All samples are one batch: row ``i`` uses ``temperatures[i]`` (0 means greedy), so several
temperatures cost one scan. ``top_k`` and ``top_p`` (nucleus) filter the distribution first.

Step ``i`` draws with ``jax.random.fold_in(key, i)``, so the characters do not depend on how the
output is cut into scans, and a stream of any length runs in memory bounded by its chunk.

By default the state carries on from the prime through every generated character. With
``window=W`` each character is drawn from the model run afresh, from a zero state, over the last
``W`` characters, as the lesson's Keras loop (``model.predict`` on the last 40 characters) does:
a model trained on windows then sees what it was trained on, at ``W`` steps per character.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.charlm.model import CharLM
from lstm_jax.core.errors import ConfigError

__all__ = ["generate", "generate_stream", "check_sampling_args", "check_window", "default_max_bytes"]

Array = jax.Array
MAX_SCAN_STEPS = 8192  # steps per scan: bounds the pre-drawn noise, steps x samples x vocab


def check_sampling_args(temperatures: Sequence[float], length: int, top_k: int = 0, top_p: float = 1.0) -> None:
    bad = [t for t in temperatures if not t >= 0]
    if bad:
        raise ConfigError(f"temperatures must be >= 0 (0 = greedy), got {bad[0]}; pass e.g. 0.5.", "temperatures")
    if not temperatures:
        raise ConfigError("No samples were asked for: give at least one temperature (e.g. 0.5) and at least one "
                          "sample.", "temperatures")
    if length <= 0:
        raise ConfigError(f"length must be a positive number of characters, got {length}.", "length")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}.", "top_k")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {top_p}.", "top_p")


def check_window(window: int, prime_length: int) -> None:
    """``ConfigError`` unless ``window`` is 0 or a positive int no longer than the prime."""
    if not isinstance(window, int) or window < 0:
        raise ConfigError(f"window must be an int >= 0 (0 = carry the state on), got {window!r}.", "window")
    if window > prime_length:
        raise ConfigError(f"window={window} needs a prime of at least {window} characters, but the prime has "
                          f"{prime_length}; pass a longer prime or a smaller window.", "window")


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


@functools.partial(jax.jit, static_argnames=("model", "top_k", "top_p"))
def _sample_scan_window(model: CharLM, params, window, logits, step_keys, temperatures, top_k: int, top_p: float):
    """As ``_sample_scan``, each step's logits from a zero state over the last ``W`` tokens (``window (S, W)``)."""
    params = model.fold_embedding(params)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape, logits.dtype))(step_keys)
    zero = model.initial_carry((window.shape[0],))

    def body(state, step_noise):
        window, logits = state
        token = _sample(step_noise, logits, temperatures, top_k, top_p)
        window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
        _, next_logits = model.apply(params, zero, window)
        return (window, next_logits[:, -1]), token

    (window, logits), tokens = jax.lax.scan(body, (window, logits), noise)
    return window, logits, tokens.T


def generate_stream(model: CharLM, params, prime_ids: np.ndarray, temperatures: Sequence[float], length: int,
                    key: Array, *, top_k: int = 0, top_p: float = 1.0, chunk: int | None = None,
                    window: int = 0) -> Iterator[np.ndarray]:
    """Yield ``(num_samples, n)`` token chunks, ``length`` tokens per row in all, ``n <= chunk``
    (default ``MAX_SCAN_STEPS``); the tokens are the same whatever the chunking.

    ``prime_ids`` (at least one id) is run through the model in one pass; row ``i`` samples at
    ``temperatures[i]``. Memory is bounded by the chunk, whatever ``length``. ``window=W > 0``
    draws each character from the model run from a zero state over the last ``W`` characters
    (the prime needs at least ``W``); ``0`` carries the state on.
    """
    check_sampling_args(list(temperatures), length, top_k, top_p)
    if len(prime_ids) == 0:
        raise ConfigError("The prime text is empty after encoding; pass a prime of at least one known character.",
                          "prime")
    check_window(window, len(prime_ids))
    if chunk is not None and chunk < 1:
        raise ConfigError(f"chunk must be a positive number of steps, got {chunk}.")
    temps = jnp.asarray(temperatures, jnp.float32)
    prime = jnp.broadcast_to(jnp.asarray(prime_ids, jnp.int32), (len(temperatures), len(prime_ids)))
    if window:
        prime = prime[:, -window:]
    carry, logits = _prime(model, params, prime)
    scan = functools.partial(_sample_scan_window if window else _sample_scan, model, params)
    state = prime if window else carry
    chunk = min(chunk or MAX_SCAN_STEPS, MAX_SCAN_STEPS, length)
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        step_keys = _step_keys(key, start, n)
        state, logits, tokens = scan(state, logits, step_keys, temps, top_k, float(top_p))
        yield np.asarray(tokens)


@functools.partial(jax.jit, static_argnames="n")
def _step_keys(key: Array, start: int, n: int) -> Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(n, dtype=jnp.uint32))


def generate(model: CharLM, params, prime_ids: np.ndarray, temperatures: Sequence[float], length: int,
             key: Array, *, top_k: int = 0, top_p: float = 1.0, max_bytes: int | None = None,
             window: int = 0) -> np.ndarray:
    """``(len(temperatures), length)`` generated token ids (int32), in scans of at most
    ``MAX_SCAN_STEPS`` steps (``window`` as in ``generate_stream``). An output larger than
    ``max_bytes`` (default: half the machine's memory) is refused: use ``generate_stream`` for it."""
    limit = default_max_bytes() if max_bytes is None else max_bytes
    size = 4 * len(temperatures) * max(length, 0)
    if size > limit:
        raise ConfigError(f"length={length} for {len(temperatures)} sample(s) needs {size / 2**30:.1f} GiB "
                          f"(limit {limit / 2**30:.1f} GiB); stream it with generate_stream, or ask for fewer "
                          "characters.", "length")
    chunks = list(generate_stream(model, params, prime_ids, temperatures, length, key, top_k=top_k, top_p=top_p,
                                  window=window))
    return np.concatenate(chunks, axis=1)


def default_max_bytes() -> int:
    """Half the machine's physical memory: the largest output ``generate`` returns in one piece."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 2**33
