"""lstm_jax's recurrent layers as Flax linen modules: ``LSTM``, ``GRU``, ``RNN``, ``MGU``, ``ConvLSTM``,
``MinGRU``, ``MinLSTM``, ``SLSTM``, ``MLSTM``.

The same layers as ``lstm_jax.nnx`` for code written with ``flax.linen``: each module runs
``RecurrentStack.apply`` (the fused custom-VJP layers included) on params it declares with
``self.param``, one entry per layer named ``'0'``, ``'1'``, ... holding the functional names
(``input_kernel``, ``recurrent_kernel``, ``bias``; a bidirectional layer ``forward`` and
``backward``)::

    import jax, jax.numpy as jnp
    from lstm_jax.linen import LSTM

    model = LSTM(hidden_size=32, num_layers=2, dropout=0.1)
    x = jnp.ones((4, 10, 16))
    variables = model.init(jax.random.key(0), x)
    ys = model.apply(variables, x)                                        # eval: no dropout
    ys = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    params = model.to_params(variables)                 # the functional params of model.stack()
    variables = model.from_params(params)               # and back

Dropout draws from the ``'dropout'`` RNG collection when ``deterministic=False`` (linen's
convention; the default is ``True``). Initialisers and gate order are the cells'. Each module's
own fields are its cell's options: ``LSTM(peepholes=, layer_norm=)``, ``GRU(reset_after=)``,
``RNN(activation=)``, ``MGU(reset_gate=)``, ``ConvLSTM(kernel_size=, strides=, padding=, use_bias=)``
(inputs ``(*batch, T, *spatial, C)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from lstm_jax.core.cells import make_cell
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.scan import time_axis
from lstm_jax.layers.sequence import RecurrentStack, reverse_in_time

__all__ = ["LSTM", "GRU", "RNN", "LeakyRNN", "MGU", "ConvLSTM", "MinGRU", "MinLSTM", "SLSTM", "MLSTM"]


class _Recurrent(nn.Module):
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    time_major: bool = False
    reverse: bool = False
    impl: str = "auto"
    dtype: Any = None
    input_dropout: float = 0.0  # variational, as RecurrentStack's (while not deterministic)
    recurrent_dropout: float = 0.0
    kind = ""

    def cell_options(self) -> dict:
        return {}

    def stack(self) -> RecurrentStack:
        cell = make_cell(self.kind, self.hidden_size, dtype=self.dtype, **self.cell_options())
        return RecurrentStack(cell, num_layers=self.num_layers, bidirectional=self.bidirectional, dropout=self.dropout,
                              input_dropout=self.input_dropout, recurrent_dropout=self.recurrent_dropout)

    @nn.compact
    def __call__(self, x: jax.Array, *, initial_carry: Any = None, seq_lengths: jax.Array | None = None,
                 return_carry: bool = False, deterministic: bool = True):
        if self.reverse and self.bidirectional:
            raise ConfigError("reverse=True and bidirectional=True together: a bidirectional layer runs both "
                              "directions already; pass one of them.")
        stack = self.stack()
        features = x.shape[-1]
        layers = [self.param(str(i), lambda key, i=i: _named(stack.init(key, features)[i]))
                  for i in range(self.num_layers)]
        params = [(p["forward"], p["backward"]) if self.bidirectional else p for p in layers]
        inner = self.input_dropout > 0 or self.recurrent_dropout > 0
        drop = (self.dropout > 0 and self.num_layers > 1 or inner) and not deterministic
        key = self.make_rng("dropout") if drop else None
        t_axis = time_axis(stack.cell, x.ndim, self.time_major)
        flip = lambda a: reverse_in_time(a, t_axis, seq_lengths) if self.reverse else a
        carries, ys = stack.apply(params, flip(x), initial_carry=initial_carry, seq_lengths=seq_lengths,
                                  time_major=self.time_major, dropout_key=key, impl=self.impl)
        ys = flip(ys)
        return (carries, ys) if return_carry else ys

    def to_params(self, variables: dict) -> list:
        """The functional params held in ``variables`` (``model.init``'s result)."""
        layers = variables["params"]
        return [(layers[str(i)]["forward"], layers[str(i)]["backward"]) if self.bidirectional else dict(layers[str(i)])
                for i in range(self.num_layers)]

    def from_params(self, params: list) -> dict:
        """``variables`` holding the functional ``params`` of ``self.stack()``."""
        return {"params": {str(i): _named(p) for i, p in enumerate(params)}}


def _named(layer: Any) -> dict:
    return {"forward": dict(layer[0]), "backward": dict(layer[1])} if isinstance(layer, tuple) else dict(layer)


class LSTM(_Recurrent):
    """LSTM layers (``LSTMCell``: gates i, f, g, o), with ``peepholes`` or ``layer_norm`` as
    ``LSTMCell``'s options (those run the autodiff scan); ``proj_size`` > 0 for LSTMP layers."""

    peepholes: bool = False
    layer_norm: bool = False
    proj_size: int = 0
    kind = "lstm"

    def cell_options(self) -> dict:
        return {"peepholes": self.peepholes, "layer_norm": self.layer_norm, "proj_size": self.proj_size}


class GRU(_Recurrent):
    """GRU layers; ``reset_after=True`` (PyTorch's and cuDNN's form) by default."""

    reset_after: bool = True
    kind = "gru"

    def cell_options(self) -> dict:
        return {"reset_after": self.reset_after}


class RNN(_Recurrent):
    """Plain RNN layers, ``activation`` 'tanh' or 'relu'."""

    activation: str = "tanh"
    kind = "rnn"

    def cell_options(self) -> dict:
        return {"activation": self.activation}


class LeakyRNN(_Recurrent):
    """Leaky-integrator RNN layers (``LeakyRNNCell``): ``alpha`` in ``(0, 1]``, ``activation``
    'tanh' or 'relu'. Neither PyTorch nor Flax has this layer."""

    alpha: float = 0.1
    activation: str = "tanh"
    kind = "leaky_rnn"

    def cell_options(self) -> dict:
        return {"alpha": self.alpha, "activation": self.activation}


class MGU(_Recurrent):
    """Minimal gated unit layers (``MGUCell``; ``reset_gate=True`` by default, as Flax's ``MGUCell``)."""

    reset_gate: bool = True
    kind = "mgu"

    def cell_options(self) -> dict:
        return {"reset_gate": self.reset_gate}


class ConvLSTM(_Recurrent):
    """Convolutional LSTM layers (``ConvLSTMCell``) over inputs ``(*batch, T, *spatial, C)``:
    ``kernel_size`` (required: one int per spatial dimension, 1 to 3), ``strides``, ``padding``
    and ``use_bias`` as the cell's."""

    kernel_size: Sequence[int] = ()
    strides: Sequence[int] | None = None
    padding: Any = "SAME"
    use_bias: bool = True
    kind = "convlstm"

    def cell_options(self) -> dict:
        return {"kernel_size": tuple(self.kernel_size), "strides": self.strides, "padding": self.padding,
                "use_bias": self.use_bias}


class MinGRU(_Recurrent):
    """minGRU layers (``MinGRUCell``; the parallel scan over time under ``impl='auto'`` off CPU)."""

    kind = "mingru"


class MinLSTM(_Recurrent):
    """minLSTM layers (``MinLSTMCell``; the parallel scan over time under ``impl='auto'`` off CPU)."""

    kind = "minlstm"


class SLSTM(_Recurrent):
    """xLSTM's sLSTM layers (``SLSTMCell``), ``num_heads`` dividing ``hidden_size``."""

    num_heads: int = 1
    forget_gate: str = "sigmoid"
    kind = "slstm"

    def cell_options(self) -> dict:
        return {"num_heads": self.num_heads, "forget_gate": self.forget_gate}


class MLSTM(_Recurrent):
    """xLSTM's mLSTM layers (``MLSTMCell``; the parallel form under ``impl='auto'``)."""

    num_heads: int = 1
    kind = "mlstm"

    def cell_options(self) -> dict:
        return {"num_heads": self.num_heads}
