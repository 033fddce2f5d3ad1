"""Per-step recurrent product: row-major carry ``h @ W_h`` against the transposed carry ``h.T``.

The fused LSTM and GRU layers hold their carry transposed in the forward loop on CPU where
``lstm_jax.dispatch`` measured that layout at least ``MARGIN`` faster on this machine (XLA sends
the row-major product to YNNPACK and the transposed contraction to its Eigen kernels; which wins
depends on the CPU and the shape). This script runs the same measurement,
``dispatch.measure.layouts`` (a loop of dependent steps, as in the layer: product, activation,
carry fed back), over a grid of shapes, so the machines can be compared.

    python -m benchmarks.layout      # under a minute on 2 cores

Writes benchmarks/results/layout-<backend>[-<cpu>].{json,md}.
"""

from __future__ import annotations

import jax

from benchmarks import machine
from lstm_jax.dispatch import measure, plan


def main():
    rows = []
    for gates, cell in ((4, "lstm"), (3, "gru")):
        for batch in (32, 64, 128, 256):
            for hidden in (64, 128, 192, 256):
                row_major, transposed = (
                    1e6 * t for t in measure.layouts(batch, hidden, gates, None, plan.LAYOUT_LOOP_STEPS, plan.ROUNDS))
                chosen = row_major >= measure.MARGIN * transposed
                rows.append({"cell": cell, "batch": batch, "hidden": hidden, "row_major_us": row_major,
                             "transposed_us": transposed, "speedup": row_major / transposed, "chosen": chosen})
                print(f"{cell} N={batch:3d} H={hidden:3d}: "
                      f"row-major {row_major:6.1f} us, transposed {transposed:6.1f} us "
                      f"({row_major / transposed:.2f}x){'  <- chosen' if chosen else ''}", flush=True)
    out = {"backend": jax.default_backend(), "jax": jax.__version__, "machine": machine.describe(),
           "steps": plan.LAYOUT_LOOP_STEPS, "rounds": plan.ROUNDS, "margin": measure.MARGIN, "rows": rows}
    name = f"layout-{out['backend']}" + (f"-{machine.cpu_tag()}" if out["backend"] == "cpu" else "")
    machine.write_results(name, out, markdown(out))


def markdown(out: dict) -> str:
    lines = [f"# Per-step recurrent product, row-major vs transposed carry ({machine.describe_line(out['machine'])})",
             "",
             "Median us per step of a loop of dependent steps (product, tanh, carry fed back), the layouts taking "
             f"turns. `chosen`: the transposed layout was at least {out.get('margin', 1.1)}x faster, so "
             "`lstm_jax.dispatch` "
             "would hold the carry transposed at that shape on this machine. Command: `python -m benchmarks.layout`.",
             "",
             "| cell | N | H | row-major us | transposed us | speed-up | chosen |", "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['cell']} | {r['batch']} | {r['hidden']} | {r['row_major_us']:.1f} "
                     f"| {r['transposed_us']:.1f} | {r['speedup']:.2f}x | {'yes' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
