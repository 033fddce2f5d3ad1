"""Training-step time of the cells since 2014 against the fused LSTM, and the parallel forms' memory.

    python -m benchmarks.modern_speed                              # T = 100, 1000, 10000
    python -m benchmarks.modern_speed --steps 100 --repeats 3       # a quick look

One layer, ``B`` sequences of ``T`` steps, ``H`` units and ``H`` input features: the time of one
jitted ``value_and_grad`` of ``sum(outputs**2)`` with respect to the params (forward and backward),
the median of ``--repeats`` calls after a warm-up (``--long-repeats`` at ``T >= 10000``). Rows: the
LSTM through the fused custom-VJP kernel (``impl='fused'``, the reference), minGRU and minLSTM by
the parallel scan and by the plain scan, the sLSTM (plain scan; it has no parallel form), the mLSTM
by its chunked parallel form (``impl='auto'``) and by the plain scan. All rows of one ``T`` are
timed in turns, round by round, so a slow spell of a shared machine hits them alike. At
``--memory-steps`` (10000) every row's compiled training step also reports
``compiled.memory_analysis()`` (temporaries, without running it); a row whose temporaries would
pass ``--max-temp-gib`` is reported but not run. Writes
``benchmarks/results/modern-speed-<cpu>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import machine
from lstm_jax import make_cell, scan_cell

ROWS = {  # name -> (cell kind, options, impl)
    "lstm fused": ("lstm", {}, "fused"),
    "mingru parallel": ("mingru", {}, "parallel"),
    "mingru scan": ("mingru", {}, "scan"),
    "minlstm parallel": ("minlstm", {}, "parallel"),
    "minlstm scan": ("minlstm", {}, "scan"),
    "slstm scan": ("slstm", {"num_heads": 4}, "scan"),
    "mlstm parallel (chunked)": ("mlstm", {"num_heads": 4}, "auto"),
    "mlstm scan": ("mlstm", {"num_heads": 4}, "scan"),
}


def training_step(kind: str, options: dict, impl: str, batch: int, steps: int, hidden: int):
    cell = make_cell(kind, hidden, **options)
    params = cell.init(jax.random.key(0), hidden)
    x = jax.random.normal(jax.random.key(1), (batch, steps, hidden))
    loss = lambda p, x: jnp.sum(scan_cell(cell, p, x, impl=impl)[1] ** 2)
    return jax.jit(jax.value_and_grad(loss)), (params, x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-repeats", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=10000)
    p.add_argument("--max-temp-gib", type=float, default=6.0)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    info = machine.describe()
    results = []
    for steps in args.steps:
        compiled, memory = {}, {}
        for name in args.rows:
            kind, options, impl = ROWS[name]
            fn, inputs = training_step(kind, options, impl, args.batch, steps, args.hidden)
            t0 = time.perf_counter()
            exe = fn.lower(*inputs).compile()
            compile_s = time.perf_counter() - t0
            m = exe.memory_analysis()
            memory[name] = dict(temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes),
                                output_bytes=int(m.output_size_in_bytes), compile_s=compile_s)
            if m.temp_size_in_bytes <= args.max_temp_gib * 2**30:
                jax.block_until_ready(exe(*inputs))  # warm-up
                compiled[name] = (exe, inputs)
        repeats = args.long_repeats if steps >= 10000 else args.repeats
        times = {name: [] for name in compiled}
        for _ in range(repeats):  # rows in turns
            for name, (exe, inputs) in compiled.items():
                t0 = time.perf_counter()
                jax.block_until_ready(exe(*inputs))
                times[name].append(time.perf_counter() - t0)
        for name in args.rows:
            row = dict(row=name, steps=steps, repeats=len(times.get(name, [])),
                       seconds=statistics.median(times[name]) if times.get(name) else None, **memory[name])
            results.append(row)
            secs = "not run" if row["seconds"] is None else f"{row['seconds'] * 1e3:9.1f} ms"
            print(f"T={steps:6d} {name:26s} {secs}  temp {row['temp_bytes'] / 2**20:9.1f} MiB", flush=True)
    out = dict(machine=info, cpu_tag=machine.cpu_tag(), hyper=dict(batch=args.batch, hidden=args.hidden,
               repeats=args.repeats, long_repeats=args.long_repeats, memory_steps=args.memory_steps,
               max_temp_gib=args.max_temp_gib), results=results)
    tag = args.tag or f"modern-speed-{machine.cpu_tag()}"
    machine.write_results(tag, out, f"# Modern cells, training step: {machine.describe_line(info)}\n\n"
                          + table(out, args.memory_steps) + "\n")


def table(out: dict, memory_steps: int = 10000) -> str:
    """Milliseconds per training step per row and T, the ratio to the fused LSTM at the same T, and
    the compiled step's temporaries at ``memory_steps``."""
    rows = list(dict.fromkeys(r["row"] for r in out["results"]))
    spans = sorted({r["steps"] for r in out["results"]})
    at = {(r["row"], r["steps"]): r for r in out["results"]}
    head = "| layer (B={batch}, H={hidden}) | ".format(**out["hyper"])
    head += " | ".join(f"T = {t:,} ms (x LSTM)" for t in spans) + f" | temporaries at T = {memory_steps:,} |"
    lines = [head, "|---|" + "---|" * (len(spans) + 1)]
    for name in rows:
        cells = []
        for t in spans:
            r, ref = at.get((name, t)), at.get(("lstm fused", t))
            if r is None or r["seconds"] is None:
                cells.append("not run")
                continue
            ratio = f" ({r['seconds'] / ref['seconds']:.2f})" if ref and ref["seconds"] else ""
            cells.append(f"{r['seconds'] * 1e3:,.1f}{ratio}")
        mem = at.get((name, memory_steps))
        cells.append(f"{mem['temp_bytes'] / 2**20:,.0f} MiB" if mem else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
