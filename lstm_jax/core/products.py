"""Matrix products with a chosen compute dtype, and weight gradients in the layout XLA:CPU runs fast.

``matmul(x, w, dtype, out_dtype)`` is ``x @ w`` computed in ``dtype``, accumulated and returned in
``out_dtype``. Its derivative is the usual one; only the layout of one product changes: the
kernel's gradient ``x.T @ dy`` over many rows (a weight gradient summed over time and batch) is
computed by ``weight_gradient``, which on CPU materialises ``x.T`` first: XLA's CPU backend runs a
product whose left operand is contracted on its first axis slower than the same product on a
transposed copy, and the copy costs a few percent of the product. GPU and TPU take the product as
written. In float32 ``matmul`` stays
differentiable in both modes (``jax.custom_jvp``), so ``jax.jvp``, ``jax.grad`` and ``jax.vmap``
all apply.

Mixed precision (``dtype`` bfloat16, ``out_dtype`` float32) has a backward pass of its own
(``jax.custom_vjp``): the output's float32 cotangent is rounded to bfloat16 first, so that both
gradient products are bf16 x bf16 products accumulated in float32, as in PyTorch's autocast and in
``lstm_jax.kernels.fused``'s backward pass. Autodiff multiplies the float32 cotangent by a float32 copy of
the bf16 operand instead: XLA:CPU runs no mixed f32 x bf16 product, so both gradient products ran
in float32, where AMX CPUs run bf16 several times faster. The gradients keep autodiff's dtypes and
differ from its values by the bf16 rounding of the cotangent. The bf16 speed this buys is in
``benchmarks/speed.py``'s results (the bf16 rows).
**Differs from** ``jnp.matmul``: being a ``custom_vjp``, mixed precision supports reverse mode
(``jax.grad``, ``jax.vjp``) and ``jax.vmap``, not forward mode (``jax.jvp``, ``jax.jacfwd``);
float32 supports both.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["matmul", "folded_table", "weight_gradient", "transposed_product", "in_dtype"]

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
    if w.ndim == 2 and _mixed(x, w, out_dtype):
        return _mixed_precision_product(x, w, out_dtype)
    if w.ndim == 2 and math.prod(x.shape[:-1]) >= MANY_ROWS:
        return _many_rows_product(x, w, out_dtype)
    return _product(x, w, out_dtype)


def folded_table(embedding: Array, kernel: Array, dtype: Any) -> Array:
    """``embedding (V, E) @ kernel (E, N) -> (V, N)`` in ``dtype``, accumulated in float32: the
    table whose row ``x`` is ``embedding[x] @ kernel``, one definition for every layer route that
    folds an embedding into its input kernel (``sequence.fold_embedding``, ``onednn``)."""
    return matmul(embedding, kernel, dtype, jnp.float32)


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
    """``rows.T``, materialised on CPU (the fast layout for the product it feeds), elsewhere left to XLA.

    On CPU the copy goes through a unit axis, ``(K, M) -> (K, M, 1) -> (M, 1, K) -> (M, K)``. A
    plain ``rows.T`` (even behind ``optimization_barrier``) reaches XLA:CPU as a column-major
    layout of ``rows``, which its bf16 product kernels (YNNPACK) do not take, so XLA upcast the
    bf16 product to float32 (copies of both operands in float32, then a float32 product). Through
    the unit axis the transpose is a real row-major copy and the product stays bf16 x bf16 ->
    float32 (the float32 product takes either form at the same speed).
    """
    def copy(a: Array) -> Array:
        k, m = a.shape
        return jnp.transpose(a.reshape(k, m, 1), (1, 2, 0)).reshape(m, k)

    return jax.lax.platform_dependent(rows, cpu=copy, default=lambda a: a.T)


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


def _mixed(x: Array, w: Array, out_dtype: Any) -> bool:
    """Whether ``x @ w`` is a mixed-precision product: narrow float operands of one dtype, a wider
    float output."""
    narrow = jnp.dtype(x.dtype)
    return (narrow == w.dtype and jnp.issubdtype(narrow, jnp.floating) and out_dtype is not None
            and jnp.issubdtype(out_dtype, jnp.floating) and jnp.dtype(out_dtype).itemsize > narrow.itemsize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_precision_product(x: Array, w: Array, out_dtype: Any) -> Array:
    return _product(x, w, out_dtype)


def _mixed_precision_product_fwd(x, w, out_dtype):
    return _product(x, w, out_dtype), (x, w)


def _mixed_precision_product_bwd(out_dtype, saved, g):
    """Both gradient products on the cotangent rounded to the operands' dtype, accumulated in
    ``out_dtype`` (see the module docstring); the kernel's through ``weight_gradient``."""
    x, w = saved
    g = g.astype(x.dtype)
    # g @ w.T as one contraction of both last axes: a transpose op here would reach XLA:CPU as a
    # column-major operand and upcast the product to float32 (see _transposed_copy).
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    # The transposed copy pays at every row count in bf16 (128 x 128 x 512: 100 against 198 us).
    return dx.astype(x.dtype), weight_gradient(x, g, None, out_dtype).astype(w.dtype)


_mixed_precision_product.defvjp(_mixed_precision_product_fwd, _mixed_precision_product_bwd)
