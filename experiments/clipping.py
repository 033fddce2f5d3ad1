"""Gradient clipping on and off, on a tanh RNN whose gradients explode: the lesson's remedy, measured.

    python -m experiments.clipping --quick     # a minute on 2 cores
    python -m experiments.clipping             # T = 100, 3 seeds, 3000 steps

The adding problem (see ``adding.py``) with a tanh ``RNNCell`` whose recurrent matrix starts with
largest singular value ``--sigma`` (above 1: the bound ``sigma_max^(T-t)`` on ``||dh_T/dh_t||``
lets gradients grow with the span; see ``gradient_flow.py``), trained by SGD with momentum (the
optimiser of Pascanu et al. 2013, where a gradient's size is the step's size) at each of ``--lrs``,
with global-norm clipping at ``--clip`` and without. All seeds of all settings train in one
``jax.vmap``-ed, jitted program; the learning rate and the clip threshold are vmapped values
(threshold infinity: off). Reported per setting and
seed: test MSE at the end, the gradient norm before clipping (median and maximum over steps),
the number of steps whose gradient norm exceeded 10x the run's median, and the first step whose
loss was not finite (the run diverged). Writes experiments/results/clipping[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.adding import adding_batch
from lstm_jax import RNNCell, scan_cell

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T = 50, 2 seeds, 800 steps")
    p.add_argument("--span", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sigma", type=float, default=1.5, help="largest singular value of the initial recurrent matrix")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1], help="SGD learning rates")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=50)
    args = p.parse_args()
    if args.quick:
        args.span, args.seeds, args.steps = 50, 2, 800
    tag = "clipping-quick" if args.quick else "clipping"
    out = run(args)
    for r in out["runs"]:
        print(f"{r['setting']:20s} seed {r['seed']}: test MSE {r['test_mse']:.4f}  grad norm median "
              f"{r['grad_norm_median']:.3g} max {r['grad_norm_max']:.3g}  spikes {r['steps_above_10x_median']}  "
              f"non-finite from step {r['non_finite_from_step']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(_finite_or_null(out), indent=1, allow_nan=False) + "\n")
    write_report(out, tag)


def run(args) -> dict:
    """Both settings, all seeds, in one vmapped program; per run the curves and the summary."""
    cell = RNNCell(args.hidden)
    tx = lambda lr: optax.sgd(lr, momentum=args.momentum)  # lr: a vmapped value

    def init(key):
        params = cell.init(key, 2)
        w = params["recurrent_kernel"]
        params = {**params, "recurrent_kernel": w * (args.sigma / jnp.linalg.norm(w, 2))}
        return {"cell": params, "out": {"w": jnp.zeros((args.hidden, 1)), "b": jnp.ones((1,))}}

    def loss_fn(params, x, y):
        h, _ = scan_cell(cell, params["cell"], x)
        return jnp.mean(((h @ params["out"]["w"] + params["out"]["b"])[..., 0] - y) ** 2)

    def chunk(state, key, lr, clip):
        def one(state, k):
            params, opt = state
            loss, g = jax.value_and_grad(loss_fn)(params, *adding_batch(k, args.batch, args.span))
            norm = optax.tree.norm(g)
            g = jax.tree.map(lambda a: a * jnp.minimum(1.0, clip / (norm + 1e-12)), g)
            updates, opt = tx(lr).update(g, opt, params)
            return (optax.apply_updates(params, updates), opt), (loss, norm)

        return jax.lax.scan(one, state, jax.random.split(key, args.chunk))

    settings = [(f"lr {lr:g}, " + ("clip off" if np.isinf(c) else f"clip {c:g}"), lr, c)
                for lr in args.lrs for c in (np.inf, args.clip)]
    seeds = np.tile(np.arange(args.seeds), len(settings))  # run i: seed seeds[i], setting i // seeds
    lrs = jnp.asarray(np.repeat([lr for _, lr, _ in settings], args.seeds), jnp.float32)
    clips = jnp.asarray(np.repeat([c for _, _, c in settings], args.seeds), jnp.float32)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    run_chunk = jax.jit(jax.vmap(chunk))
    params = jax.vmap(init)(keys)
    state = (params, jax.vmap(tx(0.0).init)(params))
    losses, norms = [], []
    t0 = time.perf_counter()
    for start in range(0, args.steps, args.chunk):
        state, (loss, norm) = run_chunk(state, jax.vmap(lambda k: jax.random.fold_in(k, start))(keys), lrs, clips)
        losses.append(np.asarray(loss))
        norms.append(np.asarray(norm))
    wall = time.perf_counter() - t0
    losses, norms = np.concatenate(losses, 1), np.concatenate(norms, 1)  # (runs, steps)
    test_x, test_y = adding_batch(jax.random.PRNGKey(10_000), 4096, args.span)
    test = np.asarray(jax.jit(jax.vmap(loss_fn, in_axes=(0, None, None)))(state[0], test_x, test_y))
    finite = np.asarray(jax.vmap(
        lambda p: jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(p)])))(state[0]))
    runs = []
    for i, s in enumerate(seeds):
        n = norms[i][np.isfinite(norms[i])]
        median = float(np.median(n)) if n.size else float("nan")
        bad = np.flatnonzero(~np.isfinite(losses[i]))
        runs.append({"setting": settings[i // args.seeds][0], "seed": int(s), "test_mse": float(test[i]),
                     "finite": bool(finite[i]), "non_finite_from_step": int(bad[0]) + 1 if bad.size else None,
                     "grad_norm_median": median,
                     "grad_norm_max": float(n.max()) if n.size else float("nan"),
                     "steps_above_10x_median": int((n > 10 * median).sum()),
                     "loss_curve": losses[i].tolist(), "grad_norm_curve": norms[i].tolist()})
    return {"hyper": {k: v for k, v in vars(args).items() if k != "quick"}, "wall_s": wall, "runs": runs}


def _finite_or_null(x):
    """NaN and infinity as JSON null (standard JSON has neither)."""
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x


def write_report(out: dict, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = out["hyper"]
    lines = [f"# Gradient clipping on and off, tanh RNN ({tag})", "",
             f"Adding problem, T = {h['span']}, {h['hidden']} units, batch {h['batch']}, recurrent matrix at "
             f"sigma_max {h['sigma']}, SGD with momentum {h['momentum']}, {h['steps']} steps, "
             f"{h['seeds']} seeds per setting, all in one vmapped program ({out['wall_s']:.0f} s). "
             "Baseline (always 1): MSE 0.167.", "",
             "| setting | seed | test MSE | grad norm, median | grad norm, max | steps > 10x median "
             "| non-finite from step |",
             "|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        mse = "diverged" if r["test_mse"] is None or not np.isfinite(r["test_mse"]) else f"{r['test_mse']:.4f}"
        lines.append(f"| {r['setting']} | {r['seed']} | {mse} | {r['grad_norm_median']:.3g} | "
                     f"{r['grad_norm_max']:.3g} | {r['steps_above_10x_median']} | {r['non_finite_from_step'] or '-'} |")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["setting"] for r in out["runs"]))
    for r in out["runs"]:
        color = f"C{names.index(r['setting'])}"
        label = r["setting"] if r["seed"] == 0 else None
        nan = lambda curve: np.asarray([np.nan if v is None else v for v in curve], float)
        a1.semilogy(nan(r["grad_norm_curve"]), color=color, alpha=0.6, lw=0.7, label=label)
        a2.semilogy(nan(r["loss_curve"]), color=color, alpha=0.6, lw=0.7, label=label)
    a1.set(title="gradient norm before clipping", xlabel="train step")
    a2.axhline(1 / 6, color="gray", ls=":", label="baseline 0.167")
    a2.set(title=f"training loss (MSE), T = {h['span']} (diverged runs leave the plot)",
           xlabel="train step", ylim=(1e-2, 1e3))
    for ax in (a1, a2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{tag}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
