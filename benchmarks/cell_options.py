"""Step time of the LSTM options (peepholes, layer norm) against the plain LSTM of the same size.

    python -m benchmarks.cell_options            # B=32 and 64, T=50, H=128 and 256
    python -m benchmarks.cell_options --quick    # the small size only, fewer rounds

One train step of one LSTM layer over a sequence: ``scan_cell`` forward, a scalar loss, the
gradient of every parameter and of the inputs (``jax.value_and_grad``, jitted). Four cases of the
same size take turns round by round (``speed.measure``, so a slow spell of a shared machine hits
them alike): the plain LSTM on the fused kernel (``impl='fused'``) and on the autodiff scan
(``impl='scan'``), and ``LSTMCell(peepholes=True)`` and ``LSTMCell(layer_norm=True)``, which run the
scan only. The dispatch is ``fixed`` (row-major carry, nothing timed) so that only the cells differ.
Writes ``benchmarks/results/cell-options-<cpu>.{json,md}``, the CPU named in the file.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("LSTM_JAX_DISPATCH", "fixed")  # before lstm_jax reads it: no layout timing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import machine  # noqa: E402
from benchmarks.speed import Case, measure  # noqa: E402
from lstm_jax import LSTMCell, scan_cell  # noqa: E402

FEATURES = 64
SIZES = {"small": (32, 50, 128), "medium": (64, 50, 256)}  # name: (batch, time, hidden)
CASES = {  # name: (cell options, impl)
    "plain, fused": ({}, "fused"),
    "plain, scan": ({}, "scan"),
    "peepholes, scan": ({"peepholes": True}, "scan"),
    "layer_norm, scan": ({"layer_norm": True}, "scan"),
}


def case(options: dict, impl: str, b: int, t: int, h: int) -> Case:
    """A jitted train step (loss and all gradients) of one layer, compiled and warmed up."""
    import time

    cell = LSTMCell(h, **options)
    params = cell.init(jax.random.key(0), FEATURES)
    x = jax.random.normal(jax.random.key(1), (b, t, FEATURES))

    def loss(p, xs):
        return jnp.mean(scan_cell(cell, p, xs, impl=impl)[1] ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = step(params, x)
        jax.block_until_ready(out)

    t0 = time.perf_counter()
    run(1)
    compile_s = time.perf_counter() - t0
    run(1)
    return Case(run, compile_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small size only, 3 rounds of 3 steps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--note", default="", help="words on the machine the CPU model string lacks, e.g. its core type")
    args = ap.parse_args()
    rounds, steps = (3, 3) if args.quick else (args.rounds, args.steps)
    rows = []
    for size, (b, t, h) in SIZES.items():
        if args.quick and size != "small":
            continue
        cases = {name: case(opts, impl, b, t, h) for name, (opts, impl) in CASES.items()}
        seconds = measure(cases, rounds, steps)
        for name, s in seconds.items():
            rows.append(dict(size=size, batch=b, time=t, hidden=h, features=FEATURES, case=name,
                             step_ms=1e3 * s, compile_s=cases[name].compile_s,
                             vs_plain_fused=s / seconds["plain, fused"], vs_plain_scan=s / seconds["plain, scan"]))
        print(f"{size}: " + ", ".join(f"{n} {1e3 * s:.2f} ms" for n, s in seconds.items()), flush=True)
    out = {"machine": machine.describe(), "note": args.note, "rounds": rounds, "steps": steps, "dispatch": "fixed",
           "rows": rows}
    stem = f"cell-options-{machine.cpu_tag()}"
    machine.write_results(stem, out, markdown(out))
    print(f"wrote {machine.RESULTS / stem}.{{json,md}}")


def markdown(out: dict) -> str:
    lines = [f"# LSTM options against the plain LSTM: {machine.describe_line(out['machine'])}", "",
             *([f"Machine: {out['note']}.", ""] if out.get("note") else []),
             "One train step (loss and every gradient) of one LSTM layer over a sequence, "
             f"{FEATURES} input features; median of {out['rounds']} rounds of {out['steps']} steps, the four "
             "cases of a size taking turns (`python -m benchmarks.cell_options`). The peephole and "
             "layer-norm cells run the autodiff scan only. Timings on a shared machine are noisy; the "
             "ratios come from the same rounds.", "",
             "| size (B, T, H) | case | step (ms) | vs plain fused | vs plain scan | compile (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(f"| {r['size']} ({r['batch']}, {r['time']}, {r['hidden']}) | {r['case']} | {r['step_ms']:.2f} | "
                     f"{r['vs_plain_fused']:.2f}x | {r['vs_plain_scan']:.2f}x | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
