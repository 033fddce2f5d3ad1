"""lstm_jax's recurrent layers as Flax NNX modules: ``LSTM``, ``GRU``, ``RNN``, ``MGU``, ``ConvLSTM``,
``MinGRU``, ``MinLSTM``, ``SLSTM``, ``MLSTM``.

Each module holds a ``RecurrentStack`` (static) and its weights as ``nnx.Param``s named as the
functional params: ``layers[i].input_kernel``, ``.recurrent_kernel``, ``.bias`` (and the GRU's
``.recurrent_bias``); a bidirectional layer holds ``.forward`` and ``.backward``. The call runs
``RecurrentStack.apply``, so the fused custom-VJP layers (``impl='auto'``) come with it::

    import jax.numpy as jnp
    from flax import nnx
    from lstm_jax.nnx import LSTM

    model = LSTM(16, 32, num_layers=2, dropout=0.1, rngs=nnx.Rngs(0))   # in_features, hidden_size
    ys = model(jnp.ones((4, 10, 16)))             # (batch, time, 32); dropout on (train mode)
    model.eval()                                  # dropout off, as for nnx.Dropout
    carries, ys = model(jnp.ones((4, 10, 16)), return_carry=True)
    stack, params = model.stack, model.to_params()                      # the functional pair
    same = LSTM.from_params(stack, params)                             # and back, e.g. from_torch's

Dropout (between layers, one mask per sequence as in ``RecurrentStack``) draws from the
``'dropout'`` stream of the ``rngs`` given at construction, as ``nnx.Dropout`` does, unless
``deterministic`` is set (``model.eval()``) or passed to the call. ``reverse=True`` runs every layer
from the last valid step to the first and returns the outputs in input order.

Differs from PyTorch: one bias per gate (PyTorch's two are summed on import), Keras-style
initialisers (``LSTMCell``'s docstring), ``time_major=False`` (batch first) by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError as err:  # pragma: no cover - only without flax or with a Flax older than NNX
    raise ImportError(
        f"lstm_jax.nnx needs Flax with the NNX API (flax >= 0.12, from flax import nnx): {err}. "
        "Upgrade with pip install -U flax, or use the functional RecurrentStack / lstm_jax.linen."
    ) from None

from lstm_jax.core.cells import GRUCell, LeakyRNNCell, LSTMCell, MGUCell, RNNCell, make_cell
from lstm_jax.core.convlstm import ConvLSTMCell
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.mincells import MinGRUCell, MinLSTMCell
from lstm_jax.core.scan import time_axis
from lstm_jax.core.xlstm import MLSTMCell, SLSTMCell
from lstm_jax.layers.sequence import RecurrentStack, reverse_in_time

__all__ = ["LSTM", "GRU", "RNN", "LeakyRNN", "MGU", "ConvLSTM", "MinGRU", "MinLSTM", "SLSTM", "MLSTM", "from_params"]


class _Weights(nnx.Module):
    """One direction of one layer: a ``nnx.Param`` per functional param, under the same name."""

    def __init__(self, params: dict):
        self.names = tuple(sorted(params))
        for name in self.names:
            setattr(self, name, nnx.Param(jnp.asarray(params[name])))

    def to_params(self) -> dict:
        return {name: getattr(self, name)[...] for name in self.names}


class _Bidirectional(nnx.Module):
    def __init__(self, params: tuple):
        self.forward, self.backward = _Weights(params[0]), _Weights(params[1])

    def to_params(self) -> tuple:
        return self.forward.to_params(), self.backward.to_params()


class _Recurrent(nnx.Module):
    kind = ""

    def __init__(self, in_features: int, hidden_size: int, *, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, time_major: bool = False, reverse: bool = False, impl: str = "auto",
                 dtype: Any = None, rngs: nnx.Rngs, input_dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 **cell_options):
        if reverse and bidirectional:
            raise ConfigError("reverse=True and bidirectional=True together: a bidirectional layer runs both "
                              "directions already; pass one of them.")
        cell = make_cell(self.kind, hidden_size, dtype=dtype, **cell_options)
        self.stack = RecurrentStack(cell, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                                    input_dropout=input_dropout, recurrent_dropout=recurrent_dropout)
        self.time_major, self.reverse, self.impl = time_major, reverse, impl
        self.deterministic = False
        self.rngs = rngs["dropout"].fork()
        self._set_params(self.stack.init(rngs.params(), in_features))

    def _set_params(self, params: list) -> None:
        self.layers = nnx.List([_Bidirectional(p) if self.stack.bidirectional else _Weights(p) for p in params])

    def to_params(self) -> list:
        """The functional params: ``self.stack.apply(self.to_params(), x)`` equals ``self(x)``."""
        return [layer.to_params() for layer in self.layers]

    @classmethod
    def from_params(cls, stack: RecurrentStack, params: list, *, time_major: bool = False, impl: str = "auto",
                    rngs: nnx.Rngs | None = None) -> _Recurrent:
        """The module holding ``params`` of ``stack`` (e.g. ``from_torch(state_dict)``'s pair)."""
        return from_params(stack, params, time_major=time_major, impl=impl, rngs=rngs, cls=cls)

    def __call__(self, x: jax.Array, *, initial_carry: Any = None, seq_lengths: jax.Array | None = None,
                 return_carry: bool = False, deterministic: bool | None = None):
        """``x`` ``(*batch, T, F)`` (``(T, *batch, F)`` if ``time_major``) -> outputs
        ``(*batch, T, H * directions)``, or ``(carries, outputs)`` with ``return_carry``."""
        deterministic = self.deterministic if deterministic is None else deterministic
        s = self.stack
        inner = s.input_dropout > 0 or s.recurrent_dropout > 0
        drop = (s.dropout > 0 and s.num_layers > 1 or inner) and not deterministic
        key = self.rngs() if drop else None
        t_axis = time_axis(self.stack.cell, x.ndim, self.time_major)
        flip = lambda a: reverse_in_time(a, t_axis, seq_lengths) if self.reverse else a
        carries, ys = self.stack.apply(self.to_params(), flip(x), initial_carry=initial_carry,
                                       seq_lengths=seq_lengths, time_major=self.time_major, dropout_key=key,
                                       impl=self.impl)
        ys = flip(ys)
        return (carries, ys) if return_carry else ys


class LSTM(_Recurrent):
    """``num_layers`` LSTM layers (``LSTMCell``: gates i, f, g, o). ``LSTM(in_features,
    hidden_size, *, num_layers=1, bidirectional=False, dropout=0.0, time_major=False,
    reverse=False, impl='auto', dtype=None, rngs, input_dropout=0.0, recurrent_dropout=0.0)``
    (variational dropout as ``RecurrentStack``'s, while not ``deterministic``); extra keywords go
    to ``LSTMCell``, e.g. ``proj_size``, ``peepholes=True`` or ``layer_norm=True`` (those two run
    the autodiff scan)."""

    kind = "lstm"


class GRU(_Recurrent):
    """GRU layers (``GRUCell``; ``reset_after=True`` by default, PyTorch's and cuDNN's form)."""

    kind = "gru"


class RNN(_Recurrent):
    """Plain RNN layers (``RNNCell``; ``activation='tanh'`` or ``'relu'``)."""

    kind = "rnn"


class LeakyRNN(_Recurrent):
    """Leaky-integrator RNN layers (``LeakyRNNCell``; ``alpha=0.1``, ``activation='tanh'`` by default)."""

    kind = "leaky_rnn"


class MGU(_Recurrent):
    """Minimal gated unit layers (``MGUCell``; ``reset_gate=True`` by default, as Flax's ``MGUCell``)."""

    kind = "mgu"


class ConvLSTM(_Recurrent):
    """Convolutional LSTM layers (``ConvLSTMCell``): ``ConvLSTM(in_channels, hidden_size, *,
    kernel_size, strides=None, padding='SAME', ..., rngs)`` over inputs ``(*batch, T, *spatial, C)``."""

    kind = "convlstm"


class MinGRU(_Recurrent):
    """minGRU layers (``MinGRUCell``; the parallel scan over time under ``impl='auto'`` off CPU)."""

    kind = "mingru"


class MinLSTM(_Recurrent):
    """minLSTM layers (``MinLSTMCell``; the parallel scan over time under ``impl='auto'`` off CPU)."""

    kind = "minlstm"


class SLSTM(_Recurrent):
    """xLSTM's sLSTM layers (``SLSTMCell``; ``num_heads=1``, ``forget_gate='sigmoid'``)."""

    kind = "slstm"


class MLSTM(_Recurrent):
    """xLSTM's mLSTM layers (``MLSTMCell``; ``num_heads=1``; the parallel form under ``impl='auto'``)."""

    kind = "mlstm"


_KINDS = {LSTMCell: LSTM, GRUCell: GRU, RNNCell: RNN, LeakyRNNCell: LeakyRNN, MGUCell: MGU, ConvLSTMCell: ConvLSTM,
          MinGRUCell: MinGRU, MinLSTMCell: MinLSTM, SLSTMCell: SLSTM, MLSTMCell: MLSTM}


def from_params(stack: RecurrentStack, params: list, *, time_major: bool = False, impl: str = "auto",
                rngs: nnx.Rngs | None = None, cls: type | None = None) -> _Recurrent:
    """The NNX module (``LSTM``, ``GRU``, ``RNN``, ``MGU``, ``ConvLSTM``, ``MinGRU``, ... by the stack's cell) holding
    ``params``::

        module = from_params(*lstm_jax.from_torch(torch_lstm.state_dict()))
    """
    kind = _KINDS.get(type(stack.cell))
    if kind is None:
        raise ConfigError(f"from_params: no NNX module holds a stack of {type(stack.cell).__name__}; the modules are "
                          f"for {', '.join(sorted(c.__name__ for c in _KINDS))}.")
    if cls is not None and cls is not kind:
        raise ConfigError(f"{cls.__name__}.from_params got a stack of {type(stack.cell).__name__}; "
                          f"use {kind.__name__}.from_params or lstm_jax.nnx.from_params.")
    first = params[0][0] if stack.bidirectional else params[0]
    cell = stack.cell
    options = {f.name: getattr(cell, f.name) for f in dataclasses.fields(cell) if f.name != "hidden_size"}
    module = kind(first["input_kernel"].shape[-2], cell.hidden_size, num_layers=stack.num_layers,
                  bidirectional=stack.bidirectional, dropout=stack.dropout, time_major=time_major, impl=impl,
                  rngs=rngs or nnx.Rngs(0), input_dropout=stack.input_dropout,
                  recurrent_dropout=stack.recurrent_dropout, **options)
    if module.stack != stack:
        raise ConfigError(f"from_params could not rebuild the stack {stack} (got {module.stack}); "
                          "build the module directly and assign its params.")
    module._set_params(params)
    return module
