r"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv:2410.01201): gates
that depend on the input alone, so the recurrence is linear in the state and a whole sequence
runs as a parallel scan (``lstm_jax.kernels.parallel_scan``) instead of a loop over time.

Both cells share ``ProjectedCell`` (also the base of the xLSTM cells in ``core.xlstm``): one input
kernel ``(I, P)`` and one bias ``(P,)``, ``input_projection(params, x) = x @ input_kernel + bias``
(a row gather for ``token_inputs``) hoisted out of the time loop, and
``apply(p, carry, x) == step(p, carry, input_projection(p, x))``, as the cells of ``core.cells``.

Both use the paper's log-space form: the candidate goes through ``g`` (positive, so the
recurrence can be summed in log space), and the parallel form combines ``(log a_t, log b_t)``
pairs of ``h_t = a_t * h_{t-1} + b_t`` with ``logaddexp``::

    g(x)     = x + 0.5   if x >= 0 else sigmoid(x)
    log g(x) = log(x + 0.5) if x >= 0 else -softplus(-x)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lstm_jax.core.base import ProjectedInputs

__all__ = ["ProjectedCell", "MinGRUCell", "MinLSTMCell", "g", "log_g", "torch_linear_init"]

Array = jax.Array
Params = dict


def g(x: Array) -> Array:
    """The paper's positive candidate activation: ``x + 0.5`` for ``x >= 0``, else ``sigmoid(x)``."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def log_g(x: Array) -> Array:
    """``log(g(x))`` without forming ``g``: ``log(relu(x) + 0.5)`` for ``x >= 0``, else ``-softplus(-x)``."""
    return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), -jax.nn.softplus(-x))


def torch_linear_init(key: Array, fan_in: int, shape: tuple[int, ...], dtype: Any) -> Array:
    """PyTorch ``nn.Linear``'s default: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (weights and bias)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class ProjectedCell(ProjectedInputs):
    """The fields of the minGRU, minLSTM and xLSTM cells, whose input projection is one fused
    kernel and bias of ``projection_size`` columns; validation, the projection (``token_inputs``: a
    row gather) and ``apply`` come from ``core.base.ProjectedInputs``. Subclasses define
    ``projection_size``, ``init``, ``initial_carry`` (a zero ``hidden_size`` state by default) and
    ``step``."""

    hidden_size: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    token_inputs: bool = False

    @property
    def projection_size(self) -> int:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _MinCell(ProjectedCell):
    num_gates = 2

    @property
    def projection_size(self) -> int:
        return self.num_gates * self.hidden_size

    def init(self, key: Array, input_size: int) -> Params:
        """``input_kernel (I, G*H)`` and ``bias (G*H,)``, both uniform in ``±1/sqrt(I)`` (PyTorch's
        ``nn.Linear`` default, as the paper's reference code). No recurrent kernel: the gates see
        only ``x_t``."""
        self._check_input_size(input_size)
        k_w, k_b = jax.random.split(key)
        size = self.projection_size
        return {"input_kernel": torch_linear_init(k_w, input_size, (input_size, size), self.param_dtype),
                "bias": torch_linear_init(k_b, input_size, (size,), self.param_dtype)}

    def log_coefficients(self, x_proj: Array) -> tuple[Array, Array]:
        """``(log a_t, log b_t)`` of the linear recurrence ``h_t = a_t * h_{t-1} + b_t``."""
        raise NotImplementedError

    def step(self, params: Params, carry: Array, x_proj: Array) -> tuple[Array, Array]:
        return self.hoisted_step(params, carry, self.hoist(x_proj))

    def hoist(self, x_proj: Array) -> Array:
        """What the step takes from the input alone, for any leading axes at once (``scan_layer``
        computes it for the whole sequence before its loop): the coefficients ``a_t, b_t``,
        concatenated, ``(..., 2H)``."""
        log_a, log_b = self.log_coefficients(x_proj)
        return jnp.concatenate([jnp.exp(log_a), jnp.exp(log_b)], axis=-1)

    def hoisted_step(self, params: Params, carry: Array, coefficients: Array) -> tuple[Array, Array]:
        """One step from ``hoist``'s output: ``h' = a * h + b``."""
        a, b = jnp.split(coefficients, 2, axis=-1)
        h = a * carry + b
        return h, h


@dataclasses.dataclass(frozen=True)
class MinGRUCell(_MinCell):
    r"""minGRU (Feng et al. 2024, log-space version): a GRU whose gate and candidate see ``x_t``
    only, gates fused in the order ``z, h``::

        k = x @ W_i + b                    # (..., 2H) -> k_z, k_h
        z = sigmoid(k_z);  h~ = g(k_h)
        h' = (1 - z) * h + z * h~          # output y = h'

    In log space (the parallel form): ``log a = -softplus(k_z)``, ``log b = -softplus(-k_z) + log g(k_h)``.

    Parameters (``I`` input features or vocabulary size, ``H = hidden_size``): ``input_kernel
    (I, 2H)`` and ``bias (2H,)``, uniform in ``±1/sqrt(I)`` (PyTorch ``nn.Linear``, as the paper's
    code). Carry: ``h`` ``(*batch, H)``.

    Warning:
      There is no recurrent kernel, so ``scan_cell``'s ``impl='fused'`` and ``'onednn'`` do not apply;
      ``impl='auto'`` runs the parallel scan off CPU (on CPU the plain scan measured faster). The
      paper's code starts from ``h_0 = g(...)`` > 0 in log space; here the carry is kept in linear
      space, so any ``h_0`` (zeros by default) works.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> cell = MinGRUCell(hidden_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry, y = cell.apply(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
        >>> y.shape, params["input_kernel"].shape
        ((2, 8), (3, 16))
    """

    num_gates = 2

    def log_coefficients(self, x_proj: Array) -> tuple[Array, Array]:
        k_z, k_h = jnp.split(x_proj, 2, axis=-1)
        return -jax.nn.softplus(k_z), -jax.nn.softplus(-k_z) + log_g(k_h)


@dataclasses.dataclass(frozen=True)
class MinLSTMCell(_MinCell):
    r"""minLSTM (Feng et al. 2024, log-space version): forget and input gates of ``x_t`` only,
    normalised to sum to one (time-independent scale), gates fused in the order ``f, i, h``::

        k = x @ W_i + b                    # (..., 3H) -> k_f, k_i, k_h
        f = sigmoid(k_f);  i = sigmoid(k_i);  h~ = g(k_h)
        f' = f / (f + i);  i' = i / (f + i)
        h' = f' * h + i' * h~              # output y = h'

    In log space: with ``d = softplus(-k_f) - softplus(-k_i)``, ``log f' = -softplus(d)``,
    ``log i' = -softplus(-d)``, ``log b = log i' + log g(k_h)``.

    Parameters: ``input_kernel (I, 3H)`` and ``bias (3H,)``, uniform in ``±1/sqrt(I)`` (PyTorch
    ``nn.Linear``, as the paper's code). Carry: ``h`` ``(*batch, H)``.

    Warning:
      Not the classic LSTM: no cell state apart from ``h``, no output gate, no recurrent kernel.
    """

    num_gates = 3

    def log_coefficients(self, x_proj: Array) -> tuple[Array, Array]:
        k_f, k_i, k_h = jnp.split(x_proj, 3, axis=-1)
        d = jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)
        return -jax.nn.softplus(d), -jax.nn.softplus(-d) + log_g(k_h)
