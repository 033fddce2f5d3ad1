"""Several of the library user's own train steps in one jitted call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.core.errors import ConfigError

__all__ = ["scan_steps"]


def scan_steps(step: Callable[[Any, Any], tuple[Any, Any]],
               donate_state: bool = True) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Your own train step, run once per batch of a stack of batches in one jitted call.

    ``step(state, batch) -> (state, metrics)`` is any pure train step (``state`` and ``batch``
    any pytrees). ``scan_steps(step)(state, batches)`` runs it for ``batches[0], batches[1], ...``
    (every leaf of ``batches`` stacked along a new leading axis of length ``k``) inside one
    ``jax.lax.scan`` under one ``jax.jit``, and returns the last state and the ``k`` metrics
    stacked. The numbers are those of ``k`` calls of ``jax.jit(step)`` (the same program, to
    float32 rounding); what changes is that the host dispatches once per ``k`` steps and XLA reuses
    the step's buffers from one step to the next instead of allocating them afresh per call, as
    ``Trainer`` does with ``chunk_steps``. With ``donate_state`` (default) the input state's
    buffers are given to the output state: do not use ``state`` after the call. Each distinct
    ``k`` compiles once.

    The gain is measured by ``benchmarks/speed.py`` (the ``scan_steps`` rows of its results).

    Example::

        import jax, jax.numpy as jnp, optax
        from lstm_jax import CharLM, CharLMConfig, cross_entropy, scan_steps

        model = CharLM(CharLMConfig(vocab_size=50, hidden_size=64))
        tx = optax.rmsprop(1e-3)

        def step(state, batch):
            params, opt_state = state
            x, y = batch
            loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, None, x)[1], y))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        params = model.init(jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (10, 8, 33), 0, 50)  # 10 batches of 8 x 33
        state, losses = scan_steps(step)((params, tx.init(params)), (ids[..., :-1], ids[..., 1:]))
        print(losses.shape)  # (10,)
    """

    def many(state, batches):
        leading = {jnp.shape(leaf)[:1] for leaf in jax.tree.leaves(batches)}  # {(k,)} when stacked right
        if len(leading) != 1 or leading == {()}:
            shapes = jax.tree.map(jnp.shape, batches)
            raise ConfigError(
                f"scan_steps: every leaf of `batches` must carry the same leading (step) axis, got shapes {shapes}; "
                f"stack k batches with jax.tree.map(lambda *b: jnp.stack(b), *list_of_batches).")
        return jax.lax.scan(step, state, batches)

    return jax.jit(many, donate_argnums=(0,) if donate_state else ())
