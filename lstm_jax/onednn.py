"""``lstm_jax.onednn``: the oneDNN route in one place for its users: the kernels
(``lstm_jax.kernels.onednn``) and the dispatch's questions about them (``lstm_jax.dispatch``).

``onednn_lstm`` and ``onednn_gru`` run one layer through oneDNN's RNN primitives on CPU;
``available()`` says whether ``scan_cell`` may use them here (the extension is loaded and
``LSTM_JAX_ONEDNN`` is not ``0``) and ``unavailable_reason()`` why not; ``pays`` is the
dispatch's measured choice for a layer (0: the fused layer, else oneDNN's threads per call);
``measure`` times one layer's training pass on both routes.
"""

from __future__ import annotations

from typing import Any

import jax

from lstm_jax.dispatch import measure as _measure
from lstm_jax.dispatch import plan as _plan
from lstm_jax.dispatch.switches import ONEDNN as ENV
from lstm_jax.kernels import onednn as _kernel
from lstm_jax.kernels.onednn import (
    cores_per_device,
    one_hot_inputs,
    onednn_gru,
    onednn_lstm,
    supports,
)

__all__ = ["available", "unavailable_reason", "supports", "pays", "measure", "cores_per_device", "onednn_lstm",
           "onednn_gru", "one_hot_inputs", "embedded_inputs", "ENV", "MEASURE_VERSION"]

MEASURE_VERSION = _plan.ONEDNN_MEASURE_VERSION
available = _plan.onednn_ready
unavailable_reason = _plan.onednn_unavailable_reason
pays = _plan.onednn_threads


def measure(steps: int, batch: int, features: int, hidden: int, dtype: Any = None,
            threads: tuple[int, ...] | list[int] = (1,), tokens: bool = False, cell: str = "lstm",
            embed: int = 0) -> dict:
    """Median seconds of one layer's training pass, ``'fused'`` and oneDNN with each count in
    ``threads`` (``lstm_jax.dispatch.measure.onednn_layer``, on the routes the dispatch would take)."""
    route = _plan.input_route(tokens, features, embed, dtype)
    return _measure.onednn_layer(steps, batch, features, hidden, dtype, threads, tokens, cell, embed, route)


def embedded_inputs(ids: jax.Array, embedding: jax.Array, w_x: jax.Array,
                    dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Token ids ``(T, N)`` through an embedding ``(V, E)`` and the input kernel ``w_x (E, G*H)``
    as the inputs and kernel oneDNN multiplies, on the route the dispatch takes: the embedding rows
    where they are the narrower input, else the one-hot of the vocabulary and the folded table."""
    route = _plan.embedding_route(embedding.shape[0], embedding.shape[1], dtype)
    return _kernel.routed_inputs(route, ids, w_x, dtype, embedding)
