"""Running cells over sequences with ``jax.lax.scan``: single layers, stacks, bidirectional layers.

The input projection of all time steps is one matmul (a row gather for token ids) computed before
the scan; the scanned body does only the fused recurrent matmul and the gate arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.cells import Cell, GRUCell, LSTMCarry, LSTMCell, RNNCell
from lstm_jax.errors import ConfigError
from lstm_jax import onednn
from lstm_jax.fused import fused_gru, fused_lstm, fused_rnn
from lstm_jax.products import folded_table

__all__ = ["scan_cell", "reverse_padded", "RecurrentStack"]

Array = jax.Array


def _time_axis(cell: Cell, ndim: int, time_major: bool) -> int:
    min_ndim = 1 if cell.token_inputs else 2
    if ndim < min_ndim:
        what = "(time,) token ids" if cell.token_inputs else "(time, features)"
        raise ConfigError(
            f"scan_cell: inputs need at least {min_ndim} dimension(s), {what}, but got {ndim}; "
            f"add a time axis."
        )
    return 0 if time_major else ndim - min_ndim


def _check_lengths(seq_lengths: Array, batch_shape: tuple[int, ...], steps: int) -> Array:
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


def scan_cell(
    cell: Cell,
    params: dict,
    inputs: Array,
    *,
    initial_carry: Any = None,
    seq_lengths: Array | None = None,
    time_major: bool = False,
    reverse: bool = False,
    unroll: int | bool = 1,
    remat: bool = False,
    impl: str = "auto",
) -> tuple[Any, Array]:
    """Run ``cell`` over a sequence; returns ``(final_carry, outputs)``.

    Args:
      cell: an ``LSTMCell``, ``GRUCell`` or ``RNNCell``.
      params: the cell's params (``cell.init``). A ``token_inputs`` cell's params may also hold an
        ``'embedding'`` table ``(V, E)``; the ``input_kernel`` is then ``(E, G*H)`` and step t's
        input is ``embedding[x_t] @ input_kernel``. The layer folds the two into one ``(V, G*H)``
        table it gathers rows of, or, where oneDNN runs the layer, may feed it the embedding rows
        (``onednn.embedded_inputs``), whichever measured faster; the numbers agree to rounding.
      inputs: ``(*batch, T, F)`` floats, or ``(*batch, T)`` token ids for ``token_inputs`` cells;
        with ``time_major=True`` the time axis comes first: ``(T, *batch, F)``.
      initial_carry: the carry at the first step (default: zeros).
      seq_lengths: ``(*batch,)`` valid lengths of right-padded sequences. The carry stops at each
        sequence's last valid step and that carry is returned; outputs past the end are zero.
        With ``reverse`` only the valid part of each sequence is reversed. Lengths must lie in
        ``[0, T]``: concrete ones outside raise ``ConfigError``, traced ones (under ``jit``) are
        clipped into it.
      time_major: whether time is the leading axis of ``inputs`` and outputs.
      reverse: run from the last step to the first (outputs stay in input order).
      unroll: passed to ``lax.scan``.
      remat: rematerialise each step in the backward pass (``jax.checkpoint``): memory flat in T
        for the activations, at the price of recomputing the gates.
      impl: ``'scan'`` differentiates the scanned step automatically; ``'fused'`` uses the
        hand-written backward pass of ``lstm_jax.fused`` (LSTM, RNN, and GRU with ``reset_after``;
        no ``seq_lengths`` or ``remat``), which computes the recurrent-kernel gradient
        as one matmul after the backward loop; ``'onednn'`` runs an LSTM layer (same conditions)
        through oneDNN's RNN primitive on CPU (``lstm_jax.onednn``; other platforms run
        ``'fused'``); ``'auto'`` picks ``'onednn'`` for an LSTM where it measured faster on this
        machine, else ``'fused'`` where it applies (as fast as the autodiff scan or faster at
        every shape measured on CPU, up to 1.7x; benchmarks/).

    Returns:
      ``(final_carry, outputs)`` with outputs ``(*batch, T, H)`` (``(T, *batch, H)`` if time-major).
    """
    t_axis = _time_axis(cell, inputs.ndim, time_major)
    x = jnp.moveaxis(inputs, t_axis, 0)
    batch_shape = x.shape[1 : x.ndim if cell.token_inputs else x.ndim - 1]
    if seq_lengths is not None:
        seq_lengths = _check_lengths(seq_lengths, batch_shape, x.shape[0])
        if reverse:
            x = reverse_padded(x, seq_lengths)
    carry = cell.initial_carry(batch_shape) if initial_carry is None else initial_carry
    fusable = (isinstance(cell, (LSTMCell, RNNCell)) or (isinstance(cell, GRUCell) and cell.reset_after)) and (
        seq_lengths is None and not remat)
    empty = x.shape[0] == 0 or 0 in batch_shape  # no steps or no sequences: the scan handles it
    impl = "scan" if empty and fusable else impl
    if impl not in ("auto", "scan", "fused", "onednn"):
        raise ConfigError(f"impl must be 'auto', 'scan', 'fused' or 'onednn', got {impl!r}.")
    onednn_kind = "lstm" if isinstance(cell, LSTMCell) else "gru" if isinstance(cell, GRUCell) else None
    if impl == "onednn" and not (fusable and onednn_kind):
        raise ConfigError(
            f"impl='onednn' supports LSTMCell and GRUCell(reset_after=True) without seq_lengths or remat; got "
            f"{cell.name}{' with those options' if seq_lengths is not None or remat else ''}. "
            f"Use impl='fused' or 'auto'.")
    if impl == "fused" and not fusable:
        raise ConfigError(
            f"impl='fused' supports LSTMCell, RNNCell and GRUCell(reset_after=True) without seq_lengths "
            f"or remat; got {cell.name}{' with those options' if seq_lengths is not None or remat else ''}. "
            f"Use impl='scan' or 'auto'.")
    embed = _check_embedding(cell, params)
    if fusable and onednn_kind and impl in ("onednn", "auto") and not empty:
        cell.check_inputs(params, x)
        features = params["embedding" if embed else "input_kernel"].shape[0]
        rows = int(np.prod(batch_shape))
        if impl == "onednn" and not onednn.available():
            raise ConfigError(f"impl='onednn' is not available here: {onednn.unavailable_reason()}. "
                              f"Use impl='auto' (it falls back to the fused layer).")
        threads = None if impl == "onednn" else onednn.pays(x.shape[0], rows, features, cell.hidden_size, cell.dtype,
                                                                   cell.token_inputs, onednn_kind, embed)
        if threads != 0:
            carry, ys = _run_onednn(cell, params, x, carry, batch_shape, reverse, unroll, threads)
            return carry, (ys if time_major else jnp.moveaxis(ys, 0, -2))
    params = fold_embedding(cell, params)
    x_proj = cell.input_projection(params, x)
    if fusable and impl in ("fused", "auto"):
        carry, ys = _run_fused(cell, params, x_proj, carry, batch_shape, reverse, unroll)
        return carry, (ys if time_major else jnp.moveaxis(ys, 0, -2))

    def body(carry, xs):
        x_t, t = xs
        new_carry, y = cell.step(params, carry, x_t)
        if seq_lengths is not None:
            valid = (t < seq_lengths)[..., None]
            new_carry = jax.tree.map(lambda n, o: jnp.where(valid, n, o), new_carry, carry)
            y = jnp.where(valid, y, jnp.zeros_like(y))
        return new_carry, y

    if remat:
        body = jax.checkpoint(body)
    steps = jnp.arange(x.shape[0])
    scan_reverse = reverse and seq_lengths is None
    carry, ys = jax.lax.scan(body, carry, (x_proj, steps), reverse=scan_reverse, unroll=unroll)
    if reverse and seq_lengths is not None:
        ys = reverse_padded(ys, seq_lengths)
    return carry, (ys if time_major else jnp.moveaxis(ys, 0, -2))


def _check_embedding(cell: Cell, params: dict) -> int:
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


def _run_fused(cell: Cell, params: dict, x_proj: Array, carry: Any, batch_shape: tuple, reverse: bool,
               unroll: int | bool):
    """The fused layers on ``(T, N, G*H)``: batch dims flattened, time flipped for ``reverse``."""
    steps, hidden = x_proj.shape[0], cell.hidden_size
    xp = x_proj.reshape(steps, -1, x_proj.shape[-1])
    xp = xp[::-1] if reverse else xp
    flat = lambda a: a.reshape(-1, hidden)
    if isinstance(cell, LSTMCell):
        h, c, ys = fused_lstm(params["recurrent_kernel"], xp, flat(carry.h), flat(carry.c), cell.dtype, unroll)
        carry = LSTMCarry(h=h.reshape(*batch_shape, hidden), c=c.reshape(*batch_shape, hidden))
    elif isinstance(cell, RNNCell):
        h, ys = fused_rnn(params["recurrent_kernel"], xp, flat(carry), cell.activation, cell.dtype, unroll)
        carry = h.reshape(*batch_shape, hidden)
    else:
        h, ys = fused_gru(params["recurrent_kernel"], params["recurrent_bias"], xp, flat(carry), cell.dtype, unroll)
        carry = h.reshape(*batch_shape, hidden)
    ys = ys[::-1] if reverse else ys
    return carry, ys.reshape(steps, *batch_shape, hidden)


def _run_onednn(cell: LSTMCell | GRUCell, params: dict, x: Array, carry: Any, batch_shape: tuple, reverse: bool,
                unroll: int | bool, threads: int | None):
    """An LSTM or GRU layer through oneDNN on CPU (the fused layer elsewhere): ``x`` time-major
    ``(T, *batch, F)`` or token ids ``(T, *batch)`` (one-hot, the projection oneDNN runs)."""
    steps, hidden = x.shape[0], cell.hidden_size
    xs = x.reshape(steps, -1, *x.shape[1 + len(batch_shape):])
    xs = xs[::-1] if reverse else xs
    flat = jax.tree.map(lambda a: a.reshape(-1, hidden), carry)

    def on_cpu(xs, params, flat):
        w_x = params["input_kernel"]
        if "embedding" in params:
            xs, w_x = onednn.embedded_inputs(xs, params["embedding"], w_x, cell.dtype)
        elif cell.token_inputs:
            xs, w_x = onednn.one_hot_inputs(xs, w_x, cell.dtype)
        w = (xs, w_x, params["recurrent_kernel"], params["bias"])
        if isinstance(cell, LSTMCell):
            h, c, ys = onednn.onednn_lstm(*w, flat.h, flat.c, cell.dtype, threads)
            return LSTMCarry(h=h, c=c), ys
        return onednn.onednn_gru(*w, params["recurrent_bias"], flat, cell.dtype, threads)

    def elsewhere(xs, params, flat):
        params = fold_embedding(cell, params)
        return _run_fused(cell, params, cell.input_projection(params, xs), flat, xs.shape[1:2], False, unroll)

    flat, ys = jax.lax.platform_dependent(xs, params, flat, cpu=on_cpu, default=elsewhere)
    ys = ys[::-1] if reverse else ys
    return jax.tree.map(lambda a: a.reshape(*batch_shape, hidden), flat), ys.reshape(steps, *batch_shape, hidden)


@dataclasses.dataclass(frozen=True)
class RecurrentStack:
    """``num_layers`` recurrent layers, optionally bidirectional, with dropout between layers.

    Like PyTorch's ``nn.LSTM(num_layers=..., bidirectional=..., dropout=...)``, as pure functions::

        stack = RecurrentStack(LSTMCell(128), num_layers=2, dropout=0.1)
        params = stack.init(key, input_size)     # list, one entry per layer
        carries, ys = stack.apply(params, xs)    # carries: list, one entry per layer

    Each layer's params and carry are the cell's own, or a ``(forward, backward)`` pair when
    ``bidirectional`` (the two directions' outputs are concatenated on the feature axis). Pass
    ``initial_carry=carries`` from the previous batch to carry state across batches (truncated
    backpropagation through time). Only the first layer uses ``cell.token_inputs``.

    Dropout (rate ``dropout``) is applied to the outputs of every layer but the last, with one
    mask per sequence drawn outside the scan from ``dropout_key``; without a key there is none.
    ``dropout_key`` is one key for the whole batch, or one key per sequence (a key array of the
    batch's shape, e.g. ``jax.random.split(key, batch)``): then each sequence's masks depend on its
    own key only, so a batch split over devices draws the same masks as the whole batch on one
    (``lstm_jax.parallel``).
    """

    cell: Cell
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ConfigError(f"RecurrentStack: num_layers must be an int >= 1, got {self.num_layers!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"RecurrentStack: dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        return self.cell.hidden_size * self.num_directions

    def layer_cell(self, layer: int) -> Cell:
        return self.cell if layer == 0 else dataclasses.replace(self.cell, token_inputs=False)

    def init(self, key: Array, input_size: int) -> list:
        params = []
        for layer, k in enumerate(jax.random.split(key, self.num_layers)):
            cell = self.layer_cell(layer)
            size = input_size if layer == 0 else self.output_size
            k_f, k_b = jax.random.split(k)
            params.append((cell.init(k_f, size), cell.init(k_b, size)) if self.bidirectional
                          else cell.init(k_f, size))
        return params

    def initial_carry(self, batch_shape: tuple[int, ...] | int = ()) -> list:
        carry = self.cell.initial_carry(batch_shape)
        return [(carry, carry) if self.bidirectional else carry for _ in range(self.num_layers)]

    def apply(
        self,
        params: Sequence,
        inputs: Array,
        *,
        initial_carry: Sequence | None = None,
        seq_lengths: Array | None = None,
        time_major: bool = False,
        dropout_key: Array | None = None,
        unroll: int | bool = 1,
        remat: bool = False,
        impl: str = "auto",
    ) -> tuple[list, Array]:
        """Run the stack; returns ``(carries, outputs)``, outputs ``(*batch, T, output_size)``."""
        if len(params) != self.num_layers:
            raise ConfigError(
                f"RecurrentStack.apply: params has {len(params)} layers but the stack has "
                f"num_layers={self.num_layers}; initialise the params with this stack's init."
            )
        x = jnp.moveaxis(inputs, _time_axis(self.cell, inputs.ndim, time_major), 0)
        kw = dict(seq_lengths=seq_lengths, time_major=True, unroll=unroll, remat=remat, impl=impl)
        drop, masks = dropout_key is not None and self.dropout > 0, None
        carries = []
        for layer in range(self.num_layers):
            cell = self.layer_cell(layer)
            c0 = None if initial_carry is None else initial_carry[layer]
            if self.bidirectional:
                c0 = (None, None) if c0 is None else c0
                cf, yf = scan_cell(cell, params[layer][0], x, initial_carry=c0[0], **kw)
                cb, yb = scan_cell(cell, params[layer][1], x, initial_carry=c0[1], reverse=True, **kw)
                carries.append((cf, cb))
                x = jnp.concatenate([yf, yb], axis=-1)
            else:
                c, x = scan_cell(cell, params[layer], x, initial_carry=c0, **kw)
                carries.append(c)
            if drop and layer < self.num_layers - 1:
                if masks is None:  # all layers' masks at once, shaped like a layer's output (*batch, F)
                    masks = _dropout_masks(dropout_key, self.num_layers - 1, 1.0 - self.dropout, x.shape[1:])
                x = jnp.where(masks[layer], x / (1.0 - self.dropout), jnp.zeros_like(x))
        return carries, (x if time_major else jnp.moveaxis(x, 0, -2))


def _dropout_masks(key: Array, count: int, keep: float, shape: tuple[int, ...]) -> Array:
    """``count`` keep-masks of ``shape`` (``(*batch, features)``): from one key, or from one key
    per sequence when ``key`` has the batch's shape (raw ``uint32[..., 2]`` keys or typed keys)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    key_batch = key.shape if typed else key.shape[:-1]
    if key_batch == ():
        return jax.random.bernoulli(key, keep, (count, *shape))
    if key_batch != shape[:-1]:
        raise ConfigError(f"dropout_key must be one key or one key per sequence (batch shape {shape[:-1]}), "
                          f"got keys for batch shape {key_batch}; pass jax.random.split(key, batch_size).")
    one = lambda k: jax.random.bernoulli(k, keep, (count, shape[-1]))
    for _ in key_batch:
        one = jax.vmap(one)
    return jnp.moveaxis(one(key), -2, 0)  # (*batch, count, F) -> (count, *batch, F)
