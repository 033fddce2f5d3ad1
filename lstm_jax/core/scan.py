"""The plain ``lax.scan`` driver and the sequence helpers every layer route shares.

``scan_layer`` runs a cell's step over time-major, already projected inputs with automatic
differentiation (the reference every kernel is tested against), with ``seq_lengths``, ``reverse``,
``unroll`` and ``remat``. The helpers check inputs and lengths, reverse padded sequences and fold a
token layer's embedding into its input kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.core.cells import Cell
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.products import folded_table

__all__ = ["scan_layer", "time_axis", "check_lengths", "check_embedding", "fold_embedding", "reverse_padded",
           "reverse_in_time"]

Array = jax.Array


def time_axis(cell: Cell, ndim: int, time_major: bool) -> int:
    """The time axis of inputs with ``ndim`` axes: 0 if ``time_major``, else the one before the
    cell's per-example axes (``cell.feature_ndim``: 1 for features, 0 for token ids, the spatial
    axes and the channels for a convolutional cell)."""
    min_ndim = 1 + cell.feature_ndim
    if ndim < min_ndim:
        what = ("(time,) token ids" if cell.token_inputs else "(time, features)" if cell.feature_ndim == 1
                else f"(time, {cell.feature_ndim - 1} spatial axes, channels)")
        raise ConfigError(
            f"scan_cell: inputs need at least {min_ndim} dimension(s), {what}, but got {ndim}; "
            f"add a time axis."
        )
    return 0 if time_major else ndim - min_ndim


def check_lengths(seq_lengths: Array, batch_shape: tuple[int, ...], steps: int) -> Array:
    """Lengths as int32 in ``[0, steps]``: concrete lengths outside it raise ``ConfigError``;
    traced ones (under ``jit``) are clipped into it, so a bad length can never make NaNs."""
    seq_lengths = jnp.asarray(seq_lengths)
    if seq_lengths.shape != batch_shape or not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise ConfigError(
            f"seq_lengths must be integers of shape {batch_shape} (one length per sequence in the "
            f"batch), got {seq_lengths.dtype} of shape {seq_lengths.shape}."
        )
    if not isinstance(seq_lengths, jax.core.Tracer) and seq_lengths.size:
        concrete = np.asarray(seq_lengths)  # numpy: no traced min/max when a constant enters jit
        lo, hi = int(concrete.min()), int(concrete.max())
        if lo < 0 or hi > steps:
            raise ConfigError(f"seq_lengths must lie in [0, {steps}] (the sequences' time steps), got values "
                              f"from {lo} to {hi}; clip them or pad the inputs to the longest sequence.")
    return jnp.clip(seq_lengths, 0, steps).astype(jnp.int32)


def reverse_padded(x: Array, seq_lengths: Array) -> Array:
    """Reverse each right-padded sequence of time-major ``x`` within its valid part.

    ``x`` is ``(T, *batch, ...)``; position ``t < len`` moves to ``len - 1 - t`` and padding
    stays where it is. The map is its own inverse.
    """
    t = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * seq_lengths.ndim)
    idx = jnp.where(t < seq_lengths, seq_lengths - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - idx.ndim))
    return jnp.take_along_axis(x, idx, axis=0)


def reverse_in_time(x: Array, time_axis: int, seq_lengths: Array | None = None) -> Array:
    """``x`` reversed along ``time_axis``, within each sequence's valid part when ``seq_lengths``
    is given (padding stays in place); its own inverse."""
    if seq_lengths is None:
        return jnp.flip(x, time_axis)
    return jnp.moveaxis(reverse_padded(jnp.moveaxis(x, time_axis, 0), jnp.asarray(seq_lengths)), 0, time_axis)


def check_embedding(cell: Cell, params: dict) -> int:
    """The width ``E`` of the ``'embedding'`` in a token-input layer's params (0 without one)."""
    if "embedding" not in params:
        return 0
    table, kernel = params["embedding"], params["input_kernel"]
    if not cell.token_inputs or table.ndim != 2 or table.shape[1] != kernel.shape[0]:
        raise ConfigError(
            f"scan_cell: an 'embedding' in the params needs a cell with token_inputs=True and a (vocab, E) table "
            f"matching the input_kernel's {kernel.shape[0]} rows; got {cell.name}(token_inputs={cell.token_inputs}) "
            f"and an embedding of shape {table.shape}. Drop the embedding or fix its shape.")
    return table.shape[1]


def fold_embedding(cell: Cell, params: dict) -> dict:
    """A token-input layer's params with an ``'embedding'`` folded into the input kernel:
    ``(V, E) @ (E, G*H) -> (V, G*H)``, a table the layer gathers rows of (``CharLM.fold_embedding``)."""
    if "embedding" not in params:
        return params
    rest = {k: v for k, v in params.items() if k != "embedding"}
    return {**rest, "input_kernel": folded_table(params["embedding"], params["input_kernel"], cell.dtype)}


def scan_layer(cell: Cell, params: dict, x_proj: Array, carry: Any, *, seq_lengths: Array | None = None,
               reverse: bool = False, unroll: int | bool = 1, remat: bool = False,
               recurrent_mask: Array | None = None) -> tuple[Any, Array]:
    """``cell.step`` scanned over time-major ``x_proj`` ``(T, *batch, G*H)`` (a convolutional
    cell's ``(T, *batch, *spatial, 4H)``) from ``carry``, with
    automatic differentiation. With ``seq_lengths`` (already checked, int32 ``(*batch,)``) the
    inputs are right-padded: the carry stops at each sequence's last valid step and outputs past
    it are zero; with ``reverse`` as well, ``x_proj`` is expected reversed within each valid part
    (``reverse_padded``) and the outputs are put back in input order. ``recurrent_mask``
    ``(*batch, H)``: variational recurrent dropout, the same mask at every step (``cell.step``).
    Returns ``(carry, ys)``.

    A cell whose step does work on its input alone (the minGRU's and minLSTM's coefficients) may
    define ``hoist(x_proj)`` (that work, for all steps at once) and ``hoisted_step(params, carry,
    u_t)`` (the rest): the loop then runs ``hoisted_step`` over ``hoist(x_proj)``, so the
    input-only part, forward and backward, runs vectorised over the sequence instead of once per
    step; ``step(p, c, x) == hoisted_step(p, c, hoist(x))``."""
    masked = {} if recurrent_mask is None else {"recurrent_mask": recurrent_mask}
    hoisted = hasattr(cell, "hoist")
    step = cell.hoisted_step if hoisted else cell.step
    if hoisted:
        x_proj = cell.hoist(x_proj)

    def body(carry, xs):
        x_t, t = xs
        new_carry, y = step(params, carry, x_t, **masked)
        if seq_lengths is not None:
            valid = t < seq_lengths  # (*batch,), widened to each leaf (a matrix memory has more axes)
            keep = lambda a: valid.reshape(valid.shape + (1,) * (a.ndim - valid.ndim))
            new_carry = jax.tree.map(lambda n, o: jnp.where(keep(n), n, o), new_carry, carry)
            y = jnp.where(keep(y), y, jnp.zeros_like(y))
        return new_carry, y

    if remat:
        body = jax.checkpoint(body)
    steps = jnp.arange(x_proj.shape[0])
    carry, ys = jax.lax.scan(body, carry, (x_proj, steps), reverse=reverse and seq_lengths is None, unroll=unroll)
    if reverse and seq_lengths is not None:
        ys = reverse_padded(ys, seq_lengths)
    return carry, ys
