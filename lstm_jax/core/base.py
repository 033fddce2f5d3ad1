"""What every cell module shares: the LSTM carry and the default initialisers.

One home, below ``core.cells`` and the other cell modules, so that they import it and not each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

__all__ = ["LSTMCarry", "Initializer", "glorot_uniform", "orthogonal", "zeros"]

Array = jax.Array
Initializer = Callable[..., Array]


class LSTMCarry(NamedTuple):
    """The LSTM state: hidden state ``h`` (also the output) and cell state ``c``.

    Named fields on purpose: PyTorch orders the state ``(h, c)``, Flax ``(c, h)``.
    """

    h: Array
    c: Array


# Module-level defaults so that two equal cells compare (and hash) equal, e.g. as jit static args.
glorot_uniform: Initializer = jax.nn.initializers.glorot_uniform()
orthogonal: Initializer = jax.nn.initializers.orthogonal()
zeros: Initializer = jax.nn.initializers.zeros
