"""minGRU, minLSTM, sLSTM and mLSTM: the paper's own reference code (minGRU/minLSTM, transcribed in
PyTorch from Feng et al. 2024's appendix), the parallel forms equal to the step-by-step scan (values
and gradients, carries in and out, ``seq_lengths``, ``reverse``, chunks), finite differences, the
dispatch's choice, bad input, stacks and the Flax modules. Parity with the authors' ``xlstm``
package is in tests/test_xlstm_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lstm_jax import ConfigError, RecurrentStack, make_cell, scan_cell
from lstm_jax.core.mincells import MinGRUCell, MinLSTMCell
from lstm_jax.core.xlstm import STABILISER_START, MLSTMCell, SLSTMCell
from lstm_jax.dispatch import plan as plan_module
from lstm_jax.dispatch.plan import plan_layer

PARALLEL = [("mingru", {}), ("minlstm", {}), ("mlstm", {"num_heads": 2})]
ALL = PARALLEL + [("slstm", {"num_heads": 2})]
ATOL = 2e-5


def perturbed(cell, input_size=3, key=0, scale=0.5):
    """Params with every leaf moved off its init, so that zero-initialised weights matter too."""
    params = cell.init(jax.random.key(key), input_size)
    keys = iter(jax.random.split(jax.random.key(key + 1), len(params)))
    return {k: v + scale * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in sorted(params.items())}


def random_carry(cell, batch_shape, key=7):
    """A non-zero carry of the right structure (normaliser and memory kept plausible)."""
    zero = cell.initial_carry(batch_shape)
    leaves, tree = jax.tree.flatten(zero)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    new = [0.5 * jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, leaves)]
    carry = jax.tree.unflatten(tree, new)
    if isinstance(cell, SLSTMCell):
        carry = carry._replace(n=1.0 + jnp.abs(carry.n))
    return carry


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name,options", ALL)
def test_by_name_shapes_and_the_loop_of_steps(name, options):
    cell = make_cell(name, 8, **options)
    assert type(cell).__name__.lower() == name + "cell"
    params = cell.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    carry, ys = scan_cell(cell, params, x, impl="scan")
    state, loop = cell.initial_carry((2,)), []
    for t in range(5):
        state, y = cell.apply(params, state, x[:, t])
        loop.append(y)
    np.testing.assert_allclose(ys, jnp.stack(loop, 1), atol=1e-6)
    assert max_diff(carry, state) < 1e-6 and ys.shape == (2, 5, 8)
    vmapped = jax.vmap(lambda xi: scan_cell(cell, params, xi)[1])(x)
    np.testing.assert_allclose(vmapped, scan_cell(cell, params, x)[1], atol=ATOL)


def test_init_as_the_papers_code():
    mingru, minlstm = MinGRUCell(6), MinLSTMCell(6)
    p = mingru.init(jax.random.key(0), 9)
    assert set(p) == {"input_kernel", "bias"} and p["input_kernel"].shape == (9, 12)
    bound = 1 / 3  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias
    assert float(jnp.max(jnp.abs(p["input_kernel"]))) <= bound and float(jnp.max(jnp.abs(p["bias"]))) <= bound
    assert float(jnp.std(p["input_kernel"])) > 0.7 * bound / np.sqrt(3)
    assert minlstm.init(jax.random.key(0), 9)["input_kernel"].shape == (9, 18)
    s = SLSTMCell(8, num_heads=2).init(jax.random.key(0), 50)
    assert s["recurrent_kernel"].shape == (2, 4, 16) and not s["recurrent_kernel"].any()
    forget = np.asarray(s["bias"][8:16])
    np.testing.assert_allclose(forget[:4], 5.0 - 12.0 * (np.arange(4) / 3) ** 0.3, rtol=1e-6)
    np.testing.assert_allclose(forget[4:], forget[:4])
    assert not s["bias"][:8].any() and not s["bias"][16:].any()
    assert abs(float(jnp.std(s["input_kernel"])) - np.sqrt(2 / 250)) < 0.01
    m = MLSTMCell(8, num_heads=4).init(jax.random.key(0), 50)
    assert m["input_kernel"].shape == (50, 40) and not m["input_kernel"][:, 32:].any()
    np.testing.assert_allclose(m["bias"][36:], [3.0, 4.0, 5.0, 6.0])
    assert not m["bias"][:32].any() and m["bias"][32:36].any()


def _torch_paper_code():
    """Feng et al. 2024, appendix B (log-space minGRU and minLSTM), transcribed as printed."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    def parallel_scan_log(log_coeffs, log_values):
        a_star = F.pad(torch.cumsum(log_coeffs, dim=1), (0, 0, 1, 0))
        log_h0_plus_b_star = torch.logcumsumexp(log_values - a_star, dim=1)
        return torch.exp(a_star + log_h0_plus_b_star)[:, 1:]

    def log_g(x):
        return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))

    def mingru(k, pre_h, h_0):
        log_z, log_coeffs = -F.softplus(-k), -F.softplus(k)
        return parallel_scan_log(log_coeffs, torch.cat([h_0.log(), log_z + log_g(pre_h)], dim=1))

    def minlstm(pre_f, pre_i, pre_h, h_0):
        diff = F.softplus(-pre_f) - F.softplus(-pre_i)
        log_f, log_i = -F.softplus(diff), -F.softplus(-diff)
        return parallel_scan_log(log_f, torch.cat([h_0.log(), log_i + log_g(pre_h)], dim=1))

    return torch, mingru, minlstm


@pytest.mark.parametrize("impl", ["scan", "parallel"])
def test_min_cells_equal_the_papers_log_space_code(impl):
    torch, mingru, minlstm = _torch_paper_code()
    x = jax.random.normal(jax.random.key(1), (2, 12, 3))
    h0 = 0.2 + jax.random.uniform(jax.random.key(2), (2, 6))  # the paper's code takes log(h_0): h_0 > 0
    for cell, reference in ((MinGRUCell(6), mingru), (MinLSTMCell(6), minlstm)):
        params = perturbed(cell)
        _, ys = scan_cell(cell, params, x, initial_carry=h0, impl=impl)
        pre = torch.from_numpy(np.asarray(cell.input_projection(params, x), np.float64))
        ref = reference(*torch.split(pre, 6, dim=-1), torch.from_numpy(np.asarray(h0, np.float64))[:, None])
        np.testing.assert_allclose(ys, ref.numpy(), rtol=2e-5, atol=2e-6)


def _numpy_step_reference(cell, x_proj, h):
    """The papers' sequential equations for one step, NumPy float64 (no log space)."""
    sig = lambda a: 1 / (1 + np.exp(-a))
    g = lambda a: np.where(a >= 0, a + 0.5, sig(a))
    if isinstance(cell, MinGRUCell):
        k_z, k_h = np.split(x_proj, 2, -1)
        return (1 - sig(k_z)) * h + sig(k_z) * g(k_h)
    k_f, k_i, k_h = np.split(x_proj, 3, -1)
    f, i = sig(k_f), sig(k_i)
    return f / (f + i) * h + i / (f + i) * g(k_h)


@pytest.mark.parametrize("cls", [MinGRUCell, MinLSTMCell])
def test_min_step_is_the_papers_sequential_form(cls):
    cell = cls(5)
    params = perturbed(cell)
    x, h = jax.random.normal(jax.random.key(3), (4, 3)), jax.random.normal(jax.random.key(4), (4, 5))
    new, y = cell.apply(params, h, x)
    ref = _numpy_step_reference(cell, np.asarray(cell.input_projection(params, x), np.float64), np.asarray(h))
    np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new, y)


@pytest.mark.parametrize("name,options", PARALLEL)
@pytest.mark.parametrize("reverse", [False, True])
def test_parallel_equals_the_scan_values_and_gradients(name, options, reverse):
    cell = make_cell(name, 8, **options)
    params = perturbed(cell)
    x = jax.random.normal(jax.random.key(2), (4, 11, 3))
    lengths = jnp.array([11, 5, 0, 7])
    carry0 = random_carry(cell, (4,))

    def run(impl, params, x, carry0, lengths):
        return scan_cell(cell, params, x, initial_carry=carry0, seq_lengths=lengths, reverse=reverse, impl=impl)

    for lens in (None, lengths):
        assert max_diff(run("scan", params, x, carry0, lens), run("parallel", params, x, carry0, lens)) < ATOL
    loss = lambda impl: lambda p, x, c: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(run(impl, p, x, c, lengths)))
    g_scan = jax.grad(loss("scan"), argnums=(0, 1, 2))(params, x, carry0)
    g_par = jax.grad(loss("parallel"), argnums=(0, 1, 2))(params, x, carry0)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_par)):  # float32 rounding, relative to the size
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(a))))
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g_par))


@pytest.mark.parametrize("name,options", PARALLEL)
def test_chunks_chain_through_the_carry(name, options, monkeypatch):
    """TBPTT: two chunks with the carry passed on equal the whole sequence; the mLSTM's chunked
    parallel form (with a padded last chunk) equals its whole-sequence form."""
    cell = make_cell(name, 8, **options)
    params = perturbed(cell)
    x = jax.random.normal(jax.random.key(5), (3, 2, 13, 3))  # two batch axes
    whole_carry, whole = scan_cell(cell, params, x, impl="parallel")
    c1, y1 = scan_cell(cell, params, x[..., :6, :], impl="parallel")
    c2, y2 = scan_cell(cell, params, x[..., 6:, :], initial_carry=c1, impl="parallel")
    assert max_diff((whole_carry, whole), (c2, jnp.concatenate([y1, y2], -2))) < ATOL
    monkeypatch.setattr(plan_module, "MLSTM_CHUNK", 8)
    plan = plan_layer(cell, steps=13, rows=6, features=3, platform="gpu")
    assert plan.impl == "parallel" and plan.chunk == (8 if name == "mlstm" else 0)
    assert max_diff(scan_cell(cell, params, x), (whole_carry, whole)) < ATOL  # the mLSTM: chunks of 8


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        for name, options in (("minlstm", {}), ("slstm", {"num_heads": 2}), ("mlstm", {"num_heads": 2})):
            cell = make_cell(name, 4, param_dtype=jnp.float64, **options)
            params = perturbed(cell, scale=0.3)
            x = jax.random.normal(jax.random.key(2), (2, 4, 3), jnp.float64)

            def sequence(p, xs, impl="scan"):
                carry, ys = scan_cell(cell, p, xs, seq_lengths=jnp.array([4, 2]), impl=impl)
                return jnp.sum(ys**2) + sum(jnp.sum(jnp.tanh(a)) for a in jax.tree.leaves(carry) if a.ndim)

            check_grads(sequence, (params, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
            if name != "slstm":
                check_grads(lambda p, xs: sequence(p, xs, "parallel"), (params, x), order=1, modes=["rev"],
                            atol=1e-5, rtol=1e-5)


def test_slstm_heads_are_block_diagonal_and_the_first_step_is_stable():
    cell = SLSTMCell(6, num_heads=3)
    params = perturbed(cell)
    h = jnp.zeros((6,)).at[0].set(1.0)  # a unit in head 0 moves only head 0's gates
    ry = cell.recurrent_projection(params, h).reshape(4, 3, 2)
    assert ry[:, 0].any() and not ry[:, 1:].any()
    params = {**params, "bias": params["bias"].at[:6].set(-200.0)}  # exp(i~) underflows against m = 0
    carry, y = cell.apply(params, cell.initial_carry(()), jnp.ones(3))
    assert bool(jnp.isfinite(y).all()) and bool((carry.n == 1.0).all()) and STABILISER_START < -1e20


def test_dispatch_picks_the_parallel_forms_and_refuses_the_others(monkeypatch):
    for name, options in PARALLEL:
        cell = make_cell(name, 8, **options)
        assert plan_layer(cell, steps=50, rows=4, features=3, platform="gpu").impl == "parallel"
        assert plan_layer(cell, steps=50, rows=4, features=3, seq_lengths=True, platform="tpu").impl == "parallel"
        on_cpu = plan_layer(cell, steps=50, rows=4, features=3, platform="cpu").impl  # measured: the scan wins there
        assert on_cpu == ("parallel" if name == "mlstm" else "scan")
        assert plan_layer(cell, impl="parallel", steps=50, rows=4, features=3, platform="cpu").impl == "parallel"
        assert plan_layer(cell, steps=50, rows=4, features=3, remat=True, platform="gpu").impl == "scan"
        with pytest.raises(ConfigError, match="impl='parallel' .* without remat; got .* with remat"):
            plan_layer(cell, impl="parallel", steps=50, rows=4, features=3, remat=True)
    assert plan_layer(SLSTMCell(8), steps=50, rows=4, features=3).impl == "scan"
    for cell in (SLSTMCell(8), make_cell("lstm", 8)):
        with pytest.raises(ConfigError, match=f"impl='parallel' runs MinGRUCell, MinLSTMCell and MLSTMCell .* got "
                                              f"{cell.name}. Use impl='scan' or 'auto'"):
            scan_cell(cell, cell.init(jax.random.key(0), 3), jnp.ones((2, 5, 3)), impl="parallel")
    with pytest.raises(ConfigError, match="impl='fused' supports"):
        scan_cell(MinGRUCell(4), MinGRUCell(4).init(jax.random.key(0), 3), jnp.ones((2, 5, 3)), impl="fused")
    monkeypatch.setattr(plan_module, "PARALLEL_MAX_BYTES", 2**20)
    cell = MLSTMCell(8, num_heads=2)
    with pytest.raises(ConfigError, match=r"over 1000 steps of 4 sequences and 2 head\(s\) needs about 0\.2 GiB.*"
                                          r"chunks of at most \d+ steps.*impl='scan'") as err:
        plan_layer(cell, impl="parallel", steps=1000, rows=4, features=3)
    assert err.value.argument == "impl"
    auto = plan_layer(cell, steps=1000, rows=4, features=3)
    assert auto.impl == "parallel" and 8 <= auto.chunk < 128
    assert plan_layer(cell, steps=1000, rows=4096, features=3).impl == "scan"  # not even 8 steps fit


@pytest.mark.parametrize("bad,match", [
    (lambda: SLSTMCell(6, num_heads=4), "SLSTMCell: num_heads must be a positive int dividing hidden_size=6, got 4."),
    (lambda: MLSTMCell(6, num_heads=0), "MLSTMCell: num_heads must be a positive int dividing hidden_size=6, got 0."),
    (lambda: SLSTMCell(6, forget_gate="tanh"), "SLSTMCell: forget_gate must be one of"),
    (lambda: MinGRUCell(0), "MinGRUCell: hidden_size must be a positive int, got 0."),
    (lambda: make_cell("minlstm", 4, num_heads=2), r"Unknown option\(s\) \['num_heads'\] for a minlstm cell"),
    (lambda: MinLSTMCell(4).init(jax.random.key(0), 0), "MinLSTMCell.init: input_size must be a positive int"),
])
def test_bad_input_is_one_sentence_naming_the_argument(bad, match):
    with pytest.raises(ConfigError, match=match):
        bad()


@pytest.mark.parametrize("name,options", ALL)
def test_stacks_tokens_and_jit(name, options):
    cell = make_cell(name, 4, **options)
    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    stack = RecurrentStack(cell, num_layers=2, bidirectional=True, dropout=0.1)
    params = stack.init(jax.random.key(2), 3)
    carries, ys = jax.jit(lambda p, x: stack.apply(p, x, dropout_key=jax.random.key(3)))(params, x)
    assert ys.shape == (2, 6, 8) and len(carries) == 2 and len(carries[0]) == 2
    _, scanned = stack.apply(params, x, impl="scan", dropout_key=jax.random.key(3))
    np.testing.assert_allclose(ys, scanned, atol=ATOL)
    tokens = make_cell(name, 4, token_inputs=True, **options)
    params = tokens.init(jax.random.key(0), 10)
    ids = jnp.array([[1, 4, 9, 0], [3, 3, 2, 7]])
    _, by_ids = scan_cell(tokens, params, ids)
    plain = make_cell(name, 4, **options)
    _, by_one_hot = scan_cell(plain, params, jax.nn.one_hot(ids, 10), impl="scan")
    np.testing.assert_allclose(by_ids, by_one_hot, atol=ATOL)
    with pytest.raises(ConfigError, match="token_inputs=True"):
        scan_cell(tokens, params, jnp.ones((2, 4, 10)))


@pytest.mark.parametrize("name,options", ALL)
def test_flax_modules_equal_the_functional_stack(name, options):
    pytest.importorskip("flax")
    from flax import nnx

    from lstm_jax import linen
    from lstm_jax import nnx as lj_nnx

    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    cls = {"mingru": "MinGRU", "minlstm": "MinLSTM", "slstm": "SLSTM", "mlstm": "MLSTM"}[name]
    module = getattr(lj_nnx, cls)(3, 4, num_layers=2, rngs=nnx.Rngs(0), **options)
    assert type(module.stack.cell).__name__.lower() == name + "cell"
    np.testing.assert_allclose(module(x), module.stack.apply(module.to_params(), x)[1], atol=1e-6)
    again = lj_nnx.from_params(module.stack, module.to_params())
    assert type(again).__name__ == cls
    np.testing.assert_allclose(again(x), module(x), atol=1e-6)
    lin = getattr(linen, cls)(hidden_size=4, num_layers=2, **options)
    variables = lin.init(jax.random.key(0), x)
    np.testing.assert_allclose(lin.apply(variables, x), lin.stack().apply(lin.to_params(variables), x)[1], atol=1e-6)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_the_scan_of_a_min_cell_keeps_the_input_only_work_out_of_its_loop(name):
    """``scan_layer`` runs ``hoisted_step`` over ``hoist``'s coefficients: the loop, forward and
    backward, is ``h = a * h + b`` alone (no exp, log or softplus per step), and equals the cell's
    own step applied one step at a time."""
    cell = make_cell(name, 8)
    params = perturbed(cell)
    x = jax.random.normal(jax.random.key(3), (2, 30, 3))
    loss = lambda p: jnp.sum(scan_cell(cell, p, x, impl="scan")[1] ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(loops) == 2  # forward and backward
    for loop in loops:
        inside = {e.primitive.name for e in loop.params["jaxpr"].jaxpr.eqns}
        assert not inside & {"exp", "log", "log1p", "logistic", "tanh"}, inside
    carry, steps = cell.initial_carry((2,)), []
    for t in range(x.shape[1]):
        carry, y = cell.apply(params, carry, x[:, t])
        steps.append(y)
    np.testing.assert_allclose(scan_cell(cell, params, x, impl="scan")[1], jnp.stack(steps, 1), rtol=1e-6, atol=1e-6)
