"""What ``lstm_jax.runtime.tune_malloc()`` buys: train steps with the
C library's allocator defaults against the tuned settings, each in its own processes; and two
more settings a user can choose, measured the same way.

    python -m benchmarks.malloc                    # seed and large, 3 rounds
    python -m benchmarks.malloc --configs large --rounds 2 --dtype bfloat16

Every round starts one process per setting, the settings taking turns: glibc's defaults
(``LSTM_JAX_MALLOC=default``), ``tune_malloc()``'s (``M_MMAP_MAX=0``, a 2 GiB trim threshold),
those plus a single malloc arena (``GLIBC_TUNABLES``; measured, not adopted) and those with JAX's
synchronous CPU dispatch (``jax.config.update("jax_cpu_enable_async_dispatch", False)``, which
JAX reads from no environment variable: a one-device program runs on the calling thread, so its
temporaries come from the main malloc arena; see docs/cpu-backends.md).

A process times, taking turns step by step group: a plain user-written ``jax.jit`` train step
around ``CharLM.apply`` (one step per call, the library user's path), lstm_jax's ``Trainer`` (10
steps per call) and PyTorch's ``nn.LSTM`` step. PyTorch runs in a child
process with the same environment, so under the same allocator settings: in one process its
OpenMP threads and the oneDNN layer's share libgomp and slow each other down (see the extension's
``Executor``). Reported: median ms per step, minor page faults per step of the two lstm_jax steps
(getrusage) and their process's peak resident memory. Writes
``benchmarks/results/malloc-<cpu>[-bf16].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from benchmarks import machine

ROOT = Path(__file__).resolve().parents[1]

SYNC = "LSTM_JAX_BENCH_SYNC_DISPATCH"  # read by the child, which sets JAX's flag
ONE_ARENA = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:glibc.malloc.arena_max=1"
REFERENCE = "tuned (runtime.tune_malloc)"  # the ratios' denominator
SETTINGS = {  # name: environment of the child process
    "glibc defaults": {"LSTM_JAX_MALLOC": "default"},
    REFERENCE: {},
    "tuned + one arena (GLIBC_TUNABLES)": {"LSTM_JAX_MALLOC": "default", "GLIBC_TUNABLES": ONE_ARENA},
    "tuned + synchronous dispatch": {SYNC: "1"},
}


def child(config: str, rounds: int, dtype: str) -> None:
    import jax

    import lstm_jax

    lstm_jax.runtime.tune_malloc()  # the setting under test (a no-op with LSTM_JAX_MALLOC=default)
    from benchmarks import speed

    if os.environ.get(SYNC) == "1":
        jax.config.update("jax_cpu_enable_async_dispatch", False)  # before the CPU client exists

    b, t, h, layers = speed.CONFIGS[config]
    bf16 = dtype == "bfloat16"
    cases = {"jax.jit user step (1 step/call)": speed.case_lstm_jax("lstm", b, t, h, layers, "auto", dtype),
             "lstm_jax Trainer (10 steps/call)": speed.case_lstm_jax_trainer("lstm", b, t, h, layers, dtype=dtype),
             "torch nn.LSTM" + (" bf16 autocast" if bf16 else ""): speed.in_own_process(
                 "case_torch", "lstm", b, t, h, layers, autocast_bf16=bf16)}
    in_process = len(cases) - 1  # PyTorch's steps fault in its own process
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = speed.measure(cases, rounds, 10)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (rounds * 10 * in_process)
    print(json.dumps({"ms": {k: v * 1e3 for k, v in times.items()}, "faults_per_step": faults,
                      "tuned": lstm_jax.runtime.malloc_tuned(),
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["seed", "large"])
    ap.add_argument("--rounds", type=int, default=3, help="processes per setting, taking turns")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, 3, args.dtype)
    import statistics

    info = machine.describe()
    out = {"machine": info, "command": "python -m benchmarks.malloc " + " ".join(sys.argv[1:]), "results": {}}
    for config in args.configs:
        runs = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, setting in SETTINGS.items():
                env = {k: v for k, v in os.environ.items()
                       if k not in ("LSTM_JAX_MALLOC", "GLIBC_TUNABLES", SYNC)}
                proc = subprocess.run([sys.executable, "-m", "benchmarks.malloc", "--child", config,
                                       "--dtype", args.dtype],
                                      env=env | setting, cwd=ROOT, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(config, name, runs[name][-1], flush=True)
        out["results"][config] = {
            name: {"ms": {k: statistics.median(r["ms"][k] for r in rs) for k in rs[0]["ms"]},
                   "faults_per_step": statistics.median(r["faults_per_step"] for r in rs),
                   "max_rss_mb": max(r["max_rss_mb"] for r in rs), "tuned": rs[0]["tuned"], "runs": rs}
            for name, rs in runs.items()}
    tag = f"malloc-{machine.cpu_tag()}" + ("-bf16" if args.dtype == "bfloat16" else "")
    machine.write_results(tag, out, markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    names = list(next(iter(out["results"].values())))
    # the tuned setting's name changed with the code ("tuned (import lstm_jax)" in older results)
    ref = next(n for n in names if n == REFERENCE or n.startswith("tuned ("))
    others = [n for n in names if n != ref]
    lines = [f"# Allocator settings and train-step time ({machine.describe_line(out['machine'])})", "",
             f"Command: `{out['command']}`. Median over processes (each: median of 3 rounds of 10 steps); "
             f"ratios are a setting's time / the time of '{ref}', so above 1 means '{ref}' is faster.",
             "", "| config | step | " + " | ".join(f"{n} ms" for n in names) + " | " +
             " | ".join(f"{n} / tuned" for n in others) + " |", "|---|---|" + "---|" * (len(names) + len(others))]
    for config, res in out["results"].items():
        for k in res[ref]["ms"]:
            lines.append(f"| {config} | {k} | " + " | ".join(f"{res[n]['ms'][k]:.1f}" for n in names) + " | " +
                         " | ".join(f"{res[n]['ms'][k] / res[ref]['ms'][k]:.2f}x" for n in others) + " |")
        lines.append(f"| {config} | minor page faults per lstm_jax step | " +
                     " | ".join(f"{res[n]['faults_per_step']:,.0f}" for n in names) + " |" + " |" * len(others))
        lines.append(f"| {config} | peak resident memory (lstm_jax's process), MB | " +
                     " | ".join(f"{res[n]['max_rss_mb']:,.0f}" for n in names) + " |" + " |" * len(others))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
