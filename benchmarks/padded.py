"""Padded batches on the fast path, and each LSTM option against the plain LSTM of the same size.

One training step (forward and backward, jitted: the gradient of a sum over the outputs with
respect to the params) of one LSTM layer at B=64 sequences, T=100 steps, H=256 units, 128 input
features, the variants taking turns in one process (``dispatch.measure.median_seconds``), so the
ratios are side by side on the same machine:

* ``fused`` and ``scan`` with ``seq_lengths`` drawn uniformly in ``[1, T]`` (seed 0), against the
  fused layer without lengths (the same padded shape, every sequence full);
* each option of ``LSTMCell``/``scan_cell`` on the fused layer: ``proj_size``, ``recurrent_dropout``
  (with a dropout key: the training step) and input ``dropout``.

    python -m benchmarks.padded --rounds 15     # about 10 minutes on 2 shared cores

Writes benchmarks/results/padded-<backend>[-<cpu>].{json,md}; ``benchmarks/report.py`` makes the
docs' table from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from lstm_jax import LSTMCell, scan_cell
from lstm_jax.dispatch import measure

BATCH, STEPS, HIDDEN, FEATURES = 64, 100, 256, 128


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    impl: str
    lengths: bool = False
    cell_options: tuple = ()
    layer_options: tuple = ()


def variants() -> list[Variant]:
    """The rows, the reference first (every ratio is against it)."""
    return [
        Variant("plain LSTM, fused, no lengths", "fused"),
        Variant("seq_lengths, fused", "fused", lengths=True),
        Variant("seq_lengths, scan", "scan", lengths=True),
    ] + option_variants()


def option_variants() -> list[Variant]:
    drop = ("dropout_key", 1)  # a training step: the masks are drawn
    return [
        Variant("plain LSTM, scan, no lengths", "scan"),
        Variant(f"proj_size={HIDDEN // 2}, fused", "fused", cell_options=(("proj_size", HIDDEN // 2),)),
        Variant("recurrent_dropout=0.25, fused", "fused", layer_options=(("recurrent_dropout", 0.25), drop)),
        Variant("dropout=0.25 (inputs), fused", "fused", layer_options=(("dropout", 0.25), drop)),
        Variant("seq_lengths + recurrent_dropout=0.25, fused", "fused", lengths=True,
                layer_options=(("recurrent_dropout", 0.25), drop)),
    ]


def train_step(v: Variant, x: jax.Array, lengths: jax.Array):
    cell = LSTMCell(HIDDEN, **dict(v.cell_options))
    params = cell.init(jax.random.key(0), FEATURES)
    options: dict[str, Any] = dict(v.layer_options)
    if "dropout_key" in options:
        options["dropout_key"] = jax.random.key(options["dropout_key"])

    def loss(p):
        _, ys = scan_cell(cell, p, x, seq_lengths=lengths if v.lengths else None, impl=v.impl, **options)
        return jnp.sum(ys)

    step = jax.jit(jax.grad(loss))
    return lambda: step(params)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="turns per variant (the median is reported) [7]")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, STEPS, FEATURES)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, STEPS + 1, BATCH), jnp.int32)
    runs = {v.name: train_step(v, x, lengths) for v in variants()}
    for run in runs.values():
        jax.block_until_ready(run())  # compile (and any layout measurement of the dispatch)
    seconds = measure.median_seconds(runs, args.rounds)
    base = seconds[variants()[0].name]
    rows = [{"variant": v.name, "impl": v.impl, "seq_lengths": v.lengths, "cell_options": dict(v.cell_options),
             "layer_options": {k: val for k, val in v.layer_options if k != "dropout_key"},
             "ms": 1e3 * seconds[v.name], "vs_plain": seconds[v.name] / base} for v in variants()]
    for r in rows:
        print(f"{r['variant']:40s} {r['ms']:8.1f} ms  {r['vs_plain']:.2f}x", flush=True)
    out = {"backend": jax.default_backend(), "jax": jax.__version__, "machine": machine.describe(),
           "shape": {"batch": BATCH, "steps": STEPS, "hidden": HIDDEN, "features": FEATURES},
           "mean_length": float(np.mean(np.asarray(lengths))), "rounds": args.rounds,
           "command": " ".join(["python -m benchmarks.padded", *(sys.argv[1:] if argv is None else argv)]),
           "rows": rows}
    name = f"padded-{out['backend']}" + (f"-{machine.cpu_tag()}" if out["backend"] == "cpu" else "")
    machine.write_results(name, out, markdown(out))


def markdown(out: dict) -> str:
    s = out["shape"]
    lines = [f"# Padded batches and LSTM options, training step ({machine.describe_line(out['machine'])})", "",
             f"One LSTM layer, B={s['batch']}, T={s['steps']}, H={s['hidden']}, {s['features']} input features; "
             f"jitted gradient of a sum over the outputs. Lengths uniform in [1, T] (mean "
             f"{out['mean_length']:.1f}). Median of {out['rounds']} turns, the variants taking turns in one "
             f"process; ratios against the first row. Command: `{out['command']}`.", "",
             table(out)]
    return "\n".join(lines) + "\n"


def table(out: dict) -> str:
    lines = ["| variant | ms per step | vs plain fused LSTM |", "|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['variant']} | {r['ms']:.1f} | {r['vs_plain']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
