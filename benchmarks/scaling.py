"""Data-parallel scaling of the Trainer: per-step time on 1, 2, 4, ... devices, same global batch.

    python -m benchmarks.scaling                      # CPU: 1, 2, 4 forced host devices
    python -m benchmarks.scaling --devices 1 2 4 8    # a GPU server or TPU host: its real devices

Each device count runs in its own subprocess (on CPU ``XLA_FLAGS=--xla_force_host_platform_
device_count=N`` must be set before JAX starts), the counts taking turns over ``--rounds`` so a
slow spell of a shared machine hits all alike. A subprocess builds the real ``Trainer`` at the
``--config`` size (train.py's default: B=64, T=100, 2x256 LSTM, embedding 64), times chunks of
``--chunk`` steps after a warm-up, and reads the bytes all-reduced per step from the compiled
program (the all-reduce ops of the scanned step). Forced host devices share the same cores, so on
CPU the numbers are the cost of sharding where no compute is added; on real devices the script
reports scaling efficiency, ``t(1) / (N * t(N))`` at a fixed global batch.
Writes ``benchmarks/results/scaling-<backend>[-<cpu>]-<config>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"seed": (128, 40, 128, 1), "default": (64, 100, 256, 2), "large": (64, 100, 512, 2)}
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def allreduce_bytes(hlo: str) -> int:
    """Bytes of the results of every all-reduce in the compiled program (inside the scanned
    step: once per step)."""
    total = 0
    for line in hlo.splitlines():
        if not re.search(r"\ball-reduce(-start)?\(", line):
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            total += size * BYTES.get(dtype, 4)
    return total


def child(args) -> None:
    import jax
    import numpy as np

    from lstm_jax import CharLM, CharLMConfig, TrainConfig, Trainer, parallel, runtime

    runtime.tune_malloc()

    b, t, h, layers = CONFIGS[args.config]
    ids = np.random.default_rng(0).integers(0, 92, b * t * (args.chunk * 4 + 2), dtype=np.int32)
    mesh = parallel.data_mesh(args.child)
    model = CharLM(CharLMConfig(92, cell=args.cell, hidden_size=h, num_layers=layers, embed_size=64))
    trainer = Trainer(model, TrainConfig(batch_size=b, seq_len=t, chunk_steps=args.chunk), ids, mesh=mesh)
    state = trainer.init_state()
    hlo = trainer.lower(state, args.chunk).compile().as_text()
    for _ in range(2):  # compile and warm up
        state, _ = trainer.run_chunk(state, args.chunk)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, _ = trainer.run_chunk(state, args.chunk)
        times.append((time.perf_counter() - t0) / args.chunk)
    print(json.dumps(dict(devices=mesh.size, step_s=times, allreduce_bytes=allreduce_bytes(hlo),
                          param_bytes=sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(state.params)),
                          device_kind=jax.devices()[0].device_kind)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--cell", default="lstm")
    p.add_argument("--chunk", type=int, default=5, help="train steps per timed dispatch")
    p.add_argument("--repeats", type=int, default=4, help="timed chunks per subprocess")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per device count, taking turns")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from benchmarks import machine

    info = machine.describe()
    on_cpu = info["backend"] == "cpu"
    runs: dict[int, list] = {n: [] for n in args.devices}
    for r in range(args.rounds):
        order = args.devices if r % 2 == 0 else args.devices[::-1]
        for n in order:
            env = dict(os.environ)
            if on_cpu:
                env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                                    f"--xla_force_host_platform_device_count={max(args.devices)}")
            cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", str(n), "--config", args.config, "--cell",
                   args.cell, "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            runs[n].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}: {n} device(s): {min(runs[n][-1]['step_s']) * 1e3:.1f} ms/step", flush=True)
    import numpy as np

    rows = []
    for n in args.devices:
        step = float(np.median([s for run in runs[n] for s in run["step_s"]]))
        rows.append(dict(devices=n, step_ms=step * 1e3, allreduce_bytes_per_step=runs[n][0]["allreduce_bytes"],
                         param_bytes=runs[n][0]["param_bytes"]))
    base = rows[0]["step_ms"]
    for row in rows:
        row["vs_1_device"] = row["step_ms"] / base
        row["scaling_efficiency"] = base / (row["devices"] * row["step_ms"])
    b, t, h, layers = CONFIGS[args.config]
    out = dict(machine=info, config=dict(name=args.config, cell=args.cell, batch=b, seq_len=t, hidden=h,
                                         layers=layers, chunk=args.chunk, rounds=args.rounds, repeats=args.repeats),
               forced_host_devices=on_cpu, rows=rows)
    tag = f"scaling-{info['backend']}" + (f"-{machine.cpu_tag()}" if on_cpu else "") + f"-{args.config}"
    machine.write_results(tag, out, markdown(out) + "\n")
    print(markdown(out))


def markdown(out: dict) -> str:
    from benchmarks import machine

    c = out["config"]
    lines = [f"# Data-parallel scaling, `{c['name']}` {c['cell'].upper()} (B={c['batch']} T={c['seq_len']} "
             f"H={c['hidden']} L={c['layers']}, global batch fixed)", "",
             f"Machine: {machine.describe_line(out['machine'])}.", ""]
    if out["forced_host_devices"]:
        lines += ["Forced host devices (`--xla_force_host_platform_device_count`) share this machine's cores: "
                  "the extra devices add no compute, so the column `vs 1 device` is the cost of sharding "
                  "(partitioned program, all-reduce); scaling efficiency is not meaningful here.", ""]
    lines += ["| devices | ms / step | vs 1 device | scaling efficiency | bytes all-reduced / step | param bytes |",
              "|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['devices']} | {r['step_ms']:.1f} | {r['vs_1_device']:.3f}x | {r['scaling_efficiency']:.2f} "
                     f"| {r['allreduce_bytes_per_step']:,} | {r['param_bytes']:,} |")
    lines += ["", f"Median of {c['rounds']} subprocesses x {c['repeats']} chunks of {c['chunk']} steps per device "
              "count, taking turns. Reproduce: `python -m benchmarks.scaling`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
