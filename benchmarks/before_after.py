"""The same speed run on two commits, taking turns on this machine: does a change keep the speed?

    python -m benchmarks.before_after 5c98f8c HEAD --rounds 2 -- --quick --configs seed large --cells lstm

Each commit is checked out in a temporary git worktree (the oneDNN extension built there, or copied
from this checkout's build when the C++ source is the same file), and ``benchmarks/speed.py`` runs in
it as that commit ran it (``python -m benchmarks.speed`` where the commit has the ``benchmarks``
package, ``python benchmarks/speed.py`` before), once per round, the commits alternating round by
round so that a slow spell of a shared machine hits both alike. Per row (config, cell,
implementation) the median ms per step over the rounds is compared; PyTorch's and Flax's rows,
whose code does not change between the commits, show how much the machine itself drifted.
Writes ``benchmarks/results/before-after-<cpu>.{json,md}`` (``--tag`` names them otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import machine

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("lstm_jax/kernels/csrc/onednn_lstm.cc", "lstm_jax/csrc/onednn_lstm.cc")


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _prepare(ref: str, where: Path) -> Path:
    """A worktree of ``ref`` with the oneDNN extension next to its source."""
    _git("worktree", "add", "--detach", str(where), ref)
    built = sorted(ROOT.glob("lstm_jax/**/_onednn_lstm*.so"))
    for source in SOURCES:
        if (where / source).is_file() and built:
            target = (where / source).parents[1]  # the extension sits in the package folder above csrc/
            if (where / source).read_bytes() == (ROOT / SOURCES[0]).read_bytes():
                shutil.copy2(built[0], target / built[0].name)
            else:
                subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=where, check=True,
                               capture_output=True)
    return where


def _run(tree: Path, speed_args: list[str]) -> dict:
    module = (tree / "benchmarks" / "__init__.py").is_file()
    cmd = [sys.executable, "-m", "benchmarks.speed"] if module else [sys.executable, "benchmarks/speed.py"]
    before = set((tree / "benchmarks" / "results").glob("speed-*.json"))
    for f in before:
        f.unlink()  # the commit's own committed results: not this run's
    subprocess.run([*cmd, *speed_args], cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)})
    (result,) = (tree / "benchmarks" / "results").glob("speed-*.json")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=2, help="runs per commit, the commits taking turns")
    p.add_argument("--tag", default=None, help="the result files' stem (default: before-after-<cpu>)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    speed_args = argv[cut + 1:]  # after --: the arguments of benchmarks.speed
    refs = {"before": _git("rev-parse", "--short", args.before), "after": _git("rev-parse", "--short", args.after)}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {k: _prepare(ref, Path(tmp) / k) for k, ref in refs.items()}
        try:
            for r in range(args.rounds):
                for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    print(f"round {r + 1}: {k} ({refs[k]})", flush=True)
                    runs[k].append(_run(trees[k], speed_args))
        finally:
            for tree in trees.values():
                _git("worktree", "remove", "--force", str(tree))
    rows = []
    for row in runs["after"][0]["rows"]:
        if "error" in row:
            continue
        key = (row["config"], row["cell"], row["impl"])
        ms = {k: [x["ms_per_step"] for run in v for x in run["rows"]
                  if "error" not in x and (x["config"], x["cell"], x["impl"]) == key] for k, v in runs.items()}
        if ms["before"] and ms["after"]:
            before, after = statistics.median(ms["before"]), statistics.median(ms["after"])
            rows.append(dict(config=key[0], cell=key[1], impl=key[2], before_ms=before, after_ms=after,
                             ratio=after / before, before_runs=ms["before"], after_runs=ms["after"]))
    info = machine.describe()
    out = dict(machine=info, refs=refs, rounds=args.rounds, speed_args=speed_args, rows=rows,
               command="python -m benchmarks.before_after " + " ".join(sys.argv[1:]))
    machine.write_results(args.tag or f"before-after-{machine.cpu_tag()}", out, markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    lines = [f"# The same speed run on two commits ({machine.describe_line(out['machine'])})", "",
             f"Command: `{out['command']}`. `before` is {out['refs']['before']}, `after` {out['refs']['after']}; "
             f"{out['rounds']} runs each, the commits taking turns; the median ms per step of the runs. "
             "PyTorch's and Flax's rows run the same code in both and show the machine's own drift.", "",
             "| config | cell | implementation | before ms | after ms | after / before | runs before | runs after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        runs = lambda v: " ".join(f"{x:.1f}" for x in v)
        lines.append(f"| {r['config']} | {r['cell']} | {r['impl']} | {r['before_ms']:.1f} | {r['after_ms']:.1f} | "
                     f"{r['ratio']:.2f} | {runs(r['before_runs'])} | {runs(r['after_runs'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
