"""What ``lstm_jax.runtime.tune_malloc`` (applied by ``import lstm_jax``) buys: train steps with the
C library's allocator defaults against the tuned settings, each in its own processes.

    python benchmarks/malloc.py                    # seed and large, 3 rounds
    python benchmarks/malloc.py --configs seed --rounds 2

Every round starts one process per setting (``LSTM_JAX_MALLOC=default`` or unset), the settings
taking turns. A process times, taking turns step by step group: a plain user-written ``jax.jit``
train step around ``CharLM.apply`` (one step per call, the library user's path), lstm_jax's
``Trainer`` (10 steps per call) and PyTorch's ``nn.LSTM`` step (the same process, so it runs under
the same allocator settings). Reported: median ms per step, minor page faults per step (getrusage,
over all three) and peak resident memory. Writes ``benchmarks/results/malloc-<cpu>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402

SETTINGS = {"glibc defaults (LSTM_JAX_MALLOC=default)": "default", "tuned (import lstm_jax)": ""}


def child(config: str, rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    import lstm_jax  # noqa: F401  (applies the setting under test)
    import speed

    b, t, h, layers = speed.CONFIGS[config]
    cases = {"jax.jit user step (1 step/call)": speed.case_lstm_jax("lstm", b, t, h, layers, "auto"),
             "lstm_jax Trainer (10 steps/call)": speed.case_lstm_jax_trainer("lstm", b, t, h, layers),
             "torch nn.LSTM": speed.case_torch("lstm", b, t, h, layers)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = speed.measure(cases, rounds, 10)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (rounds * 10 * len(cases))
    print(json.dumps({"ms": {k: v * 1e3 for k, v in times.items()}, "faults_per_step": faults,
                      "tuned": lstm_jax.runtime.malloc_tuned(),
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["seed", "large"])
    ap.add_argument("--rounds", type=int, default=3, help="processes per setting, taking turns")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, 3)
    import statistics

    info = machine.describe()
    out = {"machine": info, "command": "python benchmarks/malloc.py " + " ".join(sys.argv[1:]), "results": {}}
    for config in args.configs:
        runs = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, value in SETTINGS.items():
                env = {k: v for k, v in os.environ.items() if k != "LSTM_JAX_MALLOC"}
                if value:
                    env["LSTM_JAX_MALLOC"] = value
                proc = subprocess.run([sys.executable, __file__, "--child", config], env=env, capture_output=True,
                                      text=True, check=True)
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(config, name, runs[name][-1], flush=True)
        out["results"][config] = {
            name: {"ms": {k: statistics.median(r["ms"][k] for r in rs) for k in rs[0]["ms"]},
                   "faults_per_step": statistics.median(r["faults_per_step"] for r in rs),
                   "max_rss_mb": max(r["max_rss_mb"] for r in rs), "tuned": rs[0]["tuned"], "runs": rs}
            for name, rs in runs.items()}
    tag = f"malloc-{machine.cpu_tag()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / f"{tag}.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    lines = [f"# Allocator settings and train-step time ({machine.describe_line(out['machine'])})", "",
             f"Command: `{out['command']}`. Median over processes (each: median of 3 rounds of 10 steps); "
             "ratios are default / tuned time, so above 1 means the tuned setting is faster.", "",
             "| config | step | glibc defaults ms | tuned ms | default / tuned |", "|---|---|---|---|---|"]
    for config, res in out["results"].items():
        default, tuned = res.values()
        for k in default["ms"]:
            lines.append(f"| {config} | {k} | {default['ms'][k]:.1f} | {tuned['ms'][k]:.1f} | "
                         f"{default['ms'][k] / tuned['ms'][k]:.2f}x |")
        lines.append(f"| {config} | minor page faults per step (all three) | {default['faults_per_step']:,.0f} | "
                     f"{tuned['faults_per_step']:,.0f} | |")
        lines.append(f"| {config} | peak resident memory, MB | {default['max_rss_mb']:,.0f} | "
                     f"{tuned['max_rss_mb']:,.0f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
