"""The lesson's claims as tests: the RNN gradient bound, the LSTM cell-state path, the adding data;
and the equal-size comparison of the cells (`benchmarks/quality.py --same-params`)."""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import adding  # noqa: E402

from lstm_jax import LSTMCarry, LSTMCell, RNNCell, scan_cell  # noqa: E402


def _run_from(cell, params, h, xs):
    return scan_cell(cell, params, xs, initial_carry=h)[0]


@pytest.mark.parametrize("sigma", [0.9, 1.0, 1.1])
def test_tanh_rnn_jacobian_is_bounded_by_sigma_max_to_the_distance(sigma):
    """||dh_T/dh_t|| <= sigma_max(W)^(T-t), because tanh' <= 1; reached at h = 0 with zero inputs."""
    cell = RNNCell(8)
    params = cell.init(jax.random.PRNGKey(0), 3)
    w = params["recurrent_kernel"]
    params = {**params, "recurrent_kernel": w * sigma / jnp.linalg.norm(w, 2)}
    xs = jax.random.normal(jax.random.PRNGKey(1), (30, 3))
    h0 = jax.random.normal(jax.random.PRNGKey(2), (8,)) * 0.5
    for distance in (1, 5, 15, 30):
        jac = jax.jacobian(lambda h: _run_from(cell, params, h, xs[-distance:]))(h0)
        assert np.linalg.norm(jac, 2) <= sigma**distance * (1 + 1e-5)
        tight = jax.jacobian(lambda h: _run_from(cell, params, h, jnp.zeros((distance, 3))))(jnp.zeros(8))
        zero_bias = np.allclose(params["bias"], 0)
        assert zero_bias and abs(np.linalg.norm(tight, 2) / sigma**distance - 1) < 1e-4


def test_lstm_cell_state_path_is_the_product_of_forget_gates():
    """With the recurrent weights at zero the only path from c_t to c_T is the cell state:
    dc_T/dc_t = diag(prod of f), and the forget bias sets its size."""
    for forget_bias, expected_100 in ((0.0, 1e-30), (1.0, 2e-14), (2.0, 3e-6)):
        cell = LSTMCell(4, forget_bias=forget_bias, recurrent_kernel_init=lambda k, s, d: jnp.zeros(s, d),
                        kernel_init=lambda k, s, d: jnp.zeros(s, d))
        params = cell.init(jax.random.PRNGKey(0), 2)
        xs = jax.random.normal(jax.random.PRNGKey(1), (100, 2))
        c_of = lambda c: _run_from(cell, params, LSTMCarry(jnp.zeros(4), c), xs).c
        jac = jax.jacobian(c_of)(jnp.ones(4))
        f = jax.nn.sigmoid(forget_bias)
        np.testing.assert_allclose(jac, np.eye(4) * f**100, rtol=1e-3)
        assert 0.2 < f**100 / expected_100 < 5  # the orders of magnitude


def test_adding_problem_batches_mark_one_value_in_each_half():
    x, y = adding.adding_batch(jax.random.PRNGKey(0), 256, 50)
    marks = np.asarray(x[..., 1])
    assert (marks[:, :25].sum(1) == 1).all() and (marks[:, 25:].sum(1) == 1).all()
    np.testing.assert_allclose(y, (x[..., 0] * x[..., 1]).sum(1), rtol=1e-6)
    assert abs(float(jnp.mean((1.0 - y) ** 2)) - 1 / 6) < 0.03  # the baseline MSE


def test_adding_trains_all_seeds_in_one_vmapped_program():
    args = argparse.Namespace(hidden=8, lr=1e-2, clip=1.0, batch=16, steps=100, chunk=50, eval_every=50)
    result = adding.train("lstm", 10, 2, args)
    assert len(result["test_mse"]) == 2 and all(np.isfinite(result["test_mse"]))
    assert result["test_mse"][0] != result["test_mse"][1]  # the seeds really differ
    assert [c[0] for c in result["curve"]] == [50, 100]
    # the largest gradient norm per check is at least the first step's, computed here again
    init, predict, _ = adding.make_model("lstm", 8)
    params = init(jax.random.PRNGKey(0))  # seed 0's start
    first = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 0), 50)[0]
    x, y = adding.adding_batch(first, 16, 10)
    g = jax.grad(lambda p: jnp.mean((predict(p, x) - y) ** 2))(params)
    assert [c[0] for c in result["grad_norm_max"]] == [50, 100]
    assert result["grad_norm_max"][0][1][0] >= float(optax.global_norm(g)) * (1 - 1e-5) > 0
    assert all(np.isfinite(result["grad_norm_max"][1][1])) and result["first_nonfinite_grad_step"] == [None, None]


def test_clipping_runs_both_settings_from_the_same_start_in_one_program():
    import clipping

    args = argparse.Namespace(span=12, seeds=2, steps=40, hidden=8, batch=8, sigma=3.0, lrs=[0.05], momentum=0.9,
                              clip=0.01, chunk=20)
    runs = clipping.run(args)["runs"]
    assert [(r["setting"], r["seed"]) for r in runs] == [("lr 0.05, clip off", 0), ("lr 0.05, clip off", 1),
                                                         ("lr 0.05, clip 0.01", 0), ("lr 0.05, clip 0.01", 1)]
    off, on = runs[0], runs[2]
    # same seed, same first batch: the same gradient before clipping; then the updates differ
    np.testing.assert_allclose(off["grad_norm_curve"][0], on["grad_norm_curve"][0], rtol=1e-5)
    assert off["grad_norm_curve"][0] > args.clip and off["loss_curve"][5] != on["loss_curve"][5]
    assert runs[0]["grad_norm_curve"][0] != runs[1]["grad_norm_curve"][0]  # the seeds really differ


@pytest.mark.parametrize("cell", ["gru", "mingru", "mlstm"])
def test_same_params_picks_the_hidden_size_nearest_the_default_models_count(cell):
    """``benchmarks/quality.py --same-params``: the cells compared at equal size. The chosen hidden
    size's count is the nearest to the 2x256 LSTM's among its neighbours (multiples of 8)."""
    from benchmarks.quality import parameter_count, same_size_hidden
    from lstm_jax.charlm import train as train_script

    config = train_script.resolve_config(train_script.parse_args([]), None)
    target = parameter_count(config, 90)
    config["cell"] = cell
    hidden = same_size_hidden(config, 90)
    gap = lambda h: abs(parameter_count({**config, "hidden_size": h}, 90) - target)
    assert hidden != 256 and gap(hidden) <= min(gap(hidden - 8), gap(hidden + 8))
    assert gap(hidden) < 0.02 * target
