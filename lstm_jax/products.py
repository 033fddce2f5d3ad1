"""Matrix products with a chosen compute dtype, and weight gradients in the layout XLA:CPU runs fast.

``matmul(x, w, dtype, out_dtype)`` is ``x @ w`` computed in ``dtype``, accumulated and returned in
``out_dtype``. Its derivative is the usual one; only the layout of one product changes: the
kernel's gradient ``x.T @ dy`` over many rows (a weight gradient summed over time and batch) is
computed by ``weight_gradient``, which on CPU materialises ``x.T`` first. XLA's CPU backend (jax
0.10) runs a product whose left operand is contracted on its first axis up to 1.3x slower than the
same product on a transposed copy (512 x 6400 x 2048: 126 against 166 GFLOP/s), and the copy costs
a few percent of that. GPU and TPU take the product as written. ``matmul`` stays differentiable in
both modes (``jax.custom_jvp``), so ``jax.jvp``, ``jax.grad`` and ``jax.vmap`` all apply.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["matmul", "weight_gradient", "transposed_product", "in_dtype"]

Array = jax.Array

# Below this many rows the copy is not worth it (the per-step products inside a scan).
MANY_ROWS = 1024


def in_dtype(dtype: Any, *arrays: Array) -> tuple[Array, ...]:
    """The arrays cast to the compute ``dtype`` (None: unchanged)."""
    return arrays if dtype is None else tuple(a.astype(dtype) for a in arrays)


def matmul(x: Array, w: Array, dtype: Any, out_dtype: Any) -> Array:
    """``x @ w`` for ``x (..., K)`` and ``w (K, N)``, computed in ``dtype`` (None: promoted),
    accumulated and returned in ``out_dtype``."""
    x, w = in_dtype(dtype, x, w)
    if w.ndim == 2 and math.prod(x.shape[:-1]) >= MANY_ROWS:
        return _many_rows_product(x, w, out_dtype)
    return _product(x, w, out_dtype)


def transposed_product(a: Array, b: Array, out_dtype: Any) -> Array:
    """``a.T @ b`` for ``a (K, M)`` and ``b (K, N)``, as one contraction of both first axes (no
    transposed copy of ``a``), accumulated and returned in ``out_dtype``."""
    product = jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return product.astype(out_dtype)


def weight_gradient(x: Array, dy: Array, dtype: Any, out_dtype: Any) -> Array:
    """``x.T @ dy`` summed over all leading axes of ``x (..., K)`` and ``dy (..., N)``: ``(K, N)``."""
    rows, dy_rows = in_dtype(dtype, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return _product(_transposed_copy(rows), dy_rows, out_dtype)


def _product(x: Array, w: Array, out_dtype: Any) -> Array:
    return jnp.matmul(x, w, preferred_element_type=out_dtype).astype(out_dtype)


def _transposed_copy(rows: Array) -> Array:
    """``rows.T``, materialised on CPU (the fast layout for the product it feeds), elsewhere left to XLA."""
    return jax.lax.platform_dependent(rows, cpu=lambda a: jax.lax.optimization_barrier(a.T), default=lambda a: a.T)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _many_rows_product(x: Array, w: Array, out_dtype: Any) -> Array:
    return _product(x, w, out_dtype)


@functools.partial(_many_rows_product.defjvp, symbolic_zeros=True)
def _many_rows_product_jvp(out_dtype, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _product(x, w, out_dtype)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_product(dx, w, out_dtype))
    if not isinstance(dw, SymbolicZero):
        # x @ dw written as x.T contracted on its first axis: its transpose, the kernel's gradient,
        # is then x.T @ dy with x.T a real array on CPU (see the module docstring).
        x_t = _transposed_copy(x.reshape(-1, x.shape[-1]))
        terms.append(transposed_product(x_t, dw, out_dtype).reshape(y.shape))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)
