"""The docs' and the README's tables of measured results, generated from the committed result files.

    python -m benchmarks.report            # check: lists the generated blocks that are out of date
    python -m benchmarks.report --write    # rewrite them in README.md and docs/*.md

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` in a
Markdown file; ``NAME`` is a key of ``TABLES``, with the result file's stem after a colon where the
table reads one file (``speed-summary:speed-cpu-intel-avx512-amx``). The tables read only
``benchmarks/results/*.json`` and ``experiments/results/*.json``, so after a benchmark rerun
``--write`` brings the pages up to date and ``tests/test_docs.py`` fails until it has. Links in
the tables are relative to ``docs/`` (they appear on the top-level docs pages only).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "results"
EXPER = ROOT / "experiments" / "results"
# a block ends at the first end marker, and never spans another block's start
BLOCK = re.compile(r"(<!-- generated: (\S+) -->\n)((?:(?!<!-- generated:).)*?)(<!-- end generated -->)", re.S)
FLOOR = 1e-44  # gradient_flow.json stores a norm below float32's smallest value as 1e-45
# Runs from before result files recorded the CPU in full (their JSON has ``platform.machine()``
# only): the CPU as the heading of their .md, or for the first quality runs the README of the time,
# names it.
OLD_RUNS = dict.fromkeys(["quality", "quality-bf16", "speed-cpu-amd-avx2", "layout-cpu-amd-avx2"],
                         "AMD EPYC, 2 cores (AVX2)")


def pages() -> list[Path]:
    """The Markdown files that may hold generated blocks."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def where(out: dict, stem: str, folder: Path = BENCH) -> str:
    """The machine a result file ran on, in its own words: the recorded description, else (older
    files, which recorded ``platform.machine()`` only) the CPU named in the heading of its ``.md``."""
    from benchmarks import machine

    info = out.get("machine")
    if isinstance(info, dict):
        return machine.describe_line(info)
    if isinstance(info, str) and "," in info:
        return info
    heading = (folder / f"{stem}.md").read_text().splitlines()[0]
    return heading.split(": ", 1)[1] if ": " in heading else heading.lstrip("# ")


def short_cpu(out: dict, stem: str) -> str:
    """'Intel Xeon, 2 cores (AVX-512, AMX)'-style: vendor, cores and the units that decide speed."""
    info = out.get("machine")
    if not isinstance(info, dict):
        return OLD_RUNS.get(stem) or where(out, stem)
    model = info["cpu"].lower()
    vendor = "Intel Xeon" if "xeon" in model else "AMD EPYC" if "epyc" in model else info["cpu"]
    flags = info["flags"]
    units = "AVX-512, AMX" if flags.get("amx_bf16") else "AVX-512" if flags.get("avx512f") else "AVX2"
    return f"{vendor}, {info['cores']} cores ({units})"


def _caption(out: dict, stem: str, folder: Path = BENCH) -> str:
    return f"Machine: {where(out, stem, folder)}."


# ---- speed ---------------------------------------------------------------------------------------


def _config_label(cfg: str) -> str:
    from benchmarks.speed import CONFIGS

    batch, steps, hidden, layers = CONFIGS[cfg]
    return f"{cfg} ({layers}x{hidden}, B={batch}, T={steps})"


def speed_headline(stem: str) -> str:
    """train.py's set-up (``fastest_setup``'s rule on the measured Trainer rows) against PyTorch
    in the same run, float32 and bf16: chars/s and the ratio."""
    from benchmarks.speed import train_py_setup

    out = load(BENCH / f"{stem}.json")
    rows = out["rows"]
    lines = ["| config | cell | float32 chars/s | vs PyTorch | bf16 chars/s | vs PyTorch bf16 autocast |",
             "|---|---|---|---|---|---|"]
    for cfg, cell in dict.fromkeys((r["config"], r["cell"]) for r in rows):
        f32, bf16 = (train_py_setup(rows, cfg, cell, dt) for dt in ("float32", "bfloat16"))
        if f32 is None:
            continue
        bf = f"{bf16['chars_per_s']:,.0f} | {bf16['vs_torch_bf16']}" if bf16 else "- | -"
        lines.append(f"| {_config_label(cfg)} | {cell} | {f32['chars_per_s']:,.0f} | {f32['vs_torch']} | {bf} |")
    return _caption(out, stem) + "\n\n" + "\n".join(lines)


def speed_summary(stem: str) -> str:
    """``benchmarks.speed.summary_tables``: train.py's set-up, a user's own step, fused vs oneDNN."""
    from benchmarks.speed import summary_tables

    out = load(BENCH / f"{stem}.json")
    return _caption(out, stem) + "\n\n" + "\n".join(summary_tables(out["rows"]))


def speed_peers(stem: str) -> str:
    """For runs from before the Trainer set-up rows (one device, no oneDNN): lstm_jax's Trainer
    against PyTorch and Flax ``nn.RNN``, float32."""
    out = load(BENCH / f"{stem}.json")
    rows = out["rows"]
    names = {"ours": "lstm_jax Trainer (10 steps/dispatch)", "flax": "flax nn.RNN",
             "flax10": "flax nn.RNN (10 steps/dispatch)"}
    lines = ["| config | cell | lstm_jax Trainer | PyTorch | Flax nn.RNN | Flax, 10 steps/dispatch | vs PyTorch "
             "| vs Flax | vs Flax 10/dispatch |", "|---|---|---|---|---|---|---|---|---|"]
    for cfg, cell in dict.fromkeys((r["config"], r["cell"]) for r in rows):
        same = {r["impl"]: r["chars_per_s"] for r in rows if r["config"] == cfg and r["cell"] == cell
                and "error" not in r}
        got = [same.get(names["ours"]), same.get(f"torch nn.{cell.upper()}"), same.get(names["flax"]),
               same.get(names["flax10"])]
        if got[0] is None:
            continue
        cells = [f"{v:,.0f}" if v else "-" for v in got]
        ratios = [f"{got[0] / v:.2f}x" if v else "-" for v in got[1:]]
        lines.append(f"| {_config_label(cfg)} | {cell} | " + " | ".join(cells + ratios) + " |")
    return _caption(out, stem) + "\n\n" + "\n".join(lines)


def generation() -> str:
    """Sampling speed of every speed run: one jitted scan against a PyTorch per-character loop."""
    lines = ["| result file | machine | lstm_jax chars/s | PyTorch loop chars/s | ratio |", "|---|---|---|---|---|"]
    for path in sorted(BENCH.glob("speed-*.json")):
        out = load(path)
        g = out.get("generation") or {}
        if "lstm_jax_chars_per_s" not in g:
            continue
        torch = f"{g['torch_loop_chars_per_s']:,.0f} | {g['ratio']:.1f}x" if "ratio" in g else "- | -"
        lines.append(f"| [{path.stem}](../benchmarks/results/{path.stem}.md) | {short_cpu(out, path.stem)} | "
                     f"{g['lstm_jax_chars_per_s']:,.0f} | {torch} |")
    return "\n".join(lines)


# ---- quality, scaling, allocator, layout, Flax modules -------------------------------------------


def _flags(command: str, config: dict | None = None) -> str:
    """The command's flags that change the run (not the budget, the tag or the evaluation spacing);
    with ``--recipe auto``, what it chose (from the run's ``config``)."""
    words = shlex.split(command)
    words = words[next(i for i, w in enumerate(words) if "quality" in w) + 1:]
    kept, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in ("--tag", "--minutes", "--eval-every", "--peer"):
            skip = True
        else:
            kept.append(w)
    flags = f"`{' '.join(kept)}`" if kept else "(train.py's defaults)"
    if (config or {}).get("recipe") == "auto":  # what it chose: the flags of recipe.KEYS not given
        given = {w.split("=")[0] for w in kept}
        chosen = [(f"--{k.replace('_', '-')}", config[k]) for k in ("dtype", "weight_decay", "dropout")]
        flags += " (chose `" + " ".join(f"{f} {v:g}" if isinstance(v, float) else f"{f} {v}"
                                        for f, v in chosen if f not in given) + "`)"
    return flags


CELLS_RUN = "quality-cells-"  # the per-cell runs at equal size have a table of their own (quality_cells)


def quality() -> str:
    """Every quality run of one model (the per-cell runs are ``quality_cells``'s): validation bpc
    reached in the time budget, best first per machine; with ``--ema-decay``, the weights' average
    at the end too."""
    runs = []
    for path in sorted(p for p in BENCH.glob("quality*.json") if not p.stem.startswith(CELLS_RUN)):
        out = load(path)
        ours = out["runs"]["lstm_jax"]
        torch = out["runs"].get("torch")
        runs.append((short_cpu(out, path.stem), min(r["val_bpc"] for r in ours), path.stem, out, ours, torch))
    lines = ["| result file | machine | flags | minutes | devices | steps | best validation bpc | PyTorch reference |",
             "|---|---|---|---|---|---|---|---|"]
    for cpu, best, stem, out, ours, torch in sorted(runs, key=lambda r: (r[0], r[1])):
        ref = f"{min(r['val_bpc'] for r in torch):.3f} ({torch[-1]['step']:,} steps)" if torch else "-"
        ema = ours[-1].get("val_bpc_ema")
        average = f" (the weights' average: {ema:.3f})" if ema else ""
        flags = _flags(out["command"], out.get("config"))
        lines.append(f"| [{stem}](../benchmarks/results/{stem}.md) | {cpu} | {flags} | {out['minutes']:g}"
                     f" | {out.get('devices', 1)} | {ours[-1]['step']:,} | {best:.3f}{average} | {ref} |")
    return "\n".join(lines)


def quality_cells(tag: str) -> str:
    """The char model with each cell at train.py's default model's parameter count
    (``benchmarks/quality.py --cell C --same-params --tag quality-cells-TAG-C``): best first."""
    paths = sorted(BENCH.glob(f"{CELLS_RUN}{tag}-*.json"))
    runs = sorted(((load(p), p.stem) for p in paths), key=lambda r: min(c["val_bpc"] for c in r[0]["runs"]["lstm_jax"]))
    lines = ["| cell | layers | parameters | learning rate | ms / step | steps in the budget | best validation bpc "
             "| the weights' average at the end (`--ema-decay`) |", "|---|---|---|---|---|---|---|---|"]
    for out, stem in runs:
        c, curve = out["config"], out["runs"]["lstm_jax"]
        ema = curve[-1].get("val_bpc_ema")
        ema = f"{ema:.3f} ({c['ema_decay']:g})" if ema else "-"
        lines.append(f"| [{c['cell']}](../benchmarks/results/{stem}.md) | {c['num_layers']}x{c['hidden_size']} | "
                     f"{out['params']:,} | {c['learning_rate']:g} | {out['step_ms']:.0f} | {curve[-1]['step']:,} | "
                     f"{min(r['val_bpc'] for r in curve):.3f} | {ema} |")
    minutes = {f"{out['minutes']:g}" for out, _ in runs}
    return (_caption(*runs[0]) + f" Budget: {', '.join(sorted(minutes))} minutes of training per cell, "
            "one run after another.\n\n" + "\n".join(lines))


def scaling(tag: str) -> str:
    """Trainer step time on 1 and N devices at the same global batch, every config run on ``tag``."""
    paths = sorted(BENCH.glob(f"scaling-{tag}-*.json"), key=lambda p: load(p)["config"]["hidden"])
    lines = ["| config | devices | ms / step | vs 1 device | bytes all-reduced / step |", "|---|---|---|---|---|"]
    first = None
    for path in paths:
        out = load(path)
        first = first or (out, path.stem)
        c = out["config"]
        for r in out["rows"]:
            lines.append(f"| {c['name']} ({c['layers']}x{c['hidden']}, B={c['batch']}, T={c['seq_len']}) | "
                         f"{r['devices']} | {r['step_ms']:.1f} | {r['vs_1_device']:.2f}x | "
                         f"{r['allreduce_bytes_per_step']:,} |")
    return _caption(*first) + "\n\n" + "\n".join(lines)


def _malloc_names(results: dict) -> tuple[str, list[str]]:
    """The reference setting (the tuned allocator, whatever the file calls it) and all settings."""
    names = list(next(iter(results.values())))
    return next(n for n in names if n.startswith("tuned (")), names


def _setting(name: str) -> str:
    return "tuned" if name.startswith("tuned (") else name


def malloc(stem: str) -> str:
    """ms per step under each allocator setting, the ratio to the tuned allocator, page faults and
    peak memory."""
    out = load(BENCH / f"{stem}.json")
    ref, names = _malloc_names(out["results"])
    others = [n for n in names if n != ref]
    lines = ["| config | step | " + " | ".join(_setting(n) for n in names) + " | "
             + " | ".join(f"{_setting(n)} / tuned" for n in others) + " |",
             "|---|---|" + "---|" * (len(names) + len(others))]
    for config, res in out["results"].items():
        for step in res[ref]["ms"]:
            ms = " | ".join(f"{res[n]['ms'][step]:.1f} ms" for n in names)
            ratios = " | ".join(f"{res[n]['ms'][step] / res[ref]['ms'][step]:.2f}x" for n in others)
            lines.append(f"| {config} | {step} | {ms} | {ratios} |")
        blank = " |" * len(others)
        lines.append(f"| {config} | page faults per lstm_jax step | "
                     + " | ".join(f"{res[n]['faults_per_step']:,.0f}" for n in names) + f" |{blank}")
        lines.append(f"| {config} | peak resident memory, MB | "
                     + " | ".join(f"{res[n]['max_rss_mb']:,.0f}" for n in names) + f" |{blank}")
    return _caption(out, stem) + "\n\n" + "\n".join(lines)


def layout() -> str:
    """Per machine: how often the transposed carry measured >= 1.1x faster, and the range."""
    lines = ["| result file | machine | shapes (cell, N, H) | transposed >= 1.1x faster at | transposed / row-major "
             "speed-up |", "|---|---|---|---|---|"]
    for path in sorted(BENCH.glob("layout-*.json")):
        out = load(path)
        rows = out["rows"]
        wins = [f"{r['cell']} {r['batch']}x{r['hidden']}" for r in rows if r["speedup"] >= 1.1]
        lo, hi = min(r["speedup"] for r in rows), max(r["speedup"] for r in rows)
        lines.append(f"| [{path.stem}](../benchmarks/results/{path.stem}.md) | {short_cpu(out, path.stem)} | "
                     f"{len(rows)} | {', '.join(wins) or 'none'} | {lo:.2f}x - {hi:.2f}x |")
    return "\n".join(lines)


def flax_modules(stem: str) -> str:
    """ms per jitted train step: the functional stack, the NNX module over it, Flax's own nnx.RNN."""
    out = load(BENCH / f"{stem}.json")
    lines = ["| config | cell | functional `RecurrentStack` | `lstm_jax.nnx` module | Flax `nnx.RNN` "
             "| module / functional | Flax / module |", "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['config']} | {r['cell']} | {r['functional RecurrentStack']:.1f} ms | "
                     f"{r['lstm_jax.nnx module']:.1f} ms | {r['Flax nnx.RNN']:.1f} ms | "
                     f"{r['module_vs_functional']:.2f} | {r['flax_vs_module']:.2f} |")
    return _caption(out, stem) + "\n\n" + "\n".join(lines)


def padded(stem: str) -> str:
    """ms per training step of one LSTM layer: padded batches on the fused and scan layers, and each
    option against the plain fused LSTM of the same size (``benchmarks/padded.py``)."""
    from benchmarks.padded import table as padded_table

    out = load(BENCH / f"{stem}.json")
    s = out["shape"]
    shape = (f"B={s['batch']}, T={s['steps']}, H={s['hidden']}, {s['features']} input features, lengths uniform "
             f"in [1, T] (mean {out['mean_length']:.1f}), median of {out['rounds']} turns taking turns")
    return _caption(out, stem) + f" {shape}.\n\n" + padded_table(out)


# ---- experiments ---------------------------------------------------------------------------------


def _sci(x: float, digits: int = 2) -> str:
    """``x`` to ``digits`` significant digits, in powers of ten outside [0.01, 10**digits): 3.1e-3."""
    if x <= FLOOR:
        return "0 (below float32)"
    if 1e-2 <= x < 10**digits:
        return f"{x:.{digits}g}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def gradient_flow() -> str:
    """``||dL/dh_t||`` at initialisation against the distance ``T - t``, every cell."""
    out = load(EXPER / "gradient_flow.json")
    distances = list(next(iter(out["cases"].values()))["at_distance"])
    lines = ["| cell at init | " + " | ".join(f"d = {d}" for d in distances) + " |",
             "|---|" + "---|" * len(distances)]
    for name, case in out["cases"].items():
        lines.append(f"| {name} | " + " | ".join(_sci(case["at_distance"][d]) for d in distances) + " |")
    return "\n".join(lines)


def adding(stem: str) -> str:
    """The adding problem: test MSE and steps to MSE < 0.01 per seed, every span and cell."""
    out = load(EXPER / f"{stem}.json")
    n = out["hyper"]["seeds"]
    lines = [f"| T | cell | test MSE ({n} seeds) | steps to MSE < 0.01 |", "|---|---|---|---|"]
    for r in out["runs"]:
        steps = ", ".join("-" if s is None else f"{s:,}" for s in r["steps_to_0.01"])
        lines.append(f"| {r['span']} | {r['cell']} | {', '.join(f'{m:.4f}' for m in r['test_mse'])} | {steps} |")
    return "\n".join(lines)


def clipping(stem: str) -> str:
    """Gradient clipping on and off: per setting, test MSE per seed, the largest gradient norm and
    the step where the loss stopped being finite."""
    out = load(EXPER / f"{stem}.json")
    lines = ["| setting | test MSE per seed | largest gradient norm | loss non-finite from step |", "|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in out["runs"]):
        runs = [r for r in out["runs"] if r["setting"] == setting]
        mse = ", ".join("diverged" if r["test_mse"] is None else f"{r['test_mse']:.3f}" for r in runs)
        steps = ", ".join(str(r["non_finite_from_step"]) for r in runs if r["non_finite_from_step"]) or "-"
        lines.append(f"| {setting} | {mse} | {_sci(max(r['grad_norm_max'] for r in runs), 3)} | {steps} |")
    return "\n".join(lines)


# ---- accelerators ---------------------------------------------------------------------------------

ACCELERATOR_TARGETS = {"seed": 1 / 1.5, "default": 1.0, "large": 1.0, "xl": None}  # Trainer vs PyTorch, float32


def accelerator() -> str:
    """The GPU table: every committed ``device-check-*.json`` (benchmarks/device_check.py, dry runs
    left out): per config and cell, lstm_jax's Trainer as train.py runs it (``impl='auto'``) and on
    each layer route, against PyTorch cuDNN in float32 and bf16 autocast, beside the targets."""
    runs = [(p.stem, load(p)) for p in sorted(BENCH.glob("device-check-*.json"))]
    runs = [(stem, r) for stem, r in runs if not r.get("dry_run") and r.get("speed")]
    head = ["| GPU | config | cell | Trainer chars/s | vs PyTorch (target) | bf16 vs PyTorch autocast (target 1.00x) "
            "| fused | scan | cuDNN | best unroll | compile s | peak MiB (PyTorch) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if not runs:
        return ("No device run yet: the rows appear here when `benchmarks/device_check.py` has run on a GPU and "
                "its `device-check-<gpu>.json` is committed to `benchmarks/results/`.\n\n" + "\n".join(head)
                + "\n| - | - | - | - | - | - | - | - | - | - | - | - |")
    lines = []
    for stem, run in runs:
        gpu = run["device"].get("device_kind", stem)
        rows = run["speed"]["rows"]
        for cfg, cell in dict.fromkeys((r["config"], r["cell"]) for r in rows):
            same = {r["impl"]: r for r in rows if r["config"] == cfg and r["cell"] == cell and "error" not in r}
            speed = lambda name: same[name]["chars_per_s"] if name in same else None
            ours = speed("lstm_jax Trainer (10 steps/dispatch)")
            bf16 = speed("lstm_jax bf16 Trainer (10 steps/dispatch)")
            torch, torch_bf16 = speed(f"torch nn.{cell.upper()}"), speed(f"torch nn.{cell.upper()} bf16 autocast")
            target = ACCELERATOR_TARGETS.get(cfg)
            ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
            unrolls = {k: r["chars_per_s"] for k, r in same.items() if k.startswith("lstm_jax fused, unroll ")}
            best = max(unrolls, key=unrolls.get).split("unroll ")[1].split()[0] if unrolls else "-"
            auto = same.get("lstm_jax Trainer (10 steps/dispatch)", {})
            theirs = same.get(f"torch nn.{cell.upper()}", {})
            mib = lambda r: f"{r['peak_bytes'] / 2**20:,.0f}" if r.get("peak_bytes") else "-"
            fmt = lambda v: f"{v:,.0f}" if v else "-"
            lines.append(
                f"| {gpu} | {_config_label(cfg)} | {cell} | {fmt(ours)} | {ratio(ours, torch)}"
                f"{f' ({target:.2f}x)' if target else ''} | {ratio(bf16, torch_bf16)} | "
                f"{fmt(speed('lstm_jax Trainer, fused layer'))} | {fmt(speed('lstm_jax Trainer, autodiff scan'))} | "
                f"{fmt(speed('lstm_jax Trainer, cudnn layer'))} | {best} | "
                f"{auto.get('compile_s', 0):.1f} | {mib(auto)} ({mib(theirs)}) |")
    return "\n".join(head + lines)


def modern_speed(stem: str) -> str:
    """Training-step time of the modern cells against the fused LSTM (``benchmarks/modern_speed.py``)."""
    from benchmarks.modern_speed import table as speed_table

    out = load(BENCH / f"{stem}.json")
    return speed_table(out, out["hyper"]["memory_steps"]) + "\n\n" + _caption(out, stem)


TABLES: dict[str, Callable[..., str]] = {
    "speed-headline": speed_headline, "speed-summary": speed_summary, "speed-peers": speed_peers,
    "generation": generation, "quality": quality, "quality-cells": quality_cells, "scaling": scaling, "malloc": malloc,
    "layout": layout, "flax-modules": flax_modules, "padded": padded, "gradient-flow": gradient_flow, "adding": adding,
    "clipping": clipping, "accelerator": accelerator, "modern-speed": modern_speed,
}


def table(name: str) -> str:
    """The generated content of block ``name`` (``'kind'`` or ``'kind:argument'``)."""
    kind, _, arg = name.partition(":")
    return TABLES[kind](*([arg] if arg else []))


def blocks(text: str) -> list[tuple[str, str]]:
    """``(name, content)`` of every generated block in ``text``."""
    return [(m.group(2), m.group(3).strip("\n")) for m in BLOCK.finditer(text)]


def regenerate(text: str) -> str:
    """``text`` with every generated block's content made anew."""
    return BLOCK.sub(lambda m: f"{m.group(1)}\n{table(m.group(2))}\n\n{m.group(4)}", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the out-of-date blocks in place")
    args = p.parse_args(argv)
    stale = []
    for path in pages():
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if args.write:
                path.write_text(new)
    for path in stale:
        print(f"{'rewrote' if args.write else 'out of date'}: {path}")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
