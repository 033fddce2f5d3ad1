"""The cuDNN route (``lstm_jax.kernels.cudnn``), checked on CPU: our params converted to
``jax.experimental.rnn``'s flat vector and run through its pure-JAX ``lstm_ref`` (the reference cuDNN
is tested against) equal our scan, values and gradients, for 1 and 2 layers, both directions and
ragged lengths including zero; ``unpack_lstm_weights`` gives our params back. On a GPU the same
code runs cuDNN itself (marked ``gpu``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import LSTMCell, RecurrentStack, dispatch, scan_cell
from lstm_jax.kernels import cudnn

B, T, I, H = 3, 6, 4, 5
LAYERS = pytest.mark.parametrize("num_layers", [1, 2])
BIDI = pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidi"])
LENGTHS = pytest.mark.parametrize("lengths", [None, (6, 3, 0)], ids=["full", "ragged_with_zero"])
on_gpu = jax.default_backend() in ("cuda", "rocm", "gpu")


def _perturbed(tree, seed=11, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _setup(num_layers, bidirectional):
    stack = RecurrentStack(LSTMCell(H), num_layers=num_layers, bidirectional=bidirectional)
    params = _perturbed(stack.init(jax.random.key(0), I))  # every bias non-zero
    x = jax.random.normal(jax.random.key(1), (T, B, I))
    d = 2 if bidirectional else 1
    h0 = 0.5 * jax.random.normal(jax.random.key(2), (num_layers * d, B, H))
    c0 = 0.5 * jax.random.normal(jax.random.key(3), (num_layers * d, B, H))
    return stack, params, x, h0, c0


def _carries(stack, h0, c0):
    """cuDNN's (L*D, N, H) carries as the stack's list of carries."""
    from lstm_jax import LSTMCarry

    one = [LSTMCarry(h=h0[k], c=c0[k]) for k in range(h0.shape[0])]
    if not stack.bidirectional:
        return one
    return [(one[2 * k], one[2 * k + 1]) for k in range(stack.num_layers)]


def _by_scan(stack, params, x, h0, c0, lengths):
    carries, ys = stack.apply(params, x, initial_carry=_carries(stack, h0, c0), time_major=True,
                              seq_lengths=lengths, impl="scan")
    flat = jax.tree.leaves(carries)  # per pseudo-layer: h, c
    return ys, jnp.stack(flat[0::2]), jnp.stack(flat[1::2])


def _by_cudnn(stack, params, x, h0, c0, lengths, reference=True):
    return cudnn.cudnn_lstm(x, h0, c0, params, lengths, bidirectional=stack.bidirectional, reference=reference)


@LAYERS
@BIDI
@LENGTHS
def test_converted_weights_through_lstm_ref_equal_the_scan(num_layers, bidirectional, lengths):
    stack, params, x, h0, c0 = _setup(num_layers, bidirectional)
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    want = _by_scan(stack, params, x, h0, c0, lengths)
    got = jax.jit(functools.partial(_by_cudnn, stack))(params, x, h0, c0, lengths)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5)
    if lengths is not None:  # the zero-length row: zero outputs, its initial carry back
        assert float(jnp.abs(got[0][:, 2]).max()) == 0.0
        np.testing.assert_array_equal(got[1][:, 2], h0[:, 2])


@LAYERS
@BIDI
@LENGTHS
def test_gradients_through_the_conversion_equal_the_scans(num_layers, bidirectional, lengths):
    stack, params, x, h0, c0 = _setup(num_layers, bidirectional)
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    probe = [jax.random.normal(jax.random.key(k), s) for k, s in
             enumerate([(T, B, H * stack.num_directions), h0.shape, c0.shape], start=20)]

    def loss(run, params, x, h0, c0):
        return sum(jnp.vdot(p, o) for p, o in zip(probe, run(stack, params, x, h0, c0, lengths)))

    want = jax.grad(functools.partial(loss, _by_scan), argnums=(0, 1, 2, 3))(params, x, h0, c0)
    got = jax.jit(jax.grad(functools.partial(loss, _by_cudnn), argnums=(0, 1, 2, 3)))(params, x, h0, c0)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, atol=2e-5)


@LAYERS
@BIDI
def test_the_flat_vector_has_cudnns_length_and_unpacks_to_our_params(num_layers, bidirectional):
    from jax.experimental import rnn

    stack, params, *_ = _setup(num_layers, bidirectional)
    flat = cudnn.flat_weights(params, bidirectional)
    assert flat.shape == (rnn.get_num_params_in_lstm(I, H, num_layers, bidirectional),)
    assert flat.shape == (cudnn.num_weights(I, H, num_layers, bidirectional),)
    back = cudnn.layer_params(flat, I, H, num_layers, bidirectional)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    # the gate order is cuDNN's: W_ih's first H rows are the input gate of layer 0
    w_ih, _, b_ih, b_hh = rnn.unpack_lstm_weights(flat, I, H, num_layers, bidirectional)
    first = params[0][0] if bidirectional else params[0]
    np.testing.assert_array_equal(w_ih[0][:H], first["input_kernel"][:, :H].T)
    np.testing.assert_array_equal(b_ih[0], first["bias"])
    assert float(jnp.abs(b_hh[0]).max()) == 0.0


def _layer_through_cudnn(monkeypatch, reference=True):
    """scan_cell's cuDNN branch on this machine: the plan says 'cudnn' and the kernel runs lstm_ref."""
    monkeypatch.setattr(dispatch, "plan_layer", lambda *a, **k: dispatch.Plan("cudnn"))
    if reference:
        monkeypatch.setattr(cudnn, "cudnn_lstm", functools.partial(cudnn.cudnn_lstm, reference=True))


@pytest.mark.parametrize("reverse", [False, True])
@LENGTHS
@pytest.mark.parametrize("token_inputs", [False, True], ids=["features", "tokens"])
def test_scan_cells_cudnn_branch_equals_its_scan(monkeypatch, reverse, lengths, token_inputs):
    cell = LSTMCell(H, token_inputs=token_inputs)
    params = _perturbed(cell.init(jax.random.key(0), I))
    x = (jax.random.randint(jax.random.key(1), (B, T), 0, I) if token_inputs
         else jax.random.normal(jax.random.key(1), (B, T, I)))
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    c0 = jax.tree.map(lambda a: a + 0.3, cell.initial_carry(B))
    run = lambda params, x: scan_cell(cell, params, x, initial_carry=c0, seq_lengths=lengths, reverse=reverse,
                                      impl="scan")
    want = run(params, x)
    want_grad = jax.grad(lambda p: jnp.sum(run(p, x)[1] ** 2))(params)
    _layer_through_cudnn(monkeypatch)
    got = run(params, x)
    got_grad = jax.grad(lambda p: jnp.sum(run(p, x)[1] ** 2))(params)
    for w, g in zip(jax.tree.leaves((want, want_grad)), jax.tree.leaves((got, got_grad))):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_scan_cells_cudnn_branch_with_an_embedding_equals_its_scan(monkeypatch):
    cell = LSTMCell(H, token_inputs=True)
    params = _perturbed({**cell.init(jax.random.key(0), 3), "embedding": jnp.ones((I, 3))})
    x = jax.random.randint(jax.random.key(1), (B, T), 0, I)
    run = lambda params: scan_cell(cell, params, x, impl="scan")
    want, want_grad = run(params), jax.grad(lambda p: jnp.sum(run(p)[1] ** 2))(params)
    _layer_through_cudnn(monkeypatch)
    got, got_grad = run(params), jax.grad(lambda p: jnp.sum(run(p)[1] ** 2))(params)
    for w, g in zip(jax.tree.leaves((want, want_grad)), jax.tree.leaves((got, got_grad))):
        np.testing.assert_allclose(g, w, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="cuDNN runs on a CUDA/ROCm device only")
@BIDI
def test_cudnn_itself_equals_lstm_ref_and_the_scan(bidirectional):
    stack, params, x, h0, c0 = _setup(2, bidirectional)
    lengths = jnp.array((6, 3, 0), jnp.int32)
    want = _by_scan(stack, params, x, h0, c0, lengths)
    run = jax.jit(functools.partial(_by_cudnn, stack, reference=False))
    got = run(params, x, h0, c0, lengths)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=2e-2)  # TF32 products
    grads = jax.grad(lambda p: jnp.sum(run(p, x, h0, c0, lengths)[0] ** 2))(params)
    grads_ref = jax.grad(lambda p: jnp.sum(_by_scan(stack, p, x, h0, c0, lengths)[0] ** 2))(params)
    for w, g in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, w, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="cuDNN runs on a CUDA/ROCm device only")
@pytest.mark.parametrize("impl", ["cudnn", "auto", "fused"])
def test_every_route_of_a_stack_equals_the_scan_on_the_gpu(impl):
    """The layers as a user calls them: RecurrentStack with impl='cudnn' (and whatever 'auto' picks)."""
    stack, params, x, h0, c0 = _setup(2, True)
    lengths = None if impl == "fused" else jnp.array((6, 3, 0), jnp.int32)

    def loss(impl, params):
        _, ys = stack.apply(params, x, time_major=True, seq_lengths=lengths, impl=impl)
        return jnp.sum(ys**2), ys

    (_, want), g_want = jax.value_and_grad(functools.partial(loss, "scan"), has_aux=True)(params)
    (_, got), g_got = jax.jit(jax.value_and_grad(functools.partial(loss, impl), has_aux=True))(params)
    np.testing.assert_allclose(got, want, atol=2e-2)  # TF32 products
    for w, g in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(g, w, atol=5e-2, rtol=5e-2)
