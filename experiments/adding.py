"""The adding problem (Arjovsky et al. 2016's form) with lstm_jax's cells: which cells carry a
value across T steps?

    python -m experiments.adding --quick                      # minutes on 2 cores
    python -m experiments.adding --spans 50 100 200 --seeds 3 --steps 4000

Each input step is (value ~ U[0, 1], marker); exactly one marker in the first half and one in the
second half of the sequence; the target is the sum of the two marked values. Predicting 1 always
gives MSE 1/6 = 0.167. Model: one recurrent layer of ``--hidden`` units, a dense readout of the
last state, MSE, Adam with global-norm clipping. All seeds of a cell train together: one
``jax.vmap``-ed, jitted program (a scan of ``--chunk`` steps per dispatch), not a loop of runs.

Cells: tanh RNN, leaky RNN (alpha 0.1), GRU, LSTM (forget bias 1, the default) and LSTM with
forget bias 0; with ``--modern`` the RNN, GRU and LSTM against minGRU, minLSTM (parallel scan),
sLSTM and mLSTM (4 heads each) at T = 100, 400 and 1000 (``adding-modern.*``). The readout reads
the last step's output (for every cell but the mLSTM, whose carry is a matrix memory, that is the
carry's ``h``); the gradient-flow curve perturbs ``h`` (the mLSTM: its memory ``C``).
Reported per cell, span and seed: test MSE at the end (4096 fresh sequences),
the first step whose test MSE (checked every ``--eval-every`` steps) fell below 0.01, wall time,
the largest global gradient norm (before clipping) between checks and the first step whose
gradient norm was not finite (an exploding gradient past float32: clipping cannot scale an
infinite norm back, and the update turns the parameters into NaN), and, after training (seed 0),
``||d prediction / dh_t||`` against the distance T - t.
Writes experiments/results/adding[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lstm_jax import make_cell, scan_cell

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = {
    "rnn": ("rnn", {}),
    "leaky_rnn": ("leaky_rnn", {"alpha": 0.1}),
    "gru": ("gru", {}),
    "lstm": ("lstm", {}),
    "lstm_forget_bias_0": ("lstm", {"forget_bias": 0.0}),
    "mingru": ("mingru", {}),
    "minlstm": ("minlstm", {}),
    "slstm": ("slstm", {"num_heads": 4}),
    "mlstm": ("mlstm", {"num_heads": 4}),
}
CLASSIC = ["rnn", "leaky_rnn", "gru", "lstm", "lstm_forget_bias_0"]
# --modern: the cells since 2014 against the classic ones (experiments/results/adding-modern.*)
MODERN = ["rnn", "gru", "lstm", "mingru", "minlstm", "slstm", "mlstm"]


def state_of(carry):
    """The part of a carry that ``grad_by_distance`` perturbs: ``h`` where the carry has one (LSTM,
    sLSTM), the carry itself for the one-array carries, the matrix memory ``C`` of the mLSTM."""
    if hasattr(carry, "h"):
        return carry.h
    return carry.C if hasattr(carry, "C") else carry


def with_state(carry, value):
    if hasattr(carry, "h"):
        return carry._replace(h=value)
    return carry._replace(C=value) if hasattr(carry, "C") else value


def adding_batch(key: jax.Array, batch: int, steps: int) -> tuple[jax.Array, jax.Array]:
    """``x (batch, steps, 2)``: values and markers; ``y (batch,)``: the sum of the marked values."""
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, steps))
    half = steps // 2
    first = jax.random.randint(k_a, (batch,), 0, half)
    second = jax.random.randint(k_b, (batch,), half, steps)
    t = jnp.arange(steps)
    marks = ((t == first[:, None]) | (t == second[:, None])).astype(jnp.float32)
    return jnp.stack([values, marks], -1), (values * marks).sum(-1)


def make_model(name: str, hidden: int):
    kind, options = CELLS[name]
    cell = make_cell(kind, hidden, **options)

    def init(key):
        k_cell, k_out = jax.random.split(key)
        return {"cell": cell.init(k_cell, 2), "out": {"w": jnp.zeros((hidden, 1)), "b": jnp.ones((1,))}}

    def predict(params, x):
        _, ys = scan_cell(cell, params["cell"], x)
        return (ys[..., -1, :] @ params["out"]["w"] + params["out"]["b"])[..., 0]  # the last step's output

    def grad_by_distance(params, x):
        """``||d prediction / dh_t||`` for one sequence ``x (T, 2)``, by distance T - t = 1 ... T."""
        def prediction(eps):
            def body(carry, inputs):
                x_t, e_t = inputs
                carry, _ = carry
                carry = with_state(carry, state_of(carry) + e_t)
                return cell.apply(params["cell"], carry, x_t), None

            (_, y), _ = jax.lax.scan(body, (cell.initial_carry(()), jnp.zeros((hidden,))), (x, eps))
            return (y @ params["out"]["w"])[0]

        state = state_of(cell.initial_carry(()))
        g = jax.grad(prediction)(jnp.zeros((x.shape[0], *state.shape)))
        return jnp.linalg.norm(g.reshape(x.shape[0], -1), axis=-1)[::-1]

    return init, predict, grad_by_distance


def train(name: str, steps_span: int, seeds: int, args) -> dict:
    init, predict, grad_by_distance = make_model(name, args.hidden)
    tx = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(args.lr))
    loss_fn = lambda p, x, y: jnp.mean((predict(p, x) - y) ** 2)

    def chunk(state, key):
        def one(state, k):
            params, opt = state
            x, y = adding_batch(k, args.batch, steps_span)
            loss, g = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, updates), opt), optax.global_norm(g)  # before clipping

        return jax.lax.scan(one, state, jax.random.split(key, args.chunk))

    run_chunk = jax.jit(jax.vmap(chunk))  # all seeds in one program
    batched = jax.jit(jax.vmap(lambda p, x, y: loss_fn(p, x, y), in_axes=(0, None, None)))
    test_x, test_y = adding_batch(jax.random.PRNGKey(10_000), 4096, steps_span)

    def evaluate(params, x, y, part=1024):  # in parts: the mLSTM's parallel form is quadratic per sequence
        return sum(batched(params, x[i : i + part], y[i : i + part]) for i in range(0, len(x), part)) / (len(x) // part)

    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds))
    params = jax.vmap(init)(keys)
    state = (params, jax.vmap(tx.init)(params))
    reached = [None] * seeds
    nonfinite = [None] * seeds  # the first step whose gradient norm was inf or NaN
    curve, grad_norm_max = [], []
    largest = np.zeros(seeds)
    t0 = time.perf_counter()
    for start in range(0, args.steps, args.chunk):
        chunk_keys = jax.vmap(lambda k: jax.random.fold_in(k, start))(keys)
        state, norms = run_chunk(state, chunk_keys)
        norms = np.asarray(norms, np.float64)  # (seeds, chunk): one small transfer per chunk
        largest = np.maximum(largest, np.where(np.isfinite(norms), norms, np.inf).max(axis=1))
        for s in range(seeds):
            bad = np.flatnonzero(~np.isfinite(norms[s]))
            if nonfinite[s] is None and bad.size:
                nonfinite[s] = start + int(bad[0]) + 1
        done = start + args.chunk
        if done % args.eval_every == 0 or done >= args.steps:
            mse = np.asarray(evaluate(state[0], test_x, test_y))
            curve.append([done, mse.tolist()])
            grad_norm_max.append([done, largest.tolist()])
            largest = np.zeros(seeds)
            for s in range(seeds):
                if reached[s] is None and mse[s] < 0.01:
                    reached[s] = done
    wall = time.perf_counter() - t0
    final = curve[-1][1]
    # after training (seed 0): how strongly the prediction depends on the state t steps back
    seed0 = jax.tree.map(lambda a: a[0], state[0])
    norms = jax.jit(jax.vmap(grad_by_distance, in_axes=(None, 0)))(seed0, test_x[:16])
    flow = np.exp(np.mean(np.log(np.maximum(np.asarray(norms, np.float64), 1e-45)), axis=0))
    return {"cell": name, "span": steps_span, "test_mse": final, "steps_to_0.01": reached, "wall_s": wall,
            "wall_s_per_seed": wall / seeds, "curve": curve, "grad_norm_max": grad_norm_max,
            "first_nonfinite_grad_step": nonfinite, "trained_grad_by_distance": flow.tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="spans 50 and 100, 2 seeds, 1500 steps, 32 units")
    p.add_argument("--modern", action="store_true",
                   help=f"cells {' '.join(MODERN)} at spans 100 400 1000 (tag adding-modern); other flags still apply")
    p.add_argument("--spans", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--cells", nargs="+", default=None, choices=list(CELLS), help="default: the classic cells")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--tag", default=None)
    p.add_argument("--append", action="store_true",
                   help="add these runs to the results file (same hyper-parameters), replacing same cell and span")
    args = p.parse_args()
    if args.quick:
        args.spans, args.seeds, args.steps, args.hidden = [50, 100], 2, 1500, 32
    if args.modern:
        args.spans = [100, 400, 1000] if args.spans == p.get_default("spans") else args.spans
        args.cells = args.cells or MODERN
    args.cells = args.cells or CLASSIC
    tag = args.tag or ("adding-quick" if args.quick else "adding-modern" if args.modern else "adding")
    hyper = {k: v for k, v in vars(args).items() if k not in ("quick", "modern", "append", "spans", "cells")}
    runs = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.append and (RESULTS / f"{tag}.json").exists():
        old = json.loads((RESULTS / f"{tag}.json").read_text())
        differ = {k: (old["hyper"].get(k), v) for k, v in hyper.items() if old["hyper"].get(k) != v}
        if differ:
            p.error(f"--append: these settings differ from {tag}.json (old, new): {differ}; use the same ones or --tag")
        runs = [r for r in old["runs"]
                if (r["cell"], r["span"]) not in {(c, s) for c in args.cells for s in args.spans}]
    for span in args.spans:
        for name in args.cells:
            r = train(name, span, args.seeds, args)
            runs.append(r)
            print(f"T={span:4d} {name:20s} test MSE {', '.join(f'{m:.4f}' for m in r['test_mse'])}  "
                  f"steps to 0.01 {r['steps_to_0.01']}  {r['wall_s']:.0f} s", flush=True)
            runs.sort(key=lambda r: (r["span"], list(CELLS).index(r["cell"])))
            out = {"hyper": hyper, "runs": runs}
            (RESULTS / f"{tag}.json").write_text(json.dumps(out, indent=1) + "\n")
            write_report(out, tag)  # after every run: a long series stopped part-way leaves its files whole


def write_report(out: dict, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = out["hyper"]
    lines = [f"# The adding problem ({tag})", "",
             f"{h['hidden']} units, batch {h['batch']}, Adam {h['lr']}, clip {h['clip']}, {h['steps']} steps, "
             f"{h['seeds']} seeds per cell trained together under `jax.vmap`. Baseline (always 1): MSE 0.167.", "",
             "| span T | cell | test MSE per seed | steps to MSE < 0.01 | wall s (all seeds) |",
             "|---|---|---|---|---|"]
    for r in out["runs"]:
        lines.append(f"| {r['span']} | {r['cell']} | {', '.join(f'{m:.4f}' for m in r['test_mse'])} | "
                     f"{', '.join('-' if s is None else str(s) for s in r['steps_to_0.01'])} | {r['wall_s']:.0f} |")
    if any(not math.isfinite(m) for r in out["runs"] for m in r["test_mse"]):
        lines += ["", "nan: that seed's parameters turned non-finite during training."]
    lines += [f"- T = {r['span']}, {r['cell']}, seed {s}: the gradient norm was first non-finite at step {step}."
              for r in out["runs"] for s, step in enumerate(r.get("first_nonfinite_grad_step") or []) if step]
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    spans = sorted({r["span"] for r in out["runs"]})
    fig, axes = plt.subplots(2, len(spans), figsize=(5 * len(spans), 8), squeeze=False)
    for ax, span in zip(axes[1], spans):
        for i, r in enumerate(x for x in out["runs"] if x["span"] == span):
            g = np.asarray(r["trained_grad_by_distance"])
            ax.semilogy(np.arange(1, len(g) + 1), g, color=f"C{i}", label=r["cell"])
        ax.set(title=f"after training, T = {span}: ||d prediction / dh_t||", xlabel="distance T - t", ylim=(1e-30, 1e3))
        ax.grid(alpha=0.3, which="both")
    for ax, span in zip(axes[0], spans):
        for i, r in enumerate(x for x in out["runs"] if x["span"] == span):
            steps = [c[0] for c in r["curve"]]
            mse = np.asarray([c[1] for c in r["curve"]])
            for s in range(mse.shape[1]):
                ax.semilogy(steps, mse[:, s], color=f"C{i}", alpha=0.8, label=r["cell"] if s == 0 else None)
        ax.axhline(1 / 6, color="gray", ls=":", label="baseline 0.167")
        ax.axhline(0.01, color="gray", ls="--", lw=0.8)
        ax.set(title=f"adding problem, T = {span}", xlabel="train step", ylabel="test MSE")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{tag}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
