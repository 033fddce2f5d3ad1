"""``products.matmul``: the derivatives of ``jnp.matmul`` with the weight gradient in XLA:CPU's fast layout."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax.core import products

KEY = jax.random.key(0)


def _operands(rows):
    k_x, k_w = jax.random.split(KEY)
    return jax.random.normal(k_x, (rows // 32, 32, 24)), jax.random.normal(k_w, (24, 40))


@pytest.mark.parametrize("rows", [2048, 64], ids=["many_rows", "few_rows"])
def test_matmul_derivatives_equal_those_of_jnp_matmul(rows):
    x, w = _operands(rows)
    ours = lambda x, w: jnp.sum(jnp.sin(products.matmul(x, w, None, jnp.float32)))
    ref = lambda x, w: jnp.sum(jnp.sin(jnp.matmul(x, w)))
    for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    tangents = (jnp.cos(x), jnp.sin(w))
    np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(ref, (x, w), tangents)[1], rtol=1e-5)
    np.testing.assert_allclose(jax.hessian(ours, 1)(x[:1], w), jax.hessian(ref, 1)(x[:1], w), rtol=1e-4, atol=1e-4)
    per_example = jax.vmap(jax.grad(ours, 1), (0, None))(x[None], w)[0]
    np.testing.assert_allclose(per_example, jax.grad(ref, 1)(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [2048, 64], ids=["many_rows", "few_rows"])
def test_bf16_matmul_gradients_are_bf16_products_of_the_rounded_cotangent(rows):
    """Mixed precision: both gradient products take the cotangent rounded to bf16 (PyTorch
    autocast's convention) and accumulate in float32; the gradients keep autodiff's dtypes and
    agree with autodiff's (float32 cotangent) to bf16 rounding."""
    x, w = _operands(rows)
    bf16, f32 = jnp.bfloat16, jnp.float32
    ours = lambda x, w: jnp.sum(jnp.sin(products.matmul(x, w, bf16, f32)))
    autodiff = lambda x, w: jnp.sum(jnp.sin(jnp.matmul(x.astype(bf16), w.astype(bf16), preferred_element_type=f32)))
    dy = jnp.cos(jnp.matmul(x.astype(bf16), w.astype(bf16), preferred_element_type=f32)).astype(bf16)
    by_hand = (jnp.matmul(dy, w.astype(bf16).T, preferred_element_type=f32).astype(bf16),
               jnp.einsum("...k,...n->kn", x.astype(bf16), dy, preferred_element_type=f32).astype(bf16))
    for a, b, c in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(autodiff, (0, 1))(x, w), by_hand):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, c.astype(f32), rtol=1e-2, atol=1e-6)
        np.testing.assert_allclose(a, b, atol=3e-2 * float(jnp.abs(b).max()))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's choice of product kernels")
@pytest.mark.parametrize("rows", [2048, 64], ids=["many_rows", "few_rows"])
def test_bf16_matmul_gradients_compile_to_bf16_products_on_cpu(rows):
    """Every product of the compiled gradient has bf16 operands: XLA:CPU upcasts a bf16 product it
    cannot run in bf16 (a float32 cotangent, a column-major operand) to float32, several times
    slower on AMX."""
    x, w = (a.astype(jnp.bfloat16) for a in _operands(rows))
    loss = lambda x, w: jnp.sum(jnp.sin(products.matmul(x, w, jnp.bfloat16, jnp.float32)))
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    dtypes = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo))  # instruction -> element type
    dots = re.findall(r"= \w+\[[^\n]*? dot\(%([\w.-]+), %([\w.-]+)\)", hlo)
    assert len(dots) == 3  # the product, and the two of its gradient
    assert all(dtypes[a] == dtypes[b] == "bf16" for a, b in dots), dots


def test_bf16_matmul_is_reverse_mode_only():
    x, w = _operands(64)
    f = lambda x: products.matmul(x, w, jnp.bfloat16, jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (x,), (x,))


@pytest.mark.parametrize("rows", [2048, 64], ids=["many_rows", "few_rows"])
def test_matmul_kernel_gradient_contracts_a_transposed_copy_on_cpu(rows):
    """The compiled kernel gradient: ``x.T`` copied, then contracted on its last axis (CPU only)."""
    x, w = _operands(rows)
    grad_w = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(products.matmul(x, w, None, jnp.float32))), 1))
    hlo = grad_w.lower(x, w).compile().as_text()
    contracted_first_axis = re.search(r"dot\([^\n]*lhs_contracting_dims=\{0\}", hlo) is not None
    fast_layout = jax.default_backend() == "cpu" and rows >= products.MANY_ROWS
    assert contracted_first_axis != fast_layout


def test_weight_gradient_is_the_sum_over_rows_in_the_fast_layout():
    x, w = _operands(2048)
    dy = jnp.cos(x @ w)
    weight_gradient = jax.jit(lambda x, dy: products.weight_gradient(x, dy, None, jnp.float32))
    np.testing.assert_allclose(weight_gradient(x, dy), x.reshape(-1, 24).T @ dy.reshape(-1, 40), rtol=1e-5, atol=1e-4)
    hlo = weight_gradient.lower(x, dy).compile().as_text()
    assert (re.search(r"dot\([^\n]*lhs_contracting_dims=\{0\}", hlo) is None) == (jax.default_backend() == "cpu")
