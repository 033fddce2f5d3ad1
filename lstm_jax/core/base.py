"""What every cell module shares: the LSTM carry, the default initialisers, and the machinery of
the cells whose input projection is one kernel and one bias (``ProjectedInputs``).

One home, below ``core.cells`` and the other cell modules, so that they import it and not each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lstm_jax.core.errors import ConfigError
from lstm_jax.core.products import matmul

__all__ = ["LSTMCarry", "Initializer", "ProjectedInputs", "glorot_uniform", "orthogonal", "zeros"]

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class ProjectedInputs:
    """Shared machinery of the cells whose input projection is one kernel ``(I, P)`` (or a
    vocabulary's rows, ``token_inputs``) and one bias ``(P,)``, hoisted out of the time loop:
    validation, ``input_projection``, a zero ``initial_carry`` of ``hidden_size`` and
    ``apply(p, carry, x) == step(p, carry, input_projection(p, x))``.

    A mixin without fields: the cells are frozen dataclasses that declare ``hidden_size``,
    ``dtype``, ``param_dtype`` and ``token_inputs`` (in their own positional order) and define
    ``init`` and ``step``.
    """

    hidden_size: int
    dtype: Any
    token_inputs: bool

    def __post_init__(self):
        if not _positive_int(self.hidden_size):
            raise ConfigError(f"{type(self).__name__}: hidden_size must be a positive int, got {self.hidden_size!r}.")

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def feature_ndim(self) -> int:
        """The per-example trailing axes of one step's input: 1 (features), 0 for token ids."""
        return 0 if self.token_inputs else 1

    def _check_input_size(self, input_size: Any) -> None:
        if not _positive_int(input_size):
            raise ConfigError(f"{self.name}.init: input_size must be a positive int, got {input_size!r}.")

    def initial_carry(self, batch_shape: tuple[int, ...] | int = ()) -> Any:
        """A zero carry for inputs with leading ``batch_shape`` (``()`` for a single example)."""
        shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return jnp.zeros(shape + (self.hidden_size,), self.param_dtype)

    def check_inputs(self, params: dict, x: Array) -> None:
        """Raise ``ConfigError`` at trace time when ``x`` cannot feed this cell's ``params``."""
        n_in = params["input_kernel"].shape[0]
        is_int = jnp.issubdtype(x.dtype, jnp.integer)
        if self.token_inputs and not is_int:
            raise ConfigError(
                f"{self.name} was built with token_inputs=True and expects integer token ids with no "
                f"feature axis, but got {x.dtype} inputs of shape {x.shape}; pass token ids or build "
                f"the cell with token_inputs=False."
            )
        if not self.token_inputs and is_int:
            raise ConfigError(
                f"{self.name} expects float features of size {n_in} but got integer inputs "
                f"({x.dtype}, shape {x.shape}); embed the tokens first, or build the cell with "
                f"token_inputs=True to treat integers as token ids (a one-hot input done as a row gather)."
            )
        if not self.token_inputs and (x.ndim == 0 or x.shape[-1] != n_in):
            raise ConfigError(
                f"{self.name}: inputs have {x.shape[-1] if x.ndim else 'no'} features (shape {x.shape}) "
                f"but the params were initialised for input_size={n_in}; reshape the inputs or "
                f"re-initialise with cell.init(key, {x.shape[-1] if x.ndim else '...'})."
            )

    def input_projection(self, params: dict, x: Array) -> Array:
        """``x @ input_kernel + bias`` in the params' dtype (a row gather for token ids): ``(..., P)``."""
        self.check_inputs(params, x)
        out_dtype = params["bias"].dtype
        if self.token_inputs:
            proj = jnp.take(params["input_kernel"], x, axis=0).astype(out_dtype)
        else:
            proj = matmul(x, params["input_kernel"], self.dtype, out_dtype)
        return proj + params["bias"]

    def step(self, params: dict, carry: Any, x_proj: Array) -> tuple[Any, Array]:
        """One time step from an already projected input ``x_proj = input_projection(params, x)``."""
        raise NotImplementedError

    def apply(self, params: dict, carry: Any, x: Array) -> tuple[Any, Array]:
        """One time step: ``(params, carry, x) -> (new_carry, y)``; fits ``jax.lax.scan`` directly."""
        return self.step(params, carry, self.input_projection(params, x))
