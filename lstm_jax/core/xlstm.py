r"""The xLSTM cells (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", arXiv:2405.04517):
the sLSTM (exponential gating, a normaliser and a stabiliser state, heads with block-diagonal
recurrent weights) and the mLSTM (a matrix memory with a covariance update and no memory mixing,
so a whole sequence also has a parallel form, ``lstm_jax.kernels.parallel_scan``).

Both are the cells alone, as the authors' ``xlstm`` package computes them (its pure-PyTorch
``vanilla`` sLSTM and ``*_stabilized_simple`` mLSTM backends): the blocks around them in the paper
(convolution, up/down projections, group norm, skip connections) are the model's business. The
input projection is one fused kernel and bias (``core.mincells.ProjectedCell``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lstm_jax.core.errors import ConfigError
from lstm_jax.core.mincells import ProjectedCell

__all__ = ["SLSTMCell", "SLSTMCarry", "MLSTMCell", "MLSTMCarry", "FORGET_GATES", "powerlaw_forget_bias",
           "small_init", "STABILISER_START"]

Array = jax.Array
Params = dict
FORGET_GATES = ("sigmoid", "exp")
# The sLSTM's stabiliser at the start: so low that the first step takes m = i~ (the authors' code
# does the same when n == 0), i.e. the first input gate is exactly 1 and n never starts at 0.
STABILISER_START = -1e30


class SLSTMCarry(NamedTuple):
    """The sLSTM state, each ``(*batch, H)``: output ``h``, cell ``c``, normaliser ``n``, stabiliser ``m``."""

    h: Array
    c: Array
    n: Array
    m: Array


class MLSTMCarry(NamedTuple):
    """The mLSTM state: matrix memory ``C (*batch, heads, d, d)`` (key index first), normaliser
    ``n (*batch, heads, d)`` and stabiliser ``m (*batch, heads)``, ``d = hidden_size / heads``."""

    C: Array
    n: Array
    m: Array


def small_init(key: Array, fan_in: int, shape: tuple[int, ...], dtype: Any) -> Array:
    """Normal with standard deviation ``sqrt(2 / (5 fan_in))`` (Nguyen & Salazar 2019; the xlstm
    package's ``small_init_init_``)."""
    return math.sqrt(2.0 / (5.0 * fan_in)) * jax.random.normal(key, shape, dtype)


def powerlaw_forget_bias(head_dim: int, dtype: Any = jnp.float32) -> Array:
    """The xlstm package's ``powerlaw_blockdependent`` forget-gate bias for one head (a single
    block): ``-(-5 + 12 (j / (d - 1)) ** 0.3)`` for ``j = 0 ... d - 1``, from 5 down to -7."""
    if head_dim == 1:
        return jnp.full((1,), 5.0, dtype)
    j = jnp.arange(head_dim, dtype=jnp.float32) / (head_dim - 1)
    return (5.0 - 12.0 * j**0.3).astype(dtype)


def _check_heads(cell: Any) -> None:
    heads = cell.num_heads
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or cell.hidden_size % heads:
        raise ConfigError(f"{cell.name}: num_heads must be a positive int dividing hidden_size={cell.hidden_size}, "
                          f"got {heads!r}.")


@dataclasses.dataclass(frozen=True)
class SLSTMCell(ProjectedCell):
    r"""sLSTM (Beck et al. 2024, eqs. 8-17): exponential input gate, a normaliser ``n`` and a
    stabiliser ``m``, ``num_heads`` heads whose recurrent weights are block-diagonal (memory mixes
    within a head only). Gates fused in the order ``i, f, z, o`` (as the authors' code), each
    ``H`` wide, head-major inside::

        (i~, f~, z~, o~) = x @ W + R h + b           # R: block-diagonal, one (d, 4d) block per head
        log f = log sigmoid(f~)   (forget_gate='sigmoid')   or   f~   ('exp')
        m' = max(log f + m, i~)                      # stabiliser
        i' = exp(i~ - m');  f' = exp(log f + m - m')
        c' = f' * c + i' * tanh(z~)
        n' = f' * n + i'                             # normaliser
        h' = sigmoid(o~) * c' / n'                   # output y = h'

    Stabilising changes ``c`` and ``n`` by the same factor, so ``h`` is the paper's
    unstabilised ``o * c / n``. The zero carry starts ``m`` at ``STABILISER_START`` so that the first
    step has ``i' = 1`` (the authors' code: ``m' = i~`` while ``n == 0``); ``n >= 1`` from then on.

    Parameters (``I`` input features or vocabulary size, ``H = hidden_size``, ``d = H / num_heads``):
    ``input_kernel (I, 4H)`` normal with std ``sqrt(2 / (5 I))`` (the package's ``small_init``),
    ``recurrent_kernel (num_heads, d, 4d)`` zeros (its ``recurrent_weight_init='zeros'``), ``bias
    (4H,)`` zeros but the forget slice, which is the package's ``powerlaw_blockdependent`` init per head
    (``powerlaw_forget_bias``: 5 down to -7). Carry: ``SLSTMCarry(h, c, n, m)``, each ``(*batch, H)``.

    Warning:
      The package keeps the recurrent kernel as ``(heads, 4d, d)`` in its own gate layout and
      computes ``W x`` outside the cell (``sLSTMLayer``, headwise); here ``W`` is one dense kernel.
      Its recurrent kernel per head is this one's ``recurrent_kernel[h].T``.
    """

    num_heads: int = 1
    forget_gate: str = "sigmoid"

    def __post_init__(self):
        super().__post_init__()
        _check_heads(self)
        if self.forget_gate not in FORGET_GATES:
            raise ConfigError(f"SLSTMCell: forget_gate must be one of {FORGET_GATES}, got {self.forget_gate!r}.")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def projection_size(self) -> int:
        return 4 * self.hidden_size

    def init(self, key: Array, input_size: int) -> Params:
        self._check_input_size(input_size)
        h, d, dt = self.hidden_size, self.head_size, self.param_dtype
        forget = jnp.tile(powerlaw_forget_bias(d, dt), self.num_heads)
        return {"input_kernel": small_init(key, input_size, (input_size, 4 * h), dt),
                "recurrent_kernel": jnp.zeros((self.num_heads, d, 4 * d), dt),
                "bias": jnp.zeros((4 * h,), dt).at[h : 2 * h].set(forget)}

    def initial_carry(self, batch_shape: tuple[int, ...] | int = ()) -> SLSTMCarry:
        zeros = super().initial_carry(batch_shape)
        return SLSTMCarry(h=zeros, c=zeros, n=zeros, m=jnp.full_like(zeros, STABILISER_START))

    def recurrent_projection(self, params: Params, h: Array) -> Array:
        """``R h`` for the block-diagonal ``R``, in the gate-major layout of ``x_proj``: ``(..., 4H)``."""
        out_dtype = params["bias"].dtype
        w = params["recurrent_kernel"]
        heads = h.reshape(*h.shape[:-1], self.num_heads, self.head_size)
        if self.dtype is not None:
            heads, w = heads.astype(self.dtype), w.astype(self.dtype)
        ry = jnp.einsum("...kd,kde->...ke", heads, w, preferred_element_type=out_dtype)  # (..., heads, 4d)
        ry = ry.reshape(*h.shape[:-1], self.num_heads, 4, self.head_size)
        return jnp.swapaxes(ry, -3, -2).reshape(*h.shape[:-1], 4 * self.hidden_size).astype(out_dtype)

    def step(self, params: Params, carry: SLSTMCarry, x_proj: Array) -> tuple[SLSTMCarry, Array]:
        raw = x_proj + self.recurrent_projection(params, carry.h)
        i_t, f_t, z_t, o_t = jnp.split(raw, 4, axis=-1)
        log_f = jax.nn.log_sigmoid(f_t) if self.forget_gate == "sigmoid" else f_t
        m = jnp.maximum(log_f + carry.m, i_t)
        i = jnp.exp(i_t - m)
        f = jnp.exp(log_f + carry.m - m)
        c = f * carry.c + i * jnp.tanh(z_t)
        n = f * carry.n + i
        h = jax.nn.sigmoid(o_t) * c / n
        return SLSTMCarry(h=h, c=c, n=n, m=m), h


@dataclasses.dataclass(frozen=True)
class MLSTMCell(ProjectedCell):
    r"""mLSTM (Beck et al. 2024, eqs. 19-27): a ``d x d`` matrix memory per head with a
    covariance update, exponential input gate, normaliser ``n`` and stabiliser ``m``. Every gate
    depends on ``x_t`` alone (no memory mixing), so a sequence has a parallel form. Projection
    fused in the order ``q, k, v, o`` (``H`` each) then ``i, f`` (one per head)::

        q, k, v, o~, i~, f~ = x @ W + b;  k = k / sqrt(d)          # per head, d = H / heads
        log f = log sigmoid(f~)
        m' = max(log f + m, i~)
        i' = exp(i~ - m');  f' = exp(log f + m - m')
        C' = f' * C + i' * k v^T          # the paper's v k^T, stored key index first
        n' = f' * n + i' * k
        h~ = (q^T C') / (max(|q . n'|, exp(-m')) + eps)
        h' = sigmoid(o~) * h~             # output y = h' (heads concatenated)

    The paper's ``max(|n^T q|, 1)`` is ``max(|q . n'|, exp(-m'))`` in the stabilised units;
    ``eps = 1e-6`` as the authors' code. The parallel form (``scan_cell``, ``impl='auto'`` or
    ``'parallel'``) computes the same numbers for all steps at once with a ``T x T`` matrix per
    head and sequence.

    Parameters (``d = H / num_heads``): ``input_kernel (I, 4H + 2 heads)``: the ``q, k, v, o``
    columns normal with std ``sqrt(2 / (5 I))`` (``small_init``), the gate columns zeros (as the
    package's ``igate``/``fgate`` weights); ``bias``: zeros for ``q, k, v, o``, normal(0, 0.1) for
    ``i`` and ``linspace(3, 6, heads)`` for ``f`` (the package's init). Carry: ``MLSTMCarry(C, n, m)``.

    Warning:
      The package's cell takes ``q, k, v`` from its mLSTM layer (up-projection, causal convolution,
      headwise projections), computes its gates from ``(q, k, v)`` instead of ``x`` and normalises
      ``h~`` per head before the layer's output gate; here the cell is the paper's equations on ``x``.
      Its parallel backend stabilises without the initial state; this one includes it (so a
      carried state works), which equals the package's recurrent steps.
    """

    num_heads: int = 1
    eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        _check_heads(self)
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ConfigError(f"MLSTMCell: eps must be a number >= 0, got {self.eps!r}.")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def projection_size(self) -> int:
        return 4 * self.hidden_size + 2 * self.num_heads

    def init(self, key: Array, input_size: int) -> Params:
        self._check_input_size(input_size)
        h, heads, dt = self.hidden_size, self.num_heads, self.param_dtype
        k_w, k_i = jax.random.split(key)
        kernel = jnp.concatenate([small_init(k_w, input_size, (input_size, 4 * h), dt),
                                  jnp.zeros((input_size, 2 * heads), dt)], axis=1)
        bias = jnp.concatenate([jnp.zeros((4 * h,), dt), 0.1 * jax.random.normal(k_i, (heads,), dt),
                                jnp.linspace(3.0, 6.0, heads, dtype=dt)])
        return {"input_kernel": kernel, "bias": bias}

    def initial_carry(self, batch_shape: tuple[int, ...] | int = ()) -> MLSTMCarry:
        shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        heads, d, dt = self.num_heads, self.head_size, self.param_dtype
        return MLSTMCarry(C=jnp.zeros(shape + (heads, d, d), dt), n=jnp.zeros(shape + (heads, d), dt),
                          m=jnp.zeros(shape + (heads,), dt))

    def split_projection(self, x_proj: Array) -> tuple[Array, ...]:
        """``(q, k, v, o, i~, f~)``: ``q, k, v`` ``(..., heads, d)`` with ``k`` scaled by ``1/sqrt(d)``,
        the output gate pre-activation ``(..., H)``, the gates ``(..., heads)``."""
        h, heads, d = self.hidden_size, self.num_heads, self.head_size
        lead = x_proj.shape[:-1]
        q, k, v, o = (x_proj[..., j * h : (j + 1) * h].reshape(*lead, heads, d) for j in range(4))
        i_t, f_t = x_proj[..., 4 * h : 4 * h + heads], x_proj[..., 4 * h + heads :]
        return q, k / math.sqrt(d), v, o.reshape(*lead, h), i_t, f_t

    def step(self, params: Params, carry: MLSTMCarry, x_proj: Array) -> tuple[MLSTMCarry, Array]:
        q, k, v, o, i_t, f_t = self.split_projection(x_proj)
        log_f = jax.nn.log_sigmoid(f_t)
        m = jnp.maximum(log_f + carry.m, i_t)
        i = jnp.exp(i_t - m)[..., None]
        f = jnp.exp(log_f + carry.m - m)[..., None]
        C = f[..., None] * carry.C + i[..., None] * k[..., :, None] * v[..., None, :]
        n = f * carry.n + i * k
        num = jnp.einsum("...a,...ab->...b", q, C)
        den = jnp.maximum(jnp.abs(jnp.sum(q * n, -1)), jnp.exp(-m)) + self.eps
        h_tilde = (num / den[..., None]).reshape(o.shape)
        h = jax.nn.sigmoid(o) * h_tilde
        return MLSTMCarry(C=C, n=n, m=m), h
