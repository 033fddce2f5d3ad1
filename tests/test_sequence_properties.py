"""Property-based tests: every sequence path against a plain Python loop over the cell's steps,
for any length (including 0), batch shape (including empty and size 1), seq_lengths, direction
and impl; values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_jax import ConfigError, GRUCell, LSTMCell, RecurrentStack, RNNCell, scan_cell

CELLS = {"lstm": LSTMCell(3), "gru": GRUCell(3), "rnn": RNNCell(3)}
F = 2


def loop(cell, params, x, lengths, reverse):
    """``x (*batch, T, F)`` one sequence and one step at a time: ``(final carries, outputs)``."""
    batch, steps = x.shape[:-2], x.shape[-2]
    flat_x = x.reshape(int(np.prod(batch)), steps, F)
    flat_len = np.full(flat_x.shape[0], steps) if lengths is None else np.asarray(lengths).reshape(-1)
    carries, outputs = [], []
    for b in range(flat_x.shape[0]):
        carry, ys = cell.initial_carry(()), [jnp.zeros(cell.hidden_size)] * steps
        order = range(flat_len[b] - 1, -1, -1) if reverse else range(flat_len[b])
        for t in order:
            carry, ys[t] = cell.apply(params, carry, flat_x[b, t])
        carries.append(carry)
        outputs.append(jnp.stack(ys) if steps else jnp.zeros((0, cell.hidden_size)))
    if not carries:  # no sequences at all
        empty = cell.initial_carry(batch)
        return empty, jnp.zeros((*batch, steps, cell.hidden_size))
    carry = jax.tree.map(lambda *c: jnp.stack(c).reshape(*batch, cell.hidden_size), *carries)
    return carry, jnp.stack(outputs).reshape(*batch, steps, cell.hidden_size)


def loss(carry, ys):
    """Every output and every carry entry, weighted unevenly so that no gradient cancels."""
    w = jnp.arange(1, ys.size + 1, dtype=ys.dtype).reshape(ys.shape) / (ys.size + 1)
    return (ys * w).sum() + sum(jnp.sin(c).sum() for c in jax.tree.leaves(carry))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_name=st.sampled_from(sorted(CELLS)), steps=st.integers(0, 4),
       batch=st.sampled_from([(), (0,), (1,), (3,), (2, 2)]), with_lengths=st.booleans(),
       direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
       impl=st.sampled_from(["auto", "fused", "scan"]), seed=st.integers(0, 2**16))
def test_every_path_equals_a_python_loop(cell_name, steps, batch, with_lengths, direction, impl, seed):
    cell = CELLS[cell_name]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(*batch, steps, F)), jnp.float32)
    lengths = jnp.asarray(rng.integers(0, steps + 1, size=batch), jnp.int32) if with_lengths else None
    if direction == "bidirectional":
        stack = RecurrentStack(cell, bidirectional=True)
        params = stack.init(jax.random.key(seed), F)

        def run(p):
            carries, ys = stack.apply(p, x, seq_lengths=lengths, impl=impl)
            return carries[0], ys

        def reference(p):
            (cf, yf), (cb, yb) = loop(cell, p[0][0], x, lengths, False), loop(cell, p[0][1], x, lengths, True)
            return (cf, cb), jnp.concatenate([yf, yb], axis=-1)
    else:
        params = cell.init(jax.random.key(seed), F)
        run = lambda p: scan_cell(cell, p, x, seq_lengths=lengths, reverse=direction == "reverse", impl=impl)
        reference = lambda p: loop(cell, p, x, lengths, direction == "reverse")

    carry, ys = run(params)
    ref_carry, ref_ys = reference(params)
    assert ys.shape == ref_ys.shape
    np.testing.assert_allclose(ys, ref_ys, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), carry, ref_carry)
    grads = jax.grad(lambda p: loss(*run(p)))(params)
    ref_grads = jax.grad(lambda p: loss(*reference(p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), grads, ref_grads)


def test_bad_lengths_raise_when_concrete_and_are_clipped_under_jit():
    stack = RecurrentStack(LSTMCell(3), bidirectional=True)
    params = stack.init(jax.random.key(0), F)
    x = jnp.ones((2, 4, F))
    for bad in ([2, 5], [-1, 2]):
        with pytest.raises(ConfigError, match=r"seq_lengths must lie in \[0, 4\]"):
            stack.apply(params, x, seq_lengths=jnp.array(bad))
    jitted = jax.jit(lambda lengths: stack.apply(params, x, seq_lengths=lengths)[1])
    np.testing.assert_array_equal(jitted(jnp.array([9, -3])), jitted(jnp.array([4, 0])))
    assert not jnp.isnan(jitted(jnp.array([9, -3]))).any()
