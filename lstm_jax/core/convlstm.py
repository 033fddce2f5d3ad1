"""The convolutional LSTM cell (Shi et al. 2015) for 1, 2 or 3 spatial dimensions.

Same three pure functions as the other cells (``init``, ``initial_carry``, ``apply``, with
``apply == step(input_projection(x))``), so ``scan_cell`` and ``RecurrentStack`` run it like any
cell: inputs ``(*batch, T, *spatial, C)`` (time-major ``(T, *batch, *spatial, C)``), outputs
``(*batch, T, *spatial', H)``. The input convolution of all time steps is one convolution before the
time loop; the loop does the recurrent convolution and the gates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.core.base import Initializer, LSTMCarry, glorot_uniform, orthogonal, zeros
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.products import in_dtype

__all__ = ["ConvLSTMCell"]

Array = jax.Array
Params = dict
_SPATIAL = "DHW"  # lax dimension letters of the last (up to) three spatial axes


@dataclasses.dataclass(frozen=True)
class ConvLSTMCell:
    r"""Convolutional LSTM cell (Shi et al. 2015, arXiv:1506.04214) over ``n = len(kernel_size)``
    spatial dimensions (1, 2 or 3), gates fused in the order ``i, f, g, o`` (as ``LSTMCell``)::

        z = conv(x, W_x; strides, padding) + conv(h, W_h; 1, same shape) + b   # (..., 4H)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')                                            # output y = h'

    ``kernel_size``, ``strides`` (default all 1) and ``padding`` (``'SAME'``, ``'VALID'`` or one
    ``(low, high)`` pair per spatial dimension) have Flax linen ``ConvLSTMCell``'s meaning for the
    input convolution. The recurrent convolution runs at stride 1 and keeps the state's shape: it
    takes ``padding`` where that keeps the shape (``'SAME'``, or pairs with ``low + high =
    kernel - 1``) and ``'SAME'`` otherwise.

    Parameters (``C`` input channels, ``H = hidden_size``, ``k = kernel_size``):
    ``input_kernel (*k, C, 4H)`` Glorot-uniform, ``recurrent_kernel (*k, H, 4H)`` orthogonal,
    ``bias (4H,)`` zeros with the forget-gate slice set to ``forget_bias`` (1.0); no bias with
    ``use_bias=False``. Carry: ``LSTMCarry(h, c)``, each ``(*batch, *spatial', H)`` where
    ``spatial'`` is the input convolution's output shape. ``initial_carry`` takes the input's shape
    without its channel axis, ``(*batch, *spatial)``, as Flax's ``initialize_carry``.

    Warning:
      Flax orders the gates ``i, g, f, o``, keeps two biases (``ih`` and ``hh``), adds a constant
      1 to the forget gate in every step (here it is part of the bias, as ``forget_bias`` at
      init), initialises its kernels LeCun-normal and orders the carry ``(c, h)``;
      ``lstm_jax.interop.from_flax_convlstm`` converts its params. Flax applies ``strides`` and
      ``padding`` to the recurrent convolution too, which only runs where they keep the state's
      shape; there the two cells agree. Keras's ``ConvLSTM2D`` is channels-last as here but orders
      the gates ``i, f, c, o`` with its own initialisers. The cell runs the autodiff scan only
      (``lstm_jax.dispatch``); ``seq_lengths`` work as for the other cells.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> cell = ConvLSTMCell(hidden_size=4, kernel_size=(3, 3))
        >>> params = cell.init(jax.random.key(0), input_size=2)
        >>> x = jnp.ones((5, 8, 8, 2))                           # (batch, *spatial, channels)
        >>> carry, y = cell.apply(params, cell.initial_carry(x.shape[:-1]), x)
        >>> y.shape, params["input_kernel"].shape
        ((5, 8, 8, 4), (3, 3, 2, 16))
    """

    hidden_size: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    forget_bias: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = glorot_uniform
    recurrent_kernel_init: Initializer = orthogonal
    bias_init: Initializer = zeros
    token_inputs: bool = False

    num_gates = 4

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ConfigError(f"{name}: hidden_size must be a positive int, got {self.hidden_size!r}.")
        kernel = self.kernel_size
        if (not isinstance(kernel, Sequence) or not 1 <= len(kernel) <= 3
                or not all(isinstance(k, int) and k > 0 for k in kernel)):
            raise ConfigError(f"{name}: kernel_size must be 1 to 3 positive ints (one per spatial dimension), "
                              f"got {kernel!r}.")
        n = len(kernel)
        strides = (1,) * n if self.strides is None else self.strides
        if (not isinstance(strides, Sequence) or len(strides) != n
                or not all(isinstance(s, int) and s > 0 for s in strides)):
            raise ConfigError(f"{name}: strides must be {n} positive ints (one per spatial dimension of "
                              f"kernel_size={tuple(kernel)}) or None, got {self.strides!r}.")
        padding = self.padding
        if isinstance(padding, str):
            if padding.upper() not in ("SAME", "VALID"):
                raise ConfigError(f"{name}: padding must be 'SAME', 'VALID' or {n} (low, high) pairs, got {padding!r}.")
            padding = padding.upper()
        elif (isinstance(padding, Sequence) and len(padding) == n
              and all(isinstance(p, Sequence) and len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p)
                      for p in padding)):
            padding = tuple(tuple(p) for p in padding)
        else:
            raise ConfigError(f"{name}: padding must be 'SAME', 'VALID' or {n} (low, high) pairs of ints >= 0, "
                              f"got {padding!r}.")
        if self.token_inputs:
            raise ConfigError(f"{name}: token_inputs must be False (a convolution takes float channels), got True.")
        # hashable, normalised fields: equal cells compare and hash equal (jit static arguments)
        object.__setattr__(self, "kernel_size", tuple(kernel))
        object.__setattr__(self, "strides", tuple(strides))
        object.__setattr__(self, "padding", padding)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def feature_ndim(self) -> int:
        """The per-example trailing axes of one step's input: the spatial ones and the channels."""
        return len(self.kernel_size) + 1

    @property
    def recurrent_padding(self) -> str | tuple:
        """The recurrent convolution's padding: ``padding`` where it keeps the state's shape at
        stride 1, else ``'SAME'``."""
        if isinstance(self.padding, tuple) and all(lo + hi == k - 1 for (lo, hi), k in
                                                   zip(self.padding, self.kernel_size)):
            return self.padding
        return "SAME"

    def init(self, key: Array, input_size: int) -> Params:
        """Parameters for inputs of ``input_size`` channels (the class docstring's shapes)."""
        if not isinstance(input_size, int) or input_size <= 0:
            raise ConfigError(f"{self.name}.init: input_size must be a positive int (input channels), "
                              f"got {input_size!r}.")
        k_in, k_rec, k_b = jax.random.split(key, 3)
        h, gh = self.hidden_size, 4 * self.hidden_size
        params = {
            "input_kernel": self.kernel_init(k_in, (*self.kernel_size, input_size, gh), self.param_dtype),
            "recurrent_kernel": self.recurrent_kernel_init(k_rec, (*self.kernel_size, h, gh), self.param_dtype),
        }
        if self.use_bias:
            params["bias"] = self.bias_init(k_b, (gh,), self.param_dtype).at[h : 2 * h].add(self.forget_bias)
        return params

    def output_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The input convolution's output shape for inputs of ``spatial`` shape."""
        n = len(self.kernel_size)
        lhs = jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32)
        rhs = jax.ShapeDtypeStruct((*self.kernel_size, 1, 1), jnp.float32)
        out = jax.eval_shape(lambda a, b: _conv(a, b, self.strides, self.padding, None, jnp.float32), lhs, rhs)
        return tuple(out.shape[1 : 1 + n])

    def initial_carry(self, input_shape: tuple[int, ...] = ()) -> LSTMCarry:
        """A zero carry for inputs of shape ``(*batch, *spatial, C)`` without the channel axis, i.e.
        ``input_shape = (*batch, *spatial)``: ``LSTMCarry`` of ``(*batch, *spatial', H)`` zeros."""
        shape = tuple(input_shape)
        n = len(self.kernel_size)
        if len(shape) < n:
            raise ConfigError(f"{self.name}.initial_carry: input_shape must end with the {n} spatial dimensions, "
                              f"(*batch, *spatial) without the channel axis, got {shape}.")
        zeros_ = jnp.zeros(shape[: len(shape) - n] + self.output_spatial(shape[len(shape) - n :])
                           + (self.hidden_size,), self.param_dtype)
        return LSTMCarry(h=zeros_, c=zeros_)

    def check_inputs(self, params: Params, x: Array) -> None:
        """Raise ``ConfigError`` at trace time when ``x`` cannot feed this cell's ``params``."""
        n_in, n = params["input_kernel"].shape[-2], len(self.kernel_size)
        if jnp.issubdtype(x.dtype, jnp.integer):
            raise ConfigError(f"{self.name} expects float inputs (*batch, *spatial, {n_in}) but got integer inputs "
                              f"({x.dtype}, shape {x.shape}); convert or embed them first.")
        if x.ndim < n + 1 or x.shape[-1] != n_in:
            raise ConfigError(f"{self.name}: inputs must end with {n} spatial axes and {n_in} channels "
                              f"(*batch, *spatial, {n_in}), got shape {x.shape}; reshape the inputs or "
                              f"re-initialise with cell.init(key, {x.shape[-1] if x.ndim else '...'}).")

    def input_projection(self, params: Params, x: Array) -> Array:
        """``conv(x, input_kernel) + bias`` in ``param_dtype``: ``(*lead, *spatial', 4H)``."""
        self.check_inputs(params, x)
        out_dtype = params["input_kernel"].dtype
        proj = _conv(x, params["input_kernel"], self.strides, self.padding, self.dtype, out_dtype)
        return proj + params["bias"] if "bias" in params else proj

    def recurrent_projection(self, params: Params, h: Array) -> Array:
        out_dtype = params["recurrent_kernel"].dtype
        return _conv(h, params["recurrent_kernel"], (1,) * len(self.kernel_size), self.recurrent_padding,
                     self.dtype, out_dtype)

    def step(self, params: Params, carry: LSTMCarry, x_proj: Array) -> tuple[LSTMCarry, Array]:
        """One time step from an already projected input ``x_proj = input_projection(params, x)``."""
        z = x_proj + self.recurrent_projection(params, carry.h)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return LSTMCarry(h=h, c=c), h

    def apply(self, params: Params, carry: LSTMCarry, x: Array) -> tuple[LSTMCarry, Array]:
        """One time step: ``(params, carry, x) -> (new_carry, y)`` for ``x`` ``(*batch, *spatial, C)``."""
        return self.step(params, carry, self.input_projection(params, x))


def _conv(x: Array, w: Array, strides: tuple, padding: Any, dtype: Any, out_dtype: Any) -> Array:
    """Channels-last convolution of ``x (*lead, *spatial, C)`` with ``w (*k, C, O)``, every leading
    axis a batch axis, computed in ``dtype`` (None: promoted) and returned in ``out_dtype``."""
    n = w.ndim - 2
    lead = x.shape[: x.ndim - n - 1]
    flat = x.reshape((-1, *x.shape[x.ndim - n - 1 :]))
    flat, w = in_dtype(dtype, flat, w)
    letters = _SPATIAL[-n:]
    y = jax.lax.conv_general_dilated(flat, w, window_strides=strides, padding=padding,
                                     dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
                                     preferred_element_type=out_dtype)
    return y.reshape((*lead, *y.shape[1:])).astype(out_dtype)
