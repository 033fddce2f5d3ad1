"""lstm_jax.calibrate: the CPU layout of the fused loops is measured once per machine and shape,
cached on disk for every process, re-measured when the cache is damaged, and skipped where the
layout cannot matter."""

from __future__ import annotations

import json

import jax
import pytest

from lstm_jax import calibrate


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LSTM_JAX_LAYOUT", raising=False)
    monkeypatch.setattr(calibrate, "_memory", {})
    calls = []
    real = calibrate.measure_layouts

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(calibrate, "measure_layouts", counted)
    return tmp_path / "layouts.json", calls


cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout is measured for the CPU backend")


@cpu_only
def test_the_choice_is_measured_once_then_read_from_the_shared_cache(fresh_cache, monkeypatch):
    path, calls = fresh_cache
    choice = calibrate.transposed_carry_pays(64, 128, 4)
    assert len(calls) == 1
    (entry,) = json.loads(path.read_text()).values()
    assert entry["row_major_s"] > 0 and entry["transposed_s"] > 0
    assert choice == entry["transposed"] == (entry["row_major_s"] >= calibrate.MARGIN * entry["transposed_s"])
    monkeypatch.setattr(calibrate, "_memory", {})  # another process: reads the file, measures nothing
    assert calibrate.transposed_carry_pays(64, 128, 4) == choice and len(calls) == 1
    assert calibrate.transposed_carry_pays(64, 128, 4, "bfloat16") in (True, False) and len(calls) == 2


@cpu_only
def test_a_damaged_cache_is_measured_again_and_rewritten(fresh_cache):
    path, calls = fresh_cache
    path.write_text('{"truncated": ')
    calibrate.transposed_carry_pays(64, 128, 3)
    assert len(calls) == 1 and len(json.loads(path.read_text())) == 1


def test_no_measurement_where_the_layout_cannot_matter_or_is_fixed(fresh_cache, monkeypatch):
    path, calls = fresh_cache
    assert calibrate.transposed_carry_pays(4, 8, 4) is False  # a tiny step: bound by loop overhead
    assert calibrate.transposed_carry_pays(4096, 2048, 4) is False  # both kernels near peak
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "transposed")
    assert calibrate.transposed_carry_pays(64, 128, 4) is True
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "row-major")
    assert calibrate.transposed_carry_pays(64, 128, 4) is False
    assert calls == [] and not path.exists()


@cpu_only
def test_a_measurement_that_needs_another_does_not_deadlock(fresh_cache):
    """Timing a Trainer traces the fused layers, which ask for their layout inside the first
    measurement's file lock (this hung train.py once); both answers end up in the file."""
    import threading

    path, calls = fresh_cache
    result = {}

    def outer():
        result["entry"] = calibrate.cached("outer", lambda: {"inner": calibrate.transposed_carry_pays(64, 128, 4)})

    thread = threading.Thread(target=outer, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "calibrate.cached deadlocked on its own file lock"
    entries = json.loads(path.read_text())
    assert entries["outer"] == result["entry"] and len(entries) == 2 and len(calls) == 1
