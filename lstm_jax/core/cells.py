"""Recurrent cells as pure functions over plain pytrees: LSTM, GRU, MGU and a plain (Elman) RNN.

Each cell is a small immutable (frozen, hashable) description with three pure functions, in the
style of optax's ``GradientTransformation``::

    params = cell.init(key, input_size)               # a dict of arrays
    carry = cell.initial_carry(batch_shape)            # zeros; LSTMCarry(h, c) or an array h
    carry, y = cell.apply(params, carry, x)            # one time step; fits ``jax.lax.scan``

``apply`` is split in two so that a sequence layer can hoist the input projection out of the
time loop: ``apply(p, carry, x) == step(p, carry, input_projection(p, x))``. Inputs may have any
leading batch shape, including none, so ``jax.vmap`` over ``apply`` works too.

All gates are fused: one input kernel ``(input_size, G*H)``, one recurrent kernel ``(H, G*H)``
and one bias ``(G*H,)`` per cell, gates in PyTorch/cuDNN order. With ``token_inputs=True`` the
inputs are integer token ids (no feature axis) and the input projection is a row gather of the
input kernel: exactly a one-hot input, without ever building the one-hot matrix.

``dtype`` is the compute dtype of the matrix products (``None``: that of the params); products
accumulate in float32 and the gate arithmetic and the carry stay in ``param_dtype``, so
``dtype=jnp.bfloat16`` with float32 params is the usual mixed-precision mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.core.base import Initializer, LSTMCarry, ProjectedInputs, glorot_uniform, orthogonal, zeros
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.mincells import MinGRUCell, MinLSTMCell
from lstm_jax.core.products import matmul
from lstm_jax.core.xlstm import MLSTMCell, SLSTMCell

__all__ = ["LSTMCarry", "LSTMCell", "GRUCell", "MGUCell", "RNNCell", "LeakyRNNCell", "Cell", "make_cell"]

Array = jax.Array
Params = dict


@dataclasses.dataclass(frozen=True)
class _FusedCell(ProjectedInputs):
    """Shared machinery of the gated cells: parameters ``input_kernel (I, G*H)``,
    ``recurrent_kernel (H, G*H)``, ``bias (G*H,)``, and the recurrent product; validation and the
    input projection come from ``core.base.ProjectedInputs``."""

    hidden_size: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = glorot_uniform
    recurrent_kernel_init: Initializer = orthogonal
    bias_init: Initializer = zeros
    token_inputs: bool = False

    num_gates = 1  # overridden per cell

    def init(self, key: Array, input_size: int) -> Params:
        """Parameters ``{'input_kernel', 'recurrent_kernel', 'bias'}`` for inputs of ``input_size``
        features (or a vocabulary of ``input_size`` tokens when ``token_inputs``)."""
        self._check_input_size(input_size)
        k_in, k_rec, k_b = jax.random.split(key, 3)
        gh = self.num_gates * self.hidden_size
        return {
            "input_kernel": self.kernel_init(k_in, (input_size, gh), self.param_dtype),
            "recurrent_kernel": self.recurrent_kernel_init(k_rec, (self.hidden_size, gh), self.param_dtype),
            "bias": self.bias_init(k_b, (gh,), self.param_dtype),
        }

    def recurrent_projection(self, params: Params, h: Array, recurrent_mask: Array | None = None) -> Array:
        """``h @ recurrent_kernel``; with ``recurrent_mask`` (variational recurrent dropout, already
        scaled) ``(h * recurrent_mask) @ recurrent_kernel``."""
        h = h if recurrent_mask is None else h * recurrent_mask
        return matmul(h, params["recurrent_kernel"], self.dtype, params["bias"].dtype)

    def step(self, params: Params, carry: Any, x_proj: Array,
             recurrent_mask: Array | None = None) -> tuple[Any, Array]:
        """One time step from an already projected input ``x_proj = input_projection(params, x)``.
        ``recurrent_mask`` ``(*batch, H)``: recurrent dropout, the state entering the recurrent
        products is ``h * recurrent_mask`` (gated mixes such as the GRU's ``z * h`` keep ``h``)."""
        raise NotImplementedError



@dataclasses.dataclass(frozen=True)
class LSTMCell(_FusedCell):
    r"""Long short-term memory cell (Hochreiter & Schmidhuber 1997, with a forget gate).

    Equations, gates fused in the order ``i, f, g, o`` (as PyTorch, cuDNN and Keras)::

        z = x @ W_i + h @ W_h + b          # (..., 4H), split into i, f, g, o
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')         # output y = h'

    Parameters (``I`` input features or vocabulary size, ``H = hidden_size``):
    ``input_kernel (I, 4H)`` Glorot-uniform, ``recurrent_kernel (H, 4H)`` orthogonal,
    ``bias (4H,)`` zeros with the forget-gate slice set to ``forget_bias`` (1.0), as Keras.
    Carry: ``LSTMCarry(h, c)``, each ``(*batch, H)``.

    With ``proj_size=P`` (0 < P < H; LSTMP, Sak et al. 2014; PyTorch's ``nn.LSTM(proj_size=P)``)
    the output is projected, and the projection is what recurs::

        h' = (sigmoid(o) * tanh(c')) @ W_hr       # (..., P); output y = h'

    with ``projection_kernel`` ``W_hr (H, P)`` (Glorot-uniform) and ``recurrent_kernel (P, 4H)``;
    the carry is ``h (*batch, P)`` and ``c (*batch, H)``.

    Warning:
      PyTorch keeps two biases (``b_ih`` and ``b_hh``) and initialises everything uniformly;
      here there is one bias (their sum; see ``lstm_jax.interop``) and Keras initialisers.
      Flax orders the carry ``(c, h)``; this carry has named fields. PyTorch stores the
      projection as ``weight_hr_l{k}`` ``(P, H)``, the transpose of ``projection_kernel``.

    **Peepholes** (``peepholes=True``; Gers & Schmidhuber 2000, in the form of TF's
    ``PeepholeLSTMCell`` and oneDNN's LSTM primitive): diagonal weights from the cell state into the
    gates, the old state into ``i`` and ``f``, the new one into ``o``::

        i = sigmoid(z_i + w_ci * c);  f = sigmoid(z_f + w_cf * c)
        c' = f * c + i * tanh(z_g)
        h' = sigmoid(z_o + w_co * c') * tanh(c')

    Extra parameters ``peephole_i``, ``peephole_f``, ``peephole_o``, each ``(H,)``, zeros (the cell
    starts as the plain LSTM).

    **Layer normalisation** (``layer_norm=True``; Ba et al. 2016, placed as TF-Addons'
    ``LayerNormLSTMCell``): ``LN`` normalises over the last axis, ``LN(v) = (v - mean(v)) /
    sqrt(var(v) + norm_epsilon)`` (``norm_epsilon`` 1e-3, as TF-Addons), over all ``4H`` gate
    pre-activations at once for the two projections, and over the ``H`` units for the state::

        z = LN(x @ W_i) * g_x + LN(h @ W_h) * g_h + b
        c' = LN(sigmoid(f) * c + sigmoid(i) * tanh(g)) * g_c + b_c      # the carried state
        h' = sigmoid(o) * tanh(c')

    Extra parameters ``ln_input_scale (4H,)``, ``ln_recurrent_scale (4H,)``, ``ln_cell_scale (H,)``
    ones and ``ln_cell_offset (H,)`` zeros. The input projection ``LN(x @ W_i) * g_x + b`` is still
    computed for all steps before the time loop.

    Warning:
      Both options run the autodiff scan only (``lstm_jax.dispatch``: the fused and oneDNN
      kernels refuse them), and they cannot be combined. TF initialises the peephole weights
      Glorot-uniform; here they start at zero. TF-Addons' two projection norms each have an offset
      ``beta`` next to the bias ``b``: here the three are one ``bias`` (their sum, the same function).
      TF-Addons carries the normalised state ``c'``, as here; Ba et al.'s equations carry the
      un-normalised one and normalise only inside ``tanh``. Other implementations (e.g. TF1's
      ``LayerNormBasicLSTMCell``) normalise each gate's block separately: not this one.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> cell = LSTMCell(hidden_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry = cell.initial_carry(batch_shape=(2,))
        >>> carry, y = cell.apply(params, carry, jnp.ones((2, 3)))
        >>> y.shape, carry.c.shape
        ((2, 8), (2, 8))
    """

    forget_bias: float = 1.0
    peepholes: bool = False
    layer_norm: bool = False
    norm_epsilon: float = 1e-3
    proj_size: int = 0  # LSTMP: 0 = no projection
    num_gates = 4

    def __post_init__(self):
        super().__post_init__()
        for option in ("peepholes", "layer_norm"):
            if not isinstance(getattr(self, option), bool):
                raise ConfigError(f"LSTMCell: {option} must be True or False, got {getattr(self, option)!r}.")
        if self.peepholes and self.layer_norm:
            raise ConfigError("LSTMCell: peepholes=True and layer_norm=True cannot be combined (no reference "
                              "defines which cell state, normalised or not, the output gate's peephole reads); "
                              "choose one.")
        if not (isinstance(self.norm_epsilon, (int, float)) and self.norm_epsilon > 0):
            raise ConfigError(f"LSTMCell: norm_epsilon must be a positive number, got {self.norm_epsilon!r}.")
        proj = self.proj_size
        if isinstance(proj, bool) or not isinstance(proj, int) or not 0 <= proj < self.hidden_size:
            raise ConfigError(f"LSTMCell: proj_size must be an int in [0, hidden_size) = [0, {self.hidden_size}) "
                              f"(0: no projection), got {proj!r}.")

    def init(self, key: Array, input_size: int) -> Params:
        params = super().init(key, input_size)
        h = self.hidden_size
        params["bias"] = params["bias"].at[h : 2 * h].add(self.forget_bias)
        # --- options (peepholes, layer_norm): parameters of their own, none of the plain LSTM's changes
        if self.peepholes:
            params.update({f"peephole_{g}": jnp.zeros((h,), self.param_dtype) for g in "ifo"})
        if self.layer_norm:
            params.update(ln_input_scale=jnp.ones((4 * h,), self.param_dtype),
                          ln_recurrent_scale=jnp.ones((4 * h,), self.param_dtype),
                          ln_cell_scale=jnp.ones((h,), self.param_dtype),
                          ln_cell_offset=jnp.zeros((h,), self.param_dtype))
        if self.proj_size:  # LSTMP: h is projected to P units, and P units recur
            k_rec, k_proj = jax.random.split(jax.random.fold_in(key, 1))
            params["recurrent_kernel"] = self.recurrent_kernel_init(k_rec, (self.proj_size, 4 * h), self.param_dtype)
            params["projection_kernel"] = self.kernel_init(k_proj, (h, self.proj_size), self.param_dtype)
        return params

    def initial_carry(self, batch_shape: tuple[int, ...] | int = ()) -> LSTMCarry:
        zeros = super().initial_carry(batch_shape)
        if self.proj_size:
            return LSTMCarry(h=jnp.zeros(zeros.shape[:-1] + (self.proj_size,), zeros.dtype), c=zeros)
        return LSTMCarry(h=zeros, c=zeros)

    def input_projection(self, params: Params, x: Array) -> Array:
        if not self.layer_norm:
            return super().input_projection(params, x)
        # layer_norm: LN(x @ W_i) * g_x + b (the bias after the normalisation)
        proj = super().input_projection({**params, "bias": jnp.zeros_like(params["bias"])}, x)
        return _layer_norm(proj, params["ln_input_scale"], None, self.norm_epsilon) + params["bias"]

    def step(self, params: Params, carry: LSTMCarry, x_proj: Array,
             recurrent_mask: Array | None = None) -> tuple[LSTMCarry, Array]:
        if self.peepholes or self.layer_norm:
            return self._step_with_options(params, carry, x_proj, recurrent_mask)
        z = x_proj + self.recurrent_projection(params, carry.h, recurrent_mask)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        if self.proj_size:  # LSTMP
            h = matmul(h, params["projection_kernel"], self.dtype, params["bias"].dtype)
        return LSTMCarry(h=h, c=c), h

    def _step_with_options(self, params: Params, carry: LSTMCarry, x_proj: Array,
                           recurrent_mask: Array | None = None) -> tuple[LSTMCarry, Array]:
        """``step`` with peepholes or layer normalisation (the class docstring's equations)."""
        u = self.recurrent_projection(params, carry.h, recurrent_mask)
        if self.layer_norm:
            u = _layer_norm(u, params["ln_recurrent_scale"], None, self.norm_epsilon)
        i, f, g, o = jnp.split(x_proj + u, 4, axis=-1)
        if self.peepholes:
            i = i + params["peephole_i"] * carry.c
            f = f + params["peephole_f"] * carry.c
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        if self.layer_norm:
            c = _layer_norm(c, params["ln_cell_scale"], params["ln_cell_offset"], self.norm_epsilon)
        if self.peepholes:
            o = o + params["peephole_o"] * c
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        if self.proj_size:  # LSTMP
            h = matmul(h, params["projection_kernel"], self.dtype, params["bias"].dtype)
        return LSTMCarry(h=h, c=c), h


def _layer_norm(v: Array, scale: Array, offset: Array | None, epsilon: float) -> Array:
    """``(v - mean) / sqrt(var + epsilon) * scale (+ offset)`` over the last axis (Keras's
    ``LayerNormalization``: the biased variance, ``epsilon`` inside the square root)."""
    mean = jnp.mean(v, axis=-1, keepdims=True)
    centred = v - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + epsilon) * scale
    return out if offset is None else out + offset


@dataclasses.dataclass(frozen=True)
class GRUCell(_FusedCell):
    r"""Gated recurrent unit (Cho et al. 2014), gates fused in the order ``r, z, n`` (PyTorch).

    With ``reset_after=True`` (the default; PyTorch, cuDNN and Keras ``reset_after=True``) the
    reset gate scales the recurrent product, so one recurrent matmul serves all gates::

        a = x @ W_i + b                    # (..., 3H) -> a_r, a_z, a_n
        u = h @ W_h + b_h                  # (..., 3H) -> u_r, u_z, u_n
        r = sigmoid(a_r + u_r);  z = sigmoid(a_z + u_z)
        n = tanh(a_n + r * u_n)
        h' = (1 - z) * n + z * h           # output y = h'

    With ``reset_after=False`` (the original paper; Keras ``reset_after=False``) the reset gate
    scales the state before its product, and there is no recurrent bias::

        n = tanh(a_n + (r * h) @ W_hn)

    Parameters: ``input_kernel (I, 3H)`` Glorot-uniform, ``recurrent_kernel (H, 3H)`` orthogonal,
    ``bias (3H,)`` zeros, and with ``reset_after`` also ``recurrent_bias (3H,)`` zeros.
    Carry: the hidden state ``h`` of shape ``(*batch, H)``.

    Warning:
      Keras orders the gates ``z, r, h``; here they are in PyTorch's ``r, z, n`` order.
    """

    reset_after: bool = True
    num_gates = 3

    def init(self, key: Array, input_size: int) -> Params:
        k_cell, k_rb = jax.random.split(key)
        params = super().init(k_cell, input_size)
        if self.reset_after:
            params["recurrent_bias"] = self.bias_init(k_rb, (3 * self.hidden_size,), self.param_dtype)
        return params

    def step(self, params: Params, carry: Array, x_proj: Array,
             recurrent_mask: Array | None = None) -> tuple[Array, Array]:
        h = carry
        h_rec = h if recurrent_mask is None else h * recurrent_mask  # Keras: only the products' input
        a_r, a_z, a_n = jnp.split(x_proj, 3, axis=-1)
        if self.reset_after:
            u = self.recurrent_projection(params, h_rec) + params["recurrent_bias"]
            u_r, u_z, u_n = jnp.split(u, 3, axis=-1)
            r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
            n = jnp.tanh(a_n + r * u_n)
        else:
            w = params["recurrent_kernel"]
            hs = self.hidden_size
            out = params["bias"].dtype
            u_rz = matmul(h_rec, w[:, : 2 * hs], self.dtype, out)
            r, z = jnp.split(jax.nn.sigmoid(jnp.concatenate([a_r, a_z], -1) + u_rz), 2, axis=-1)
            n = jnp.tanh(a_n + matmul(r * h_rec, w[:, 2 * hs :], self.dtype, out))
        h = (1.0 - z) * n + z * h
        return h, h


@dataclasses.dataclass(frozen=True)
class MGUCell(_FusedCell):
    r"""Minimal gated unit (Zhou et al. 2016, arXiv:1603.09420): a GRU whose one forget gate ``f``
    also plays the reset gate. Gates fused in the order ``f, n``; equations as Flax linen's
    ``MGUCell``. With ``reset_gate=True`` (the default) ``f`` scales the recurrent product, bias
    included, so one recurrent matmul serves both gates::

        a = x @ W_i + b                    # (..., 2H) -> a_f, a_n
        u = h @ W_h + b_h                  # (..., 2H) -> u_f, u_n
        f = sigmoid(a_f + u_f)
        n = tanh(a_n + f * u_n)
        h' = (1 - f) * n + f * h           # output y = h': f keeps the old state

    With ``reset_gate=False`` (Flax's variant) the candidate is ungated and there is no recurrent
    bias; ``f`` still mixes the old state and the candidate, so there are two gates either way::

        f = sigmoid(a_f + h @ W_hf);  n = tanh(a_n + h @ W_hn)

    Parameters (``I`` input features or vocabulary size, ``H = hidden_size``):
    ``input_kernel (I, 2H)`` Glorot-uniform, ``recurrent_kernel (H, 2H)`` orthogonal,
    ``bias (2H,)`` zeros with the forget-gate slice set to ``forget_bias`` (1.0, as Flax's
    ``forget_bias_init=ones``), and with ``reset_gate`` also ``recurrent_bias (2H,)`` zeros (only
    its ``n`` slice sits inside the gated product; its ``f`` slice just adds to ``bias``).
    Carry: the hidden state ``h`` of shape ``(*batch, H)``.

    Warning:
      Flax keeps four separate ``Dense`` layers (``if``, ``hf``, ``in``, ``hn``) initialised with
      LeCun-normal input kernels; here the kernels are fused and the input kernels Glorot-uniform,
      as the other cells (import Flax's weights with ``lstm_jax.interop.from_flax_mgu``). Flax's
      ``f`` multiplies the old state, so ``1 - f`` is what lets new input in.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> cell = MGUCell(hidden_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry, y = cell.apply(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
        >>> y.shape, params["recurrent_kernel"].shape
        ((2, 8), (8, 16))
    """

    reset_gate: bool = True
    forget_bias: float = 1.0
    num_gates = 2

    def init(self, key: Array, input_size: int) -> Params:
        k_cell, k_rb = jax.random.split(key)
        params = super().init(k_cell, input_size)
        params["bias"] = params["bias"].at[: self.hidden_size].add(self.forget_bias)
        if self.reset_gate:
            params["recurrent_bias"] = self.bias_init(k_rb, (2 * self.hidden_size,), self.param_dtype)
        return params

    def step(self, params: Params, carry: Array, x_proj: Array,
             recurrent_mask: Array | None = None) -> tuple[Array, Array]:
        h = carry
        a_f, a_n = jnp.split(x_proj, 2, axis=-1)
        u = self.recurrent_projection(params, h, recurrent_mask)
        if self.reset_gate:
            u = u + params["recurrent_bias"]
        u_f, u_n = jnp.split(u, 2, axis=-1)
        f = jax.nn.sigmoid(a_f + u_f)
        n = jnp.tanh(a_n + f * u_n if self.reset_gate else a_n + u_n)
        h = (1.0 - f) * n + f * h
        return h, h


ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class RNNCell(_FusedCell):
    r"""Plain (Elman) recurrent cell::

        h' = activation(x @ W_i + h @ W_h + b)      # output y = h'

    ``activation`` is ``'tanh'`` (default) or ``'relu'``. Parameters: ``input_kernel (I, H)``
    Glorot-uniform, ``recurrent_kernel (H, H)`` orthogonal, ``bias (H,)`` zeros.
    Carry: ``h`` of shape ``(*batch, H)``.

    Warning:
      PyTorch's ``nn.RNN`` keeps two biases; this cell keeps their sum.
    """

    activation: str = "tanh"
    num_gates = 1

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"RNNCell: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}."
            )

    def step(self, params: Params, carry: Array, x_proj: Array,
             recurrent_mask: Array | None = None) -> tuple[Array, Array]:
        h = ACTIVATIONS[self.activation](x_proj + self.recurrent_projection(params, carry, recurrent_mask))
        return h, h


@dataclasses.dataclass(frozen=True)
class LeakyRNNCell(_FusedCell):
    r"""Leaky-integrator recurrent cell: a plain RNN whose state moves only part of the way::

        h' = (1 - alpha) * h + alpha * activation(x @ W_i + h @ W_h + b)      # output y = h'

    ``alpha`` in ``(0, 1]`` (``alpha=1`` is ``RNNCell``). The leak is the lesson's remedy between
    the plain RNN and gates: the Jacobian ``dh'/dh = (1 - alpha) I + alpha * diag(act') W_h``
    keeps a ``1 - alpha`` share of the identity, so gradients shrink far slower over long spans
    than ``diag(act') W_h`` alone, at the price of a fixed, input-independent time scale (an LSTM
    learns its forget gate per step). Parameters and initialisers as ``RNNCell``; carry ``h``
    ``(*batch, H)``. PyTorch has no equivalent module, so there is no weight import.
    """

    alpha: float = 0.1
    activation: str = "tanh"
    num_gates = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"LeakyRNNCell: alpha must be in (0, 1] (1 = plain RNN), got {self.alpha!r}.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"LeakyRNNCell: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}."
            )

    def step(self, params: Params, carry: Array, x_proj: Array,
             recurrent_mask: Array | None = None) -> tuple[Array, Array]:
        target = ACTIVATIONS[self.activation](x_proj + self.recurrent_projection(params, carry, recurrent_mask))
        h = carry + self.alpha * (target - carry)
        return h, h


Cell = LSTMCell | GRUCell | MGUCell | RNNCell | LeakyRNNCell | MinGRUCell | MinLSTMCell | SLSTMCell | MLSTMCell
CELL_TYPES: dict[str, type] = {"lstm": LSTMCell, "gru": GRUCell, "mgu": MGUCell, "rnn": RNNCell,
                               "leaky_rnn": LeakyRNNCell, "mingru": MinGRUCell, "minlstm": MinLSTMCell,
                               "slstm": SLSTMCell, "mlstm": MLSTMCell}


def make_cell(kind: str, hidden_size: int, **options: Any) -> Cell:
    """Build a cell by name (``'lstm'``, ``'gru'``, ``'mgu'``, ``'rnn'``, ``'leaky_rnn'``, ``'convlstm'``,
    ``'mingru'``, ``'minlstm'``, ``'slstm'`` or ``'mlstm'``; the last four in ``core.mincells`` and
    ``core.xlstm``), checking every option.

    Unknown names or options, or a required option left out (``kernel_size`` of ``'convlstm'``),
    raise ``ConfigError`` listing the valid ones, e.g.
    ``make_cell('gru', 64, reset_after=False, dtype=jnp.bfloat16)`` or
    ``make_cell('convlstm', 16, kernel_size=(3, 3))``.
    """
    name = str(kind).lower()
    if name == "convlstm":  # defined in core.convlstm, which imports this module
        from lstm_jax.core.convlstm import ConvLSTMCell

        cls = ConvLSTMCell
    else:
        cls = CELL_TYPES.get(name)
    if cls is None:
        raise ConfigError(f"Unknown cell kind {kind!r}; choose one of {sorted([*CELL_TYPES, 'convlstm'])}.")
    fields = [f for f in dataclasses.fields(cls) if f.name != "hidden_size"]
    valid = {f.name for f in fields}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {unknown} for a {kind} cell; valid options are {sorted(valid)}."
        )
    missing = [f.name for f in fields if f.name not in options and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"A {kind} cell needs the option(s) {missing}, e.g. kernel_size=(3, 3); got none.")
    return cls(hidden_size=hidden_size, **options)
