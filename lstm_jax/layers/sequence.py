"""Recurrent layers over whole sequences: ``scan_cell`` (one layer) and ``RecurrentStack``.

``scan_cell`` checks its input, asks ``lstm_jax.dispatch`` for a plan and runs it: the plain
autodiff scan (``core.scan``), the fused custom-VJP kernels, oneDNN's primitives (CPU) or cuDNN's
(CUDA/ROCm, ``jax.experimental.rnn``), all in ``lstm_jax.kernels``. The input projection of all
time steps is one matmul (a row gather for token ids) computed before the scanned loop, which does
only the recurrent product and the gates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import dispatch
from lstm_jax.core.cells import Cell, LSTMCarry, LSTMCell, RNNCell
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.scan import (
    check_embedding,
    check_lengths,
    fold_embedding,
    reverse_in_time,
    reverse_padded,
    scan_layer,
    time_axis,
)
from lstm_jax.core.xlstm import MLSTMCarry, MLSTMCell
from lstm_jax.kernels import cudnn, onednn
from lstm_jax.kernels.fused import fused_gru, fused_lstm, fused_rnn
from lstm_jax.kernels.parallel_scan import linear_scan_log, mlstm_parallel

__all__ = ["scan_cell", "reverse_padded", "reverse_in_time", "fold_embedding", "RecurrentStack"]

Array = jax.Array


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
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    dropout_key: Array | None = None,
) -> tuple[Any, Array]:
    """Run ``cell`` over a sequence; returns ``(final_carry, outputs)``.

    Args:
      cell: an ``LSTMCell``, ``GRUCell``, ``MGUCell``, ``RNNCell``, ``LeakyRNNCell``, ``ConvLSTMCell``,
        ``MinGRUCell``, ``MinLSTMCell``, ``SLSTMCell`` or ``MLSTMCell``.
      params: the cell's params (``cell.init``). A ``token_inputs`` cell's params may also hold an
        ``'embedding'`` table ``(V, E)``; the ``input_kernel`` is then ``(E, G*H)`` and step t's
        input is ``embedding[x_t] @ input_kernel``. The fused layer gathers rows of the folded
        table ``embedding @ input_kernel``; oneDNN may take the embedding rows instead (as the
        dispatch plans); the numbers agree to rounding.
      inputs: ``(*batch, T, F)`` floats, or ``(*batch, T)`` token ids for ``token_inputs`` cells,
        or ``(*batch, T, *spatial, C)`` for a ``ConvLSTMCell``;
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
        hand-written backward pass of ``lstm_jax.kernels.fused`` (LSTM, RNN, and GRU with
        ``reset_after``; ``seq_lengths`` too, no ``remat``), which computes the recurrent-kernel
        gradient as one matmul after the backward loop; ``'onednn'`` runs an LSTM or GRU layer
        (no ``seq_lengths``, ``recurrent_dropout``, ``proj_size`` or ``remat``) through oneDNN's RNN
        primitives on CPU (other platforms run ``'fused'``); ``'cudnn'`` runs a float32 plain LSTM
        layer (``seq_lengths`` allowed; no ``remat``, ``recurrent_dropout`` or ``proj_size``) through
        cuDNN on CUDA (MIOpen on ROCm), ``jax.experimental.rnn.lstm``; ``'parallel'`` runs
        ``MinGRUCell``, ``MinLSTMCell`` or ``MLSTMCell`` over the whole sequence at once
        (``kernels.parallel_scan``; ``seq_lengths`` and a carry in and out work; not with ``remat``);
        ``'auto'`` lets
        ``lstm_jax.dispatch`` choose (rules and measurements there). Every choice gives the same
        numbers to rounding (cuDNN's float32 products may round as TF32 does).
      dropout: variational dropout rate on the layer's inputs (Keras's ``dropout``): with a
        ``dropout_key``, each sequence's input features are multiplied by one mask
        ``m_x ~ Bernoulli(1 - dropout) / (1 - dropout)`` drawn once and used at every step,
        ``x_t -> x_t * m_x``. A token-input layer drops the features of its ``'embedding'`` rows
        (it needs one).
      recurrent_dropout: variational dropout rate on the state entering the recurrent product
        (Keras's ``recurrent_dropout``; Gal & Ghahramani 2016): one mask ``m_h`` per sequence for
        all steps, ``z_t = x_t @ W_i + (h_{t-1} * m_h) @ W_h + b``. The carry itself is not
        masked: the LSTM's ``c`` and the GRU's ``z * h`` term see the whole state.
      dropout_key: where the masks come from, as ``RecurrentStack``'s: one key, or one key per
        sequence (a key array of the batch's shape), so that a batch split over devices draws the
        same masks. ``None`` (inference): no dropout whatever the rates. The input and recurrent
        masks come from ``fold_in(key, 0)`` and ``fold_in(key, 1)`` (per sequence).

    Warning:
      Keras 3 draws a separate mask per gate when ``recurrent_dropout > 0`` (its
      ``implementation=1``); here one input mask and one recurrent mask serve all gates (as Keras
      2's ``implementation=2``), so the recurrent product stays one matmul per step and the fused
      layer can run it. PyTorch's ``nn.LSTM(dropout=)`` is dropout between layers
      (``RecurrentStack.dropout``), it has no recurrent dropout.

    Returns:
      ``(final_carry, outputs)`` with outputs ``(*batch, T, H)`` (``(T, *batch, H)`` if time-major;
      a ``ConvLSTMCell``'s ``(*batch, T, *spatial', H)``).
    """
    dispatch.check_impl(impl)
    check_rate("scan_cell", "dropout", dropout)
    check_rate("scan_cell", "recurrent_dropout", recurrent_dropout)
    x = jnp.moveaxis(inputs, time_axis(cell, inputs.ndim, time_major), 0)
    batch_shape = x.shape[1 : x.ndim - cell.feature_ndim]
    carry_shape = x.shape[1 : x.ndim - min(cell.feature_ndim, 1)]  # a ConvLSTMCell's includes the spatial axes
    if seq_lengths is not None:
        seq_lengths = check_lengths(seq_lengths, batch_shape, x.shape[0])
    embed = check_embedding(cell, params)
    cell.check_inputs(params, x)
    rec_mask = None
    if dropout_key is not None and dropout > 0:  # the inputs times one mask per sequence, every step
        cell, params, x = _input_dropout(cell, params, x, dropout, dropout_key, batch_shape)
        embed = 0
    if dropout_key is not None and recurrent_dropout > 0:
        width = carry_width(cell)
        keep = sequence_masks(dropout_key, 1.0 - recurrent_dropout, batch_shape, width, salt=1)
        rec_mask = jnp.where(keep, 1.0 / (1.0 - recurrent_dropout), 0.0).astype(cell.param_dtype)
    plan = dispatch.plan_layer(
        cell, impl=impl, steps=x.shape[0], rows=int(np.prod(batch_shape)),
        features=params["embedding" if embed else "input_kernel"].shape[0], dtype=cell.dtype,
        tokens=cell.token_inputs, embed=embed, seq_lengths=seq_lengths is not None, remat=remat,
        recurrent_dropout=rec_mask is not None)
    carry = cell.initial_carry(carry_shape) if initial_carry is None else initial_carry
    if plan.impl == "cudnn":
        carry, ys = _run_cudnn(cell, params, x, carry, batch_shape, reverse, seq_lengths)
    elif plan.impl == "onednn":
        carry, ys = _run_onednn(cell, params, x, carry, batch_shape, reverse, unroll, plan)
    elif plan.impl == "parallel":
        carry, ys = _run_parallel(cell, params, x, carry, batch_shape, seq_lengths, reverse, plan)
    elif plan.impl == "fused":
        params = fold_embedding(cell, params)
        carry, ys = _run_fused(cell, params, cell.input_projection(params, x), carry, batch_shape, reverse, unroll,
                               plan, seq_lengths, rec_mask)
    else:
        if reverse and seq_lengths is not None:
            x = reverse_padded(x, seq_lengths)
        params = fold_embedding(cell, params)
        carry, ys = scan_layer(cell, params, cell.input_projection(params, x), carry, seq_lengths=seq_lengths,
                               reverse=reverse, unroll=unroll, remat=remat, recurrent_mask=rec_mask)
    return carry, (ys if time_major else jnp.moveaxis(ys, 0, len(batch_shape)))


def carry_width(cell: Cell) -> int:
    """The size of the state ``h`` that enters the recurrent product (an LSTMP's projection size)."""
    return getattr(cell, "proj_size", 0) or cell.hidden_size


def check_rate(where: str, name: str, rate: Any) -> float:
    """A dropout rate in [0, 1), or ``ConfigError`` in one sentence."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"{where}: {name} must be a number in [0, 1) (the fraction of units dropped), got {rate!r}.")
    return float(rate)


def apply_keep_mask(x: Array, keep: Array, rate: float) -> Array:
    """Inverted dropout with a boolean ``keep`` mask (broadcast against ``x``): ``x / (1 - rate)``
    where kept, zero elsewhere, so the expected value of every unit is unchanged."""
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def sequence_masks(key: Array, keep: float, batch_shape: tuple[int, ...], width: int, salt: int) -> Array:
    """Boolean keep-masks ``(*batch, width)`` from ``fold_in(key, salt)``: one key for the whole
    batch, or one key per sequence (a key array of shape ``batch_shape``, typed or raw), in which
    case each sequence's mask depends on its own key only."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    key_batch = key.shape if typed else key.shape[:-1]
    if key_batch == ():
        return jax.random.bernoulli(jax.random.fold_in(key, salt), keep, (*batch_shape, width))
    if key_batch != tuple(batch_shape):
        raise ConfigError(f"dropout_key must be one key or one key per sequence (batch shape {tuple(batch_shape)}), "
                          f"got keys for batch shape {key_batch}; pass jax.random.split(key, batch_size).")
    one = lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt), keep, (width,))
    for _ in key_batch:
        one = jax.vmap(one)
    return one(key)


def fold_keys(key: Array, data: int) -> Array:
    """``fold_in(key, data)`` for one key or for each key of a per-sequence key array."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    fold = lambda k: jax.random.fold_in(k, data)
    for _ in key.shape if typed else key.shape[:-1]:
        fold = jax.vmap(fold)
    return fold(key)


def _input_dropout(cell: Cell, params: dict, x: Array, rate: float, key: Array, batch_shape: tuple):
    """``(cell, params, x)`` with the time-major inputs dropped by one mask per sequence; token ids
    through an ``'embedding'`` become the embedded features (a float-input layer from there on)."""
    if cell.token_inputs:
        if "embedding" not in params:
            raise ConfigError(
                f"scan_cell: dropout on a token-input {cell.name} needs an 'embedding' in the params (it drops the "
                f"embedded features); without one pass dropout=0 or embed the tokens first.")
        x = jnp.take(params["embedding"], x, axis=0)
        params = {k: v for k, v in params.items() if k != "embedding"}
        cell = dataclasses.replace(cell, token_inputs=False)
    keep = sequence_masks(key, 1.0 - rate, batch_shape, x.shape[-1], salt=0)
    return cell, params, apply_keep_mask(x, keep, rate)


def _run_fused(cell: Cell, params: dict, x_proj: Array, carry: Any, batch_shape: tuple, reverse: bool,
               unroll: int | bool, plan: dispatch.Plan, seq_lengths: Array | None = None,
               recurrent_mask: Array | None = None):
    """The fused kernels on ``(T, N, G*H)``: batch dims flattened, time flipped for ``reverse``
    (within each valid part with ``seq_lengths``, whose outputs past the end are zeroed here)."""
    steps, hidden = x_proj.shape[0], cell.hidden_size
    xp = x_proj.reshape(steps, -1, x_proj.shape[-1])
    lengths = None if seq_lengths is None else seq_lengths.reshape(-1)
    flip = (lambda a: a[::-1]) if lengths is None else (lambda a: reverse_padded(a, lengths))
    xp = flip(xp) if reverse else xp
    flat = lambda a: a.reshape(-1, a.shape[-1])
    choices = (plan.transposed, plan.loop_factors)
    options = dict(seq_lengths=lengths, recurrent_mask=None if recurrent_mask is None else flat(recurrent_mask))
    if isinstance(cell, LSTMCell):
        h, c, ys = fused_lstm(params["recurrent_kernel"], xp, flat(carry.h), flat(carry.c), cell.dtype, unroll,
                              *choices, **options, w_proj=params.get("projection_kernel"))
        carry = LSTMCarry(h=h.reshape(*batch_shape, h.shape[-1]), c=c.reshape(*batch_shape, hidden))
    elif isinstance(cell, RNNCell):
        h, ys = fused_rnn(params["recurrent_kernel"], xp, flat(carry), cell.activation, cell.dtype, unroll,
                          **options)
        carry = h.reshape(*batch_shape, hidden)
    else:
        h, ys = fused_gru(params["recurrent_kernel"], params["recurrent_bias"], xp, flat(carry), cell.dtype, unroll,
                          *choices, **options)
        carry = h.reshape(*batch_shape, hidden)
    if lengths is not None:  # outputs past each sequence's end are zero, as the scan's
        ys = jnp.where(jnp.arange(steps)[:, None, None] < lengths[:, None], ys, jnp.zeros_like(ys))
    ys = flip(ys) if reverse else ys
    return carry, ys.reshape(steps, *batch_shape, ys.shape[-1])


def _run_cudnn(cell: Cell, params: dict, x: Array, carry: LSTMCarry, batch_shape: tuple, reverse: bool,
               seq_lengths: Array | None):
    """An LSTM layer through ``jax.experimental.rnn.lstm`` (``kernels.cudnn``): ``x`` time-major
    ``(T, *batch, F)``, or token ids ``(T, *batch)`` given as their embedding rows (with an
    ``'embedding'``) or as one-hot rows of the vocabulary. ``reverse`` reverses each sequence's
    valid part, as the scan does."""
    steps, hidden = x.shape[0], cell.hidden_size
    lengths = None if seq_lengths is None else seq_lengths.reshape(-1).astype(jnp.int32)
    xs = x.reshape(steps, -1, *x.shape[1 + len(batch_shape):])
    flip = lambda a: a[::-1] if lengths is None else reverse_padded(a, lengths)
    xs = flip(xs) if reverse else xs
    weights = {k: params[k] for k in ("input_kernel", "recurrent_kernel", "bias")}
    if cell.token_inputs and "embedding" in params:
        xs = jnp.take(params["embedding"], xs, axis=0)
    elif cell.token_inputs:
        xs = jax.nn.one_hot(xs, params["input_kernel"].shape[0], dtype=jnp.float32)
    h0, c0 = (carry.h.reshape(1, -1, hidden), carry.c.reshape(1, -1, hidden))
    ys, h, c = cudnn.cudnn_lstm(xs, h0, c0, [weights], lengths)
    ys = flip(ys) if reverse else ys
    carry = LSTMCarry(h=h[0].reshape(*batch_shape, hidden).astype(carry.h.dtype),
                      c=c[0].reshape(*batch_shape, hidden).astype(carry.c.dtype))
    return carry, ys.reshape(steps, *batch_shape, hidden).astype(params["bias"].dtype)


def _run_parallel(cell: Cell, params: dict, x: Array, carry: Any, batch_shape: tuple, seq_lengths: Array | None,
                  reverse: bool, plan: dispatch.Plan):
    """The parallel forms over time (``kernels.parallel_scan``) on time-major ``x``: batch dims
    flattened; ``reverse`` flips each sequence's valid part before and the outputs after."""
    if reverse:
        x = x[::-1] if seq_lengths is None else reverse_padded(x, seq_lengths)
    params = fold_embedding(cell, params)
    xp = cell.input_projection(params, x)
    steps, hidden = xp.shape[0], cell.hidden_size
    xp = xp.reshape(steps, -1, xp.shape[-1])
    flat = jax.tree.map(lambda a: a.reshape(xp.shape[1], *a.shape[len(batch_shape):]), carry)
    valid = None if seq_lengths is None else jnp.arange(steps)[:, None] < seq_lengths.reshape(1, -1)
    if isinstance(cell, MLSTMCell):
        q, k, v, o, i_t, f_t = cell.split_projection(xp)
        state, h = mlstm_parallel(q, k, v, i_t, f_t, tuple(flat), valid, chunk=plan.chunk, eps=cell.eps)
        flat, ys = MLSTMCarry(*state), jax.nn.sigmoid(o) * h.reshape(steps, -1, hidden)
    else:
        flat, ys = linear_scan_log(*cell.log_coefficients(xp), flat, valid)
    if valid is not None:
        ys = jnp.where(valid[..., None], ys, jnp.zeros_like(ys))
    ys = ys.reshape(steps, *batch_shape, hidden)
    if reverse:
        ys = ys[::-1] if seq_lengths is None else reverse_padded(ys, seq_lengths)
    carry = jax.tree.map(lambda a, like: a.reshape(like.shape).astype(like.dtype), flat, carry)
    return carry, ys


def _run_onednn(cell: Cell, params: dict, x: Array, carry: Any, batch_shape: tuple, reverse: bool,
                unroll: int | bool, plan: dispatch.Plan):
    """An LSTM or GRU layer through oneDNN where the program runs on CPU (the fused kernel
    elsewhere): ``x`` time-major ``(T, *batch, F)`` or token ids ``(T, *batch)``, fed to oneDNN
    as the plan's ``route`` says."""
    steps, hidden = x.shape[0], cell.hidden_size
    xs = x.reshape(steps, -1, *x.shape[1 + len(batch_shape):])
    xs = xs[::-1] if reverse else xs
    flat = jax.tree.map(lambda a: a.reshape(-1, hidden), carry)

    def on_cpu(xs, params, flat):
        xs, w_x = onednn.routed_inputs(plan.route, xs, params["input_kernel"], cell.dtype, params.get("embedding"))
        w = (xs, w_x, params["recurrent_kernel"], params["bias"])
        if isinstance(cell, LSTMCell):
            h, c, ys = onednn.onednn_lstm(*w, flat.h, flat.c, cell.dtype, plan.threads)
            return LSTMCarry(h=h, c=c), ys
        return onednn.onednn_gru(*w, params["recurrent_bias"], flat, cell.dtype, plan.threads)

    def elsewhere(xs, params, flat):
        params = fold_embedding(cell, params)
        fused = dispatch.Plan("fused", loop_factors=plan.loop_factors)  # row-major off CPU
        return _run_fused(cell, params, cell.input_projection(params, xs), flat, xs.shape[1:2], False, unroll, fused)

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
    ``bidirectional`` (the two directions' outputs are concatenated on the feature axis; for a
    ``ConvLSTMCell`` ``initial_carry``'s ``batch_shape`` is the input's ``(*batch, *spatial)``). Pass
    ``initial_carry=carries`` from the previous batch to carry state across batches (truncated
    backpropagation through time). Only the first layer uses ``cell.token_inputs``.

    Dropout (rate ``dropout``) is applied to the outputs of every layer but the last, with one
    mask per sequence drawn outside the scan from ``dropout_key``; without a key there is none.
    ``dropout_key`` is one key for the whole batch, or one key per sequence (a key array of the
    batch's shape, e.g. ``jax.random.split(key, batch)``): then each sequence's masks depend on its
    own key only, so a batch split over devices draws the same masks as the whole batch on one
    (``lstm_jax.parallel``).

    Warning:
      PyTorch's ``nn.LSTM(dropout=p)`` draws a fresh mask for every step; the mask here is one
      per sequence, the same for all its steps (variational, as Gal & Ghahramani's), so the same
      ``p`` regularises more.

    Variational dropout inside every layer (Keras's ``LSTM(dropout=, recurrent_dropout=)``,
    Gal & Ghahramani 2016), from the same ``dropout_key``: ``input_dropout`` (Keras's ``dropout``)
    on each layer's inputs and ``recurrent_dropout`` on the state entering each layer's recurrent
    product, one mask per sequence for all steps, as ``scan_cell``'s ``dropout`` and
    ``recurrent_dropout`` (equations and the differences from Keras there). Layer ``l`` direction
    ``d`` draws from ``fold_in(key, 1 + 2 l + d)`` per sequence. Without a key (inference) there is
    no dropout of any kind.
    """

    cell: Cell
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    input_dropout: float = 0.0
    recurrent_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ConfigError(f"RecurrentStack: num_layers must be an int >= 1, got {self.num_layers!r}.")
        for name in ("dropout", "input_dropout", "recurrent_dropout"):
            check_rate("RecurrentStack", name, getattr(self, name))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        return carry_width(self.cell) * self.num_directions

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
        x = jnp.moveaxis(inputs, time_axis(self.cell, inputs.ndim, time_major), 0)
        kw = dict(seq_lengths=seq_lengths, time_major=True, unroll=unroll, remat=remat, impl=impl,
                  dropout=self.input_dropout, recurrent_dropout=self.recurrent_dropout)
        drop, masks = dropout_key is not None and self.dropout > 0, None
        inner = dropout_key is not None and (self.input_dropout > 0 or self.recurrent_dropout > 0)
        key = lambda layer, direction: fold_keys(dropout_key, 1 + 2 * layer + direction) if inner else None
        carries = []
        for layer in range(self.num_layers):
            cell = self.layer_cell(layer)
            c0 = None if initial_carry is None else initial_carry[layer]
            if self.bidirectional:
                c0 = (None, None) if c0 is None else c0
                cf, yf = scan_cell(cell, params[layer][0], x, initial_carry=c0[0], dropout_key=key(layer, 0), **kw)
                cb, yb = scan_cell(cell, params[layer][1], x, initial_carry=c0[1], reverse=True,
                                   dropout_key=key(layer, 1), **kw)
                carries.append((cf, cb))
                x = jnp.concatenate([yf, yb], axis=-1)
            else:
                c, x = scan_cell(cell, params[layer], x, initial_carry=c0, dropout_key=key(layer, 0), **kw)
                carries.append(c)
            if drop and layer < self.num_layers - 1:
                if masks is None:  # all layers' masks at once, shaped like a layer's output (*batch, F)
                    masks = _dropout_masks(dropout_key, self.num_layers - 1, 1.0 - self.dropout, x.shape[1:],
                                           max(self.cell.feature_ndim, 1))
                x = apply_keep_mask(x, masks[layer], self.dropout)
        per_example = max(self.cell.feature_ndim, 1)  # the outputs' trailing axes: features, or spatial + channels
        return carries, (x if time_major else jnp.moveaxis(x, 0, x.ndim - 1 - per_example))


def _dropout_masks(key: Array, count: int, keep: float, shape: tuple[int, ...], per_example: int = 1) -> Array:
    """``count`` keep-masks of ``shape`` (``(*batch, *example)``, the last ``per_example`` axes one
    example's: its features, or a ConvLSTM's spatial axes and channels): from one key, or from one
    key per sequence when ``key`` has the batch's shape (raw ``uint32[..., 2]`` keys or typed keys)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    key_batch = key.shape if typed else key.shape[:-1]
    if key_batch == ():
        return jax.random.bernoulli(key, keep, (count, *shape))
    batch, example = shape[: len(shape) - per_example], shape[len(shape) - per_example:]
    if key_batch != batch:
        raise ConfigError(f"dropout_key must be one key or one key per sequence (batch shape {batch}), "
                          f"got keys for batch shape {key_batch}; pass jax.random.split(key, batch_size).")
    one = lambda k: jax.random.bernoulli(k, keep, (count, *example))
    for _ in key_batch:
        one = jax.vmap(one)
    return jnp.moveaxis(one(key), len(batch), 0)  # (*batch, count, *example) -> (count, *batch, *example)
