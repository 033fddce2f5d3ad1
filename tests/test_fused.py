"""The fused (custom-VJP) LSTM, GRU and RNN layers against the plain autodiff scan: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConfigError, GRUCell, LSTMCell, RecurrentStack, RNNCell, scan_cell
from lstm_jax.kernels import fused

KEY = jax.random.key(0)


def _perturbed(cell, input_size):
    params = cell.init(KEY, input_size)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("cell", [LSTMCell(16), GRUCell(16), LSTMCell(16, token_inputs=True), RNNCell(16),
                                  RNNCell(16, activation="relu"), LSTMCell(128), GRUCell(128)],
                         ids=["lstm", "gru", "lstm_tokens", "rnn_tanh", "rnn_relu", "lstm_128", "gru_128"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.gpu
def test_fused_matches_scan_values_and_gradients(cell, reverse):
    input_size = 11
    params = _perturbed(cell, input_size)
    batch = (8, 8) if cell.hidden_size == 128 else (3, 2)  # extra batch dim; 64 x H=128: transposed carry on CPU
    if cell.token_inputs:
        x = jax.random.randint(KEY, (*batch, 9), 0, input_size)
    else:
        x = jax.random.normal(KEY, (*batch, 9, input_size))
    carry0 = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.key(3), a.shape), cell.initial_carry(batch))

    def loss(params, carry0, impl):
        carry, ys = scan_cell(cell, params, x, initial_carry=carry0, reverse=reverse, impl=impl)
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

    for impl_fn in (lambda f: f, jax.jit):
        (v_f, g_f) = impl_fn(jax.value_and_grad(lambda p, c: loss(p, c, "fused"), argnums=(0, 1)))(params, carry0)
        (v_s, g_s) = impl_fn(jax.value_and_grad(lambda p, c: loss(p, c, "scan"), argnums=(0, 1)))(params, carry0)
        np.testing.assert_allclose(v_f, v_s, rtol=1e-5, atol=1e-5)
        jax.tree.map(_close_to_float32_rounding, g_f, g_s)


def _close_to_float32_rounding(actual, desired):
    """Within 1e-5 of the reference, relative to the array's largest entry (sums over H=128 terms
    in another order differ by more than 1e-5 relative to an entry that is itself a small sum)."""
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kind, gates", [("lstm", 4), ("gru", 3)])
def test_transposed_carry_gives_the_same_numbers_and_is_used_when_chosen(kind, gates, monkeypatch):
    """The CPU layout of the forward loop (carry held as ``h.T``) against the row-major one, and
    the layer's program following ``LSTM_JAX_LAYOUT`` (the choice ``lstm_jax.dispatch`` makes)."""
    n, hidden, steps = 64, 128, 7
    keys = jax.random.split(KEY, 4)
    w_h = 0.1 * jax.random.normal(keys[0], (hidden, gates * hidden))
    x_proj = jax.random.normal(keys[1], (steps, n, gates * hidden))
    h0 = jax.random.normal(keys[2], (n, hidden))
    if kind == "lstm":
        run = lambda t: fused._lstm_scan(w_h, None, x_proj, h0, jnp.cos(h0), None, None, dtype=None, unroll=1,
                                         saves="factors", transposed=t)
    else:
        b_h = jax.random.normal(keys[3], (gates * hidden,))
        run = lambda t: fused._gru_scan(w_h, b_h, x_proj, h0, None, None, dtype=None, unroll=1, saves="factors",
                                        transposed=t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), run(True), run(False))
    cell = LSTMCell(hidden) if kind == "lstm" else GRUCell(hidden)
    params, x = cell.init(KEY, 3), jax.random.normal(KEY, (n, steps, 3))
    outputs = {}
    for layout in ("transposed", "row-major"):
        monkeypatch.setenv("LSTM_JAX_LAYOUT", layout)
        f = jax.jit(lambda p, x: scan_cell(cell, p, x, impl="fused")[1])
        hlo = f.lower(params, x).as_text()
        assert ("contracting_dims = [0] x [0]" in hlo) == (layout == "transposed" and jax.default_backend() == "cpu")
        outputs[layout] = f(params, x)
    np.testing.assert_allclose(outputs["transposed"], outputs["row-major"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fused_stack_matches_scan_stack_under_vmap():
    stack = RecurrentStack(LSTMCell(8), num_layers=2, bidirectional=True)
    params = stack.init(KEY, 4)
    x = jax.random.normal(KEY, (5, 3, 7, 4))
    run = lambda impl: jax.vmap(lambda xi: stack.apply(params, xi, impl=impl)[1])(x)
    np.testing.assert_allclose(run("fused"), run("scan"), atol=1e-6)


@pytest.mark.gpu
def test_fused_bf16_is_close_to_f32_scan():
    cell = LSTMCell(32, dtype=jnp.bfloat16)
    params = cell.init(KEY, 8)
    x = jax.random.normal(KEY, (4, 20, 8))
    g = lambda c, impl: jax.grad(lambda p: jnp.sum(scan_cell(c, p, x, impl=impl)[1] ** 2))(params)
    g_bf16 = g(cell, "fused")
    g_f32 = g(LSTMCell(32), "scan")
    for a, b in zip(jax.tree.leaves(g_bf16), jax.tree.leaves(g_f32)):
        assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(b).max()) + 1e-3


def test_fused_rejects_what_it_does_not_support():
    with pytest.raises(ConfigError, match="impl='fused' supports"):
        scan_cell(GRUCell(4, reset_after=False), GRUCell(4, reset_after=False).init(KEY, 3), jnp.ones((2, 5, 3)),
                  impl="fused")
    with pytest.raises(ConfigError, match=r"impl='fused' supports .* without remat \(an LSTM without peepholes or "
                                          r"layer_norm\); got LSTMCell with remat"):
        scan_cell(LSTMCell(4), LSTMCell(4).init(KEY, 3), jnp.ones((2, 5, 3)), impl="fused", remat=True)
    with pytest.raises(ConfigError, match="impl='cudnn' cannot run this layer: it needs a CUDA or ROCm device"):
        scan_cell(LSTMCell(4), LSTMCell(4).init(KEY, 3), jnp.ones((2, 5, 3)), impl="cudnn")
    with pytest.raises(ConfigError, match="impl must be"):
        scan_cell(LSTMCell(4), LSTMCell(4).init(KEY, 3), jnp.ones((2, 5, 3)), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", [LSTMCell(8), GRUCell(8), RNNCell(8)], ids=lambda c: c.name)
@pytest.mark.parametrize("unroll", [4, 16])
def test_unrolled_fused_layers_equal_the_scan(cell, unroll):
    """``unroll``, the accelerator lever benchmarks/speed.py --set device measures, changes no number."""
    params = cell.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 7, 3))  # 7 steps: not a multiple of the unroll
    loss = lambda p, impl, u: jnp.sum(scan_cell(cell, p, x, impl=impl, unroll=u)[1] ** 2)
    want, g_want = jax.value_and_grad(loss)(params, "scan", 1)
    got, g_got = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(params, "fused", unroll)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for w, g in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]  # (transposed, loop_factors)


@pytest.mark.parametrize("cell, choices", [(LSTMCell(16), c) for c in LAYOUTS] + [(GRUCell(16), c) for c in LAYOUTS]
                         + [(RNNCell(16), LAYOUTS[0]), (LSTMCell(16, token_inputs=True), LAYOUTS[1])],
                         ids=[f"{k}-{c}" for k in ("lstm", "gru") for c in ("rows-states", "rows-factors",
                              "transposed-states", "transposed-factors")] + ["rnn", "lstm_tokens"])
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_with_seq_lengths_matches_scan(cell, choices, reverse):
    """Padded batches on the fast path: the carry frozen after each sequence's last step and
    returned, outputs past the end zero, ``reverse`` within the valid part; values and gradients
    (params, initial carry and inputs) equal the plain scan's, in every carry layout and with the
    backward factors from the loop or from one pass. Lengths include 0 and T."""
    from lstm_jax import dispatch
    from lstm_jax.core.scan import check_lengths
    from lstm_jax.layers.sequence import _run_fused

    input_size, batch, steps = 5, (2, 3), 7
    params = _perturbed(cell, input_size)
    lengths = jnp.array([[7, 0, 3], [1, 5, 6]])
    if cell.token_inputs:
        x = jax.random.randint(KEY, (steps, *batch), 0, input_size)
    else:
        x = jax.random.normal(KEY, (steps, *batch, input_size))
    carry0 = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.key(3), a.shape), cell.initial_carry(batch))
    plan = dispatch.Plan("fused", transposed=choices[0], loop_factors=choices[1])

    def fused(p, c0, xp):
        return _run_fused(cell, p, xp, c0, batch, reverse, 1, plan, check_lengths(lengths, batch, steps))

    def loss(p, c0, x_in, impl):
        if impl == "fused":
            carry, ys = fused(p, c0, cell.input_projection(p, x_in))
        else:
            carry, ys = scan_cell(cell, p, x_in, initial_carry=c0, seq_lengths=lengths, reverse=reverse,
                                  time_major=True, impl="scan")
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry)), (carry, ys)

    argnums = (0, 1) if cell.token_inputs else (0, 1, 2)
    (v_f, (c_f, y_f)), g_f = jax.value_and_grad(lambda *a: loss(*a, "fused"), argnums, has_aux=True)(params, carry0, x)
    (v_s, (c_s, y_s)), g_s = jax.value_and_grad(lambda *a: loss(*a, "scan"), argnums, has_aux=True)(params, carry0, x)
    assert not np.any(np.asarray(y_f)[np.arange(steps)[:, None, None] >= np.asarray(lengths)]), "padding not zero"
    np.testing.assert_allclose(y_f, y_s, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), c_f, c_s)
    np.testing.assert_allclose(v_f, v_s, rtol=1e-5, atol=1e-5)
    jax.tree.map(_close_to_float32_rounding, g_f, g_s)
    # the carry of a length-0 sequence is the initial carry, untouched
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0, 1], b[0, 1]), c_f, carry0)


def test_scan_cell_runs_padded_batches_on_the_fused_layer():
    """``impl='auto'`` keeps the fused kernel for a padded batch (no drop to the scan) and
    ``impl='fused'`` accepts ``seq_lengths``; the jitted program holds the fused loop's custom VJP."""
    cell = LSTMCell(8)
    params, x, lengths = cell.init(KEY, 3), jax.random.normal(KEY, (4, 6, 3)), jnp.array([6, 2, 0, 5])
    grad = jax.jit(jax.grad(lambda p, impl: jnp.sum(scan_cell(cell, p, x, seq_lengths=lengths, impl=impl)[1] ** 2)),
                   static_argnums=1)
    jaxpr = str(jax.make_jaxpr(lambda p: scan_cell(cell, p, x, seq_lengths=lengths, impl="auto"))(params))
    assert "custom_vjp_call" in jaxpr
    jax.tree.map(_close_to_float32_rounding, grad(params, "fused"), grad(params, "scan"))


@pytest.mark.parametrize("choices", LAYOUTS, ids=["rows-states", "rows-factors", "transposed-states",
                                                  "transposed-factors"])
@pytest.mark.parametrize("options", ["plain", "lengths-reverse", "recurrent-dropout"])
def test_fused_lstm_with_projection_matches_scan(choices, options):
    """LSTMCell(proj_size=P) on the fused layer: values and gradients (the projection kernel's
    included) equal the scan's, with padded batches and with a recurrent dropout mask too."""
    from lstm_jax import dispatch
    from lstm_jax.core.scan import check_lengths
    from lstm_jax.layers.sequence import _run_fused, sequence_masks

    cell, batch, steps = LSTMCell(16, proj_size=5), (4,), 6
    params = _perturbed(cell, 3)
    assert params["recurrent_kernel"].shape == (5, 64) and params["projection_kernel"].shape == (16, 5)
    x = jax.random.normal(KEY, (steps, *batch, 3))
    lengths = jnp.array([6, 0, 2, 5]) if options == "lengths-reverse" else None
    reverse = options == "lengths-reverse"
    mask = (sequence_masks(KEY, 0.6, batch, 5, salt=1) / 0.6) if options == "recurrent-dropout" else None
    carry0 = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.key(3), a.shape), cell.initial_carry(batch))
    plan = dispatch.Plan("fused", transposed=choices[0], loop_factors=choices[1])

    def run(p, c0, impl):
        if impl == "fused":
            lens = None if lengths is None else check_lengths(lengths, batch, steps)
            return _run_fused(cell, p, cell.input_projection(p, x), c0, batch, reverse, 1, plan, lens, mask)
        from lstm_jax.core.scan import reverse_padded, scan_layer
        xs = reverse_padded(x, lengths) if reverse else x
        return scan_layer(cell, p, cell.input_projection(p, xs), c0, seq_lengths=lengths, reverse=reverse,
                          recurrent_mask=mask)

    def loss(p, c0, impl):
        carry, ys = run(p, c0, impl)
        assert ys.shape == (steps, *batch, 5) and carry.h.shape == (*batch, 5) and carry.c.shape == (*batch, 16)
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

    v_f, g_f = jax.value_and_grad(loss, argnums=(0, 1))(params, carry0, "fused")
    v_s, g_s = jax.value_and_grad(loss, argnums=(0, 1))(params, carry0, "scan")
    np.testing.assert_allclose(v_f, v_s, rtol=1e-5, atol=1e-5)
    jax.tree.map(_close_to_float32_rounding, g_f, g_s)


def test_projection_size_is_checked_in_one_sentence():
    from lstm_jax import make_cell

    for bad in (16, 20, -1, 2.5):
        with pytest.raises(ConfigError, match=r"LSTMCell: proj_size must be an int in \[0, hidden_size\) = \[0, 16\)"):
            LSTMCell(16, proj_size=bad)
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['proj_size'\] for a gru cell"):
        make_cell("gru", 16, proj_size=4)
    assert make_cell("lstm", 16, proj_size=4).proj_size == 4
    from lstm_jax.dispatch import plan
    shape = dict(steps=100, rows=64, features=512)
    assert plan.plan_layer(LSTMCell(256, proj_size=64), **shape).impl == "fused"  # never oneDNN (no binding)
