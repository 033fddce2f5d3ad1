"""Per-step recurrent product: row-major carry ``h @ W_h`` against the transposed carry ``h.T``.

The fused LSTM and GRU layers hold their carry transposed in the forward loop when
``lstm_jax.fused.transposed_carry_pays(batch, hidden, gates)`` says so and the loop runs on CPU:
there XLA sends the row-major product to YNNPACK and the transposed contraction to its Eigen
kernels, and which is faster depends on the shape. This script measures both at each shape (a
loop of dependent steps, as in the layer: product, activation, feed the carry back) and shows
whether the rule picked the faster one.

    python benchmarks/layout.py      # about 2 minutes on 2 cores

Writes benchmarks/results/layout-<backend>.json and .md.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lstm_jax.fused import recurrent_product, transposed_carry_pays  # noqa: E402
from speed import Case, measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS, ROUNDS = 200, 5


def loop(transposed: bool):
    """``n`` dependent steps: product, tanh, the first ``hidden`` columns back as the carry."""

    def step(h, w):
        out = jnp.tanh(recurrent_product(h, w, None, jnp.float32, transposed))[:, : w.shape[0]]
        return out.T if transposed else out

    return jax.jit(lambda h, w, n: jax.lax.fori_loop(0, n, lambda i, h: step(h, w), h))


def time_both(batch: int, hidden: int, gates: int) -> tuple[float, float]:
    """Median microseconds per step, row-major and transposed, taking turns (``speed.measure``)."""
    w = 0.05 * jax.random.normal(jax.random.key(0), (hidden, gates * hidden))
    h = jax.random.normal(jax.random.key(1), (batch, hidden))
    cases = {}
    for transposed, h0 in ((False, h), (True, h.T)):
        f = loop(transposed)
        run = lambda n, f=f, h0=h0: f(h0, w, n).block_until_ready()
        run(STEPS)  # compile and warm up
        cases[transposed] = Case(run, 0.0)
    seconds = measure(cases, ROUNDS, STEPS)
    return seconds[False] * 1e6, seconds[True] * 1e6


def main():
    rows = []
    for gates, cell in ((4, "lstm"), (3, "gru")):
        for batch in (32, 64, 128, 256):
            for hidden in (64, 128, 192, 256):
                row_major, transposed = time_both(batch, hidden, gates)
                chosen = transposed_carry_pays(batch, hidden, gates)
                rows.append({"cell": cell, "batch": batch, "hidden": hidden, "row_major_us": row_major,
                             "transposed_us": transposed, "speedup": row_major / transposed, "chosen": chosen})
                print(f"{cell} N={batch:3d} H={hidden:3d}: row-major {row_major:6.1f} us, transposed {transposed:6.1f} us "
                      f"({row_major / transposed:.2f}x){'  <- chosen' if chosen else ''}", flush=True)
    out = {"backend": jax.default_backend(), "jax": jax.__version__, "machine": platform.processor() or platform.machine(),
           "cpus": jax.local_devices()[0].device_kind, "steps": STEPS, "rounds": ROUNDS, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"layout-{out['backend']}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"layout-{out['backend']}.md").write_text(markdown(out))


def markdown(out: dict) -> str:
    lines = [f"# Per-step recurrent product, row-major vs transposed carry ({out['backend']}, jax {out['jax']})", "",
             "Median us per step of a loop of dependent steps (product, tanh, carry fed back). "
             "`chosen`: the fused layers hold the carry transposed there on CPU (`transposed_carry_pays`). "
             "Command: `python benchmarks/layout.py`.", "",
             "| cell | N | H | row-major us | transposed us | speed-up | chosen |", "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['cell']} | {r['batch']} | {r['hidden']} | {r['row_major_us']:.1f} | {r['transposed_us']:.1f} "
                     f"| {r['speedup']:.2f}x | {'yes' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
