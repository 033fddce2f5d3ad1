"""Does a change alter what the machine runs? The compiled train step of two commits, compared.

    python -m benchmarks.same_program d134be1 HEAD --cells lstm gru rnn --impls scan fused onednn

A speed run on two commits (``benchmarks/before_after.py``) answers "is it as fast?" with timings,
and on a shared 2-core machine the same program's timings drift by 5-10% from run to run. This
asks the question underneath, without a clock: for each cell, layer route (``impl``), dtype, size
and device count it builds the char model's ``Trainer`` in each commit's git worktree (a child
process importing that commit's ``lstm_jax``), compiles one chunk of train steps, and compares
XLA's optimised programs, instruction by instruction, after dropping what names them (source
locations, metadata, the numeric suffixes of instruction names). Equal programs run at equal speed
on the same machine; a difference is listed with its first lines, to read or to time.

The commits share one cache folder (``LSTM_JAX_CACHE_DIR``): the carry layout the dispatch
measures for a shape is measured once, by the first commit, and read by the second, so a layout
chosen differently by two noisy measurements is not reported as a change of code.

Writes ``benchmarks/results/same-program-<cpu>.{json,md}`` (``--tag`` names them otherwise).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"seed": (128, 40, 128, 1), "default": (64, 100, 256, 2),  # batch, time, hidden, layers (speed.py's)
         "tiny": (4, 8, 16, 2)}  # the tests'

V, E, CHUNK = 92, 64, 10


def child(cases: list[dict]) -> None:
    """In a commit's worktree (``PYTHONPATH``): print each case's optimised program as JSON lines."""
    import numpy as np

    from lstm_jax import parallel
    from lstm_jax.charlm.model import CharLM, CharLMConfig
    from lstm_jax.charlm.training import TrainConfig, Trainer

    for case in cases:
        b, t, h, layers = SIZES[case["size"]]
        try:
            model = CharLM(CharLMConfig(V, cell=case["cell"], hidden_size=h, num_layers=layers, embed_size=E,
                                        dtype=case["dtype"]))
            ids = np.random.default_rng(0).integers(0, V, b * (t * CHUNK * 8 + 2)).astype(np.int32)
            trainer = Trainer(model, TrainConfig(batch_size=b, seq_len=t, chunk_steps=CHUNK, learning_rate=1e-3,
                                                 lr_schedule="constant", clip_norm=0.0), ids, epochs=10**6,
                              mesh=parallel.data_mesh(case["devices"]), impl=case["impl"])
            state = trainer.init_state()
            if hasattr(trainer, "lower"):
                lowered = trainer.lower(state, CHUNK)
            else:  # commits before Trainer.lower: its jitted chunk as they called it
                lowered = trainer._chunk.lower(state, trainer.data, num_steps=CHUNK)
            print(json.dumps({**case, "hlo": lowered.compile().as_text()}), flush=True)
        except Exception as e:  # noqa: BLE001 - a case this commit cannot build is reported, not fatal
            print(json.dumps({**case, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}), flush=True)


def normalise(hlo: str) -> list[str]:
    """The program's instructions without what only names them: metadata (source lines, op names),
    stack frame ids, and the numeric suffixes XLA gives instruction and computation names."""
    lines = []
    for line in hlo.splitlines():
        stripped = line.strip()
        if " = " not in line and not stripped.startswith(("ENTRY", "%", "ROOT", "}")):
            continue  # the module header and the file/function tables
        line = re.sub(r",?\s*metadata=\{[^}]*\}", "", line)
        line = re.sub(r",?\s*stack_frame_id=\d+", "", line)
        lines.append(re.sub(r"\.\d+\b", "", line).rstrip())
    return lines


def programs(tree: Path, cases: list[dict], cache: Path, devices: int) -> dict[tuple, dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "LSTM_JAX_CACHE_DIR": str(cache),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    # This file's child() run by path: the child imports only the worktree's lstm_jax (PYTHONPATH)
    code = f"import json, runpy, sys; runpy.run_path({str(Path(__file__))!r})['child'](json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], cwd=tempfile.gettempdir(), env=env,
                          capture_output=True, text=True)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[key(row)] = row
    if proc.returncode != 0 and not out:
        raise SystemExit(f"the child in {tree} failed:\n{proc.stderr[-2000:]}")
    return out


def key(case: dict) -> tuple:
    return case["cell"], case["impl"], case["dtype"], case["size"], case["devices"]


def compare(before: dict, after: dict) -> dict:
    row = {k: after.get(k, before.get(k)) for k in ("cell", "impl", "dtype", "size", "devices")}
    if "error" in before or "error" in after:
        return {**row, "same": None, "error": before.get("error") or after.get("error")}
    a, b = normalise(before["hlo"]), normalise(after["hlo"])
    diff = [d for d in difflib.unified_diff(a, b, lineterm="", n=0) if not d.startswith(("---", "+++", "@@"))]
    return {**row, "same": not diff, "instructions": [len(a), len(b)], "changed_lines": len(diff),
            "first_changes": [d[:200] for d in diff[:12]]}


def main() -> None:
    from benchmarks import machine
    from benchmarks.before_after import _git, _prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    p.add_argument("--impls", nargs="+", default=["scan", "fused", "onednn", "auto"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--sizes", nargs="+", default=["seed", "default"], choices=list(SIZES))
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tag", default=None, help="the result files' stem (default: same-program-<cpu>)")
    args = p.parse_args()
    refs = {"before": _git("rev-parse", "--short", args.before), "after": _git("rev-parse", "--short", args.after)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {k: _prepare(ref, Path(tmp) / k) for k, ref in refs.items()}
        cache = Path(tmp) / "cache"
        try:
            for devices in args.devices:
                cases = [dict(cell=c, impl=i, dtype=d, size=s, devices=devices) for c in args.cells
                         for i in args.impls for d in args.dtypes for s in args.sizes]
                got = {k: programs(tree, cases, cache, devices) for k, tree in trees.items()}
                for case in cases:
                    if key(case) in got["before"] and key(case) in got["after"]:
                        rows.append(compare(got["before"][key(case)], got["after"][key(case)]))
                        print(json.dumps({k: v for k, v in rows[-1].items() if k != "first_changes"}), flush=True)
        finally:
            for tree in trees.values():
                _git("worktree", "remove", "--force", str(tree))
    out = dict(machine=machine.describe(), refs=refs, rows=rows,
               command="python -m benchmarks.same_program " + " ".join(sys.argv[1:]))
    machine.write_results(args.tag or f"same-program-{machine.cpu_tag()}", out, markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    from benchmarks import machine

    rows = out["rows"]
    same = sum(r["same"] is True for r in rows)
    lines = [f"# The compiled train step on two commits ({machine.describe_line(out['machine'])})", "",
             f"Command: `{out['command']}`. `before` is {out['refs']['before']}, `after` {out['refs']['after']}. "
             f"{same} of {len(rows)} programs are the same instruction for instruction (names and source "
             "locations aside); a case either commit cannot build says why.", "",
             "| cell | impl | dtype | size | devices | same program | instructions (before, after) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "error" if r["same"] is None else "yes" if r["same"] else f"no ({r['changed_lines']} lines)"
        count = ", ".join(map(str, r.get("instructions", []))) or "-"
        note = r.get("error", "") or ("; ".join(r.get("first_changes", [])[:2]) if r["same"] is False else "")
        note = note.replace("|", "\\|")[:240]
        lines.append(f"| {r['cell']} | {r['impl']} | {r['dtype']} | {r['size']} | {r['devices']} | {verdict} | "
                     f"{count} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
