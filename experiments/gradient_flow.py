"""How far gradients travel, measured with lstm_jax's own cells at initialisation.

    python -m experiments.gradient_flow            # T = 500, 8 input sequences
    python -m experiments.gradient_flow --quick    # T = 200

For each cell, L = u . h_T (u a fixed random unit vector) and ``||dL/dh_t||`` against the
distance T - t, averaged (geometric mean) over random input sequences, from one backward pass:
the state entering each step gets a zero perturbation input whose gradient is ``dL/dh_t``.

* tanh RNN with its (orthogonal) recurrent matrix scaled to largest singular value 0.9, 1.0 and
  1.1 (inputs scaled by 0.1): the gradient is bounded by ``sigma_max(W)^(T-t)`` since
  ``tanh' <= 1`` (tested in tests/test_experiments.py); below 1 it vanishes geometrically, above 1
  it grows only while the units stay in tanh's linear range, shown with zero inputs.
* LSTM with forget-gate bias 0, 1 and 2: ``dL/dh_t`` and the cell-state path alone,
  ``dc_T/dc_t = prod f``, whose mean over units is reported at T - t = 100.
* GRU, and the leaky RNN (alpha 0.1) whose Jacobian keeps a ``1 - alpha`` share of the identity.

Writes experiments/results/gradient_flow.{json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import GRUCell, LeakyRNNCell, LSTMCell, RNNCell

RESULTS = Path(__file__).resolve().parent / "results"
H, F = 64, 8


def scaled_rnn_params(cell: RNNCell, key, sigma: float) -> dict:
    params = cell.init(key, F)
    w = params["recurrent_kernel"]
    return {**params, "recurrent_kernel": w * (sigma / jnp.linalg.norm(w, 2))}


def grad_norms(cell, params, xs: jax.Array, u: jax.Array) -> jax.Array:
    """``||dL/dh_t||`` for t = T-1 ... 0 (index = T - 1 - t... returned in order of distance)."""
    steps = xs.shape[0]

    def loss(eps):
        def body(carry, inputs):
            x_t, e_t = inputs
            if isinstance(carry, tuple):  # LSTMCarry: perturb h, the state the next step reads
                carry = carry._replace(h=carry.h + e_t)
            else:
                carry = carry + e_t
            carry, y = cell.apply(params, carry, x_t)
            return carry, None

        carry, _ = jax.lax.scan(body, cell.initial_carry(()), (xs, eps))
        h = carry.h if isinstance(carry, tuple) else carry
        return u @ h

    g = jax.grad(loss)(jnp.zeros((steps, cell.hidden_size)))  # g[t]: dL/dh entering step t
    scale = jnp.max(jnp.abs(g), axis=-1, keepdims=True)  # ||g|| without squaring past float32's range
    norms = scale[:, 0] * jnp.linalg.norm(g / jnp.where(scale > 0, scale, 1.0), axis=-1)
    return norms[::-1]  # distance T - t = 1 ... T


def forget_products(cell: LSTMCell, params, xs: jax.Array, distance: int) -> float:
    """Mean over units of ``prod f`` over the last ``distance`` steps: ``dc_T/dc_{T-distance}``."""

    def body(carry, x_t):
        z = cell.input_projection(params, x_t) + carry.h @ params["recurrent_kernel"]
        f = jax.nn.sigmoid(z[H : 2 * H])
        carry, _ = cell.apply(params, carry, x_t)
        return carry, f

    _, fs = jax.lax.scan(body, cell.initial_carry(()), xs)
    return float(jnp.exp(jnp.log(fs[-distance:]).sum(0)).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = p.parse_args()
    if args.plot_only:
        return plot(json.loads((RESULTS / "gradient_flow.json").read_text()), RESULTS / "gradient_flow.png")
    steps = args.steps or (200 if args.quick else 500)
    key = jax.random.PRNGKey(0)
    u = jax.random.normal(jax.random.PRNGKey(1), (H,))
    u = u / jnp.linalg.norm(u)
    xs = jax.random.normal(jax.random.PRNGKey(2), (args.sequences, steps, F))
    cases = {}
    for sigma in (0.9, 1.0, 1.1):
        cell = RNNCell(H)
        cases[f"rnn tanh, sigma_max {sigma}"] = (cell, scaled_rnn_params(cell, key, sigma), 0.1)
    # zero inputs keep h at 0, where tanh' = 1: the Jacobian product is W^(T-t) exactly, and the
    # bound sigma_max^(T-t) is reached (explosion); with inputs the state grows and tanh saturates
    cases["rnn tanh, sigma_max 1.1, zero inputs"] = (cell, scaled_rnn_params(cell, key, 1.1), 0.0)
    for fb in (0.0, 1.0, 2.0):
        cell = LSTMCell(H, forget_bias=fb)
        cases[f"lstm, forget bias {fb:g}"] = (cell, cell.init(key, F), 1.0)
    cases["gru"] = (GRUCell(H), GRUCell(H).init(key, F), 1.0)
    leaky = LeakyRNNCell(H, alpha=0.1)
    cases["leaky rnn, alpha 0.1, sigma_max 1.0"] = (leaky, scaled_rnn_params(leaky, key, 1.0), 0.1)

    out = {"hidden": H, "features": F, "steps": steps, "sequences": args.sequences, "cases": {}}
    for name, (cell, params, x_scale) in cases.items():
        norms = jax.vmap(lambda x: grad_norms(cell, params, x * x_scale, u))(xs)
        # float32 underflow: 1e-45
        geo = np.exp(np.mean(np.log(np.maximum(np.asarray(norms, np.float64), 1e-45)), axis=0))
        entry = {"grad_norm_by_distance": geo.tolist(),
                 "at_distance": {d: float(geo[d - 1]) for d in (1, 10, 50, 100, 200, 500) if d <= steps}}
        if isinstance(cell, LSTMCell):
            entry["mean_prod_forget_100"] = float(np.mean([forget_products(cell, params, x, 100) for x in xs]))
        out["cases"][name] = entry
        print(f"{name:40s} " + "  ".join(f"d={d}: {v:.2e}" for d, v in entry["at_distance"].items())
              + (f"  prod f (100 steps): {entry['mean_prod_forget_100']:.1e}"
                 if "mean_prod_forget_100" in entry else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gradient_flow.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, RESULTS / "gradient_flow.png")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, entry in out["cases"].items():
        g = np.asarray(entry["grad_norm_by_distance"])
        ax.semilogy(np.arange(1, len(g) + 1), g, label=name, ls="--" if name.startswith("rnn") else "-")
    ax.set(xlabel="distance T - t (steps)", ylabel="||dL/dh_t|| (geometric mean over sequences)",
           title=f"Gradient flow at initialisation, H={out['hidden']}", ylim=(1e-30, 1e22))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
