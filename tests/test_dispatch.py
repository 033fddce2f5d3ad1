"""lstm_jax.dispatch: the one place that chooses a layer's kernel. Its plans by platform and
shape, its switches (and their bad values), the carry layout measured once per machine and shape,
cached on disk for every process, re-measured when the cache is damaged, skipped where it cannot
matter, and nothing timed with ``LSTM_JAX_DISPATCH=fixed``."""

from __future__ import annotations

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConfigError, GRUCell, LeakyRNNCell, LSTMCell, RNNCell, dispatch, scan_cell
from lstm_jax.dispatch import cache, measure, plan


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    for name in ("LSTM_JAX_LAYOUT", "LSTM_JAX_DISPATCH", "LSTM_JAX_ONEDNN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(plan, "_memo", {})
    calls = []
    real = measure.layouts

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(measure, "layouts", counted)
    return tmp_path / "layouts.json", calls


cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout is measured for the CPU backend")


@cpu_only
def test_the_choice_is_measured_once_then_read_from_the_shared_cache(fresh_cache, monkeypatch):
    path, calls = fresh_cache
    choice = plan.transposed_carry_pays(64, 128, 4)
    assert len(calls) == 1
    (entry,) = json.loads(path.read_text()).values()
    assert entry["row_major_s"] > 0 and entry["transposed_s"] > 0
    assert choice == entry["transposed"] == (entry["row_major_s"] >= measure.MARGIN * entry["transposed_s"])
    monkeypatch.setattr(plan, "_memo", {})  # another process: reads the file, measures nothing
    assert plan.transposed_carry_pays(64, 128, 4) == choice and len(calls) == 1
    assert plan.transposed_carry_pays(64, 128, 4, "bfloat16") in (True, False) and len(calls) == 2


@cpu_only
def test_a_damaged_cache_is_measured_again_and_rewritten(fresh_cache):
    path, calls = fresh_cache
    path.write_text('{"truncated": ')
    plan.transposed_carry_pays(64, 128, 3)
    assert len(calls) == 1 and len(json.loads(path.read_text())) == 1


def test_no_measurement_where_the_layout_cannot_matter_or_is_fixed(fresh_cache, monkeypatch):
    path, calls = fresh_cache
    assert plan.transposed_carry_pays(4, 8, 4) is False  # a tiny step: bound by loop overhead
    assert plan.transposed_carry_pays(4096, 2048, 4) is False  # both kernels near peak
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "transposed")
    assert plan.transposed_carry_pays(64, 128, 4) is True
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "row-major")
    assert plan.transposed_carry_pays(64, 128, 4) is False
    monkeypatch.delenv("LSTM_JAX_LAYOUT")
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    assert plan.transposed_carry_pays(64, 128, 4) is False
    assert plan.onednn_threads(100, 64, 512, 512) == 0
    assert calls == [] and not path.exists()


@cpu_only
def test_a_measurement_that_needs_another_does_not_deadlock(fresh_cache):
    """Timing a Trainer traces the fused layers, which ask for their layout inside the first
    measurement's file lock (this hung train.py once); both answers end up in the file."""
    path, calls = fresh_cache
    result = {}

    def outer():
        result["entry"] = cache.cached("outer", lambda: {"inner": plan.transposed_carry_pays(64, 128, 4)})

    thread = threading.Thread(target=outer, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "dispatch.cache.cached deadlocked on its own file lock"
    entries = json.loads(path.read_text())
    assert entries["outer"] == result["entry"] and len(entries) == 2 and len(calls) == 1


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "tpu"])
def test_plans_by_platform_without_a_device(fresh_cache, monkeypatch, platform):
    """The plan is a function of the platform name: off CPU no oneDNN and no transposed carry,
    whatever the switches say about CPU choices; cuDNN for float32 LSTM layers on CUDA (fixed rule:
    nothing is timed here; the measured rule is in test_platforms.py)."""
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "transposed")
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    shape = dict(steps=100, rows=64, features=512)
    cudnn = platform == "cuda"
    lstm = plan.plan_layer(LSTMCell(64), platform=platform, **shape)
    assert lstm.impl == ("cudnn" if cudnn else "fused")
    if lstm.impl == "fused":
        assert lstm.transposed == (platform == "cpu") and lstm.loop_factors  # 64 units: factors in the loop
    assert plan.plan_layer(LSTMCell(256), platform=platform, impl="fused", **shape).loop_factors is False
    assert plan.plan_layer(RNNCell(64), platform=platform, **shape).impl == "fused"
    assert plan.plan_layer(GRUCell(64, reset_after=False), platform=platform, **shape).impl == "scan"
    assert plan.plan_layer(LeakyRNNCell(64), platform=platform, **shape).impl == "scan"
    assert plan.plan_layer(LSTMCell(64), platform=platform, seq_lengths=True, **shape).impl == (
        "cudnn" if cudnn else "fused")  # never oneDNN: no per-sequence lengths
    assert plan.plan_layer(GRUCell(64), platform=platform, seq_lengths=True, **shape).impl == "fused"
    assert plan.plan_layer(LSTMCell(64), platform=platform, remat=True, **shape).impl == "scan"
    assert plan.plan_layer(LSTMCell(64), platform=platform, impl="scan", **shape).impl == "scan"
    monkeypatch.setenv("LSTM_JAX_ONEDNN", "1")  # oneDNN wherever supported: still never where 'fused' is asked
    assert plan.plan_layer(LSTMCell(64), platform=platform, impl="fused", **shape).impl == "fused"
    assert plan.plan_layer(LSTMCell(64), platform=platform, steps=0, rows=4, features=3).impl == "scan"


def test_impl_is_checked_before_any_shortcut():
    """An unknown impl is refused even where the layer would run the plain scan anyway (empty input)."""
    cell = LSTMCell(4)
    params = cell.init(jax.random.key(0), 3)
    allowed = "'auto', 'scan', 'fused', 'onednn', 'cudnn', 'parallel'"
    with pytest.raises(ConfigError, match=rf"impl must be one of {allowed}, got 'bogus'"):
        scan_cell(cell, params, jnp.zeros((2, 0, 3)), impl="bogus")
    with pytest.raises(ConfigError, match="impl must be one of"):
        scan_cell(cell, params, jnp.zeros((2, 5, 3)), impl="bogus")
    with pytest.raises(ConfigError, match="impl='fused' supports"):
        scan_cell(LeakyRNNCell(4), LeakyRNNCell(4).init(jax.random.key(0), 3), jnp.zeros((2, 0, 3)), impl="fused")


@pytest.mark.parametrize("name, value", [("LSTM_JAX_ONEDNN", "yes"), ("LSTM_JAX_LAYOUT", "columns"),
                                         ("LSTM_JAX_DISPATCH", "never"), ("LSTM_JAX_MALLOC", "huge")])
def test_an_unknown_switch_value_gets_one_line_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    readers = {"LSTM_JAX_ONEDNN": dispatch.switches.onednn_mode, "LSTM_JAX_LAYOUT": dispatch.switches.layout_mode,
               "LSTM_JAX_DISPATCH": dispatch.switches.dispatch_mode, "LSTM_JAX_MALLOC": dispatch.switches.malloc_mode}
    with pytest.raises(ConfigError, match=rf"^{name} must be one of .* got '{value}'; fix or unset the variable\.$"):
        readers[name]()


def test_the_switches_are_read_in_the_dispatch_only():
    """One home per decision: no module outside ``lstm_jax.dispatch`` reads an ``LSTM_JAX_*`` variable."""
    from pathlib import Path

    import lstm_jax

    root = Path(lstm_jax.__file__).parent
    readers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if ("os.environ" in p.read_text() or "getenv" in p.read_text()) and "LSTM_JAX_" in p.read_text()]
    assert readers == ["dispatch/switches.py"]


def test_fixed_dispatch_runs_the_same_numbers_without_timing(fresh_cache, monkeypatch):
    path, calls = fresh_cache
    cell = LSTMCell(128)
    params = cell.init(jax.random.key(0), 8)
    x = jax.random.normal(jax.random.key(1), (64, 6, 8))
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    fixed = scan_cell(cell, params, x)[1]
    assert calls == [] and not path.exists()
    np.testing.assert_allclose(fixed, scan_cell(cell, params, x, impl="scan")[1], rtol=1e-5, atol=1e-5)


@cpu_only
def test_the_mlstm_form_on_cpu_is_the_measured_fastest_and_runs_the_same_numbers(fresh_cache, monkeypatch):
    """Rule 5b: the scan or the chunk length that measured fastest (the simpler one unless another
    is ``MARGIN`` faster), read back from the cache; unmeasured below the size threshold, off CPU
    and with ``LSTM_JAX_DISPATCH=fixed``; whatever is chosen computes the scan's numbers."""
    from lstm_jax import MLSTMCell

    monkeypatch.setattr(plan, "MLSTM_MEASURED_STEPS", 128)
    timed = []
    real = measure.mlstm_forms
    monkeypatch.setattr(measure, "mlstm_forms", lambda *a: timed.append(a) or real(*a))
    cell = MLSTMCell(32, num_heads=2)
    assert plan.plan_layer(cell, steps=200, rows=8, features=3, platform="cpu").chunk == 128  # below the threshold
    assert timed == []
    monkeypatch.setattr(plan, "MLSTM_MIN_MEASURED_FLOPS", 0)
    chosen = plan.plan_layer(cell, steps=200, rows=8, features=3, platform="cpu")
    (entry,) = [v for k, v in plan.decisions().items() if "mlstm-form" in k]
    assert len(timed) == 1 and set(entry["seconds"]) == {"scan", "128", "64", "32", "16"}
    best = measure.simplest_fast_enough({k if k == "scan" else int(k): t for k, t in entry["seconds"].items()})
    assert entry["chunk"] == (-1 if best == "scan" else best)
    assert (chosen.impl, chosen.chunk) == (("scan", 0) if best == "scan" else ("parallel", best))
    monkeypatch.setattr(plan, "_memo", {})  # another process reads the file
    assert plan.plan_layer(cell, steps=200, rows=8, features=3, platform="cpu") == chosen and len(timed) == 1
    assert plan.plan_layer(cell, steps=200, rows=8, features=3, platform="gpu").chunk == 128
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    assert plan.plan_layer(cell, steps=200, rows=8, features=3, platform="cpu").chunk == 128 and len(timed) == 1
    monkeypatch.delenv("LSTM_JAX_DISPATCH")
    params = cell.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (8, 200, 3))
    auto, scan = scan_cell(cell, params, x), scan_cell(cell, params, x, impl="scan")
    assert len(timed) == 1
    np.testing.assert_allclose(auto[1], scan[1], rtol=1e-5, atol=1e-5)


@cpu_only
def test_the_onednn_choice_of_a_long_wide_layer_is_timed_over_fewer_steps(fresh_cache, monkeypatch):
    """``measured_steps``: the timing's memory stays bounded (a 1,000-step layer of 1,024 rows once
    took over 20 GB to time); the layer's own steps where they fit, never fewer than the floor."""
    from lstm_jax import onednn

    assert plan.measured_steps(100, 64, 64 + 4 * 256) == 100  # the char model's layers: all their steps
    assert plan.measured_steps(1000, 1024, 2 + 4 * 64) == plan.MEASURED_MAX_ELEMENTS // (1024 * 258) < 100
    assert plan.measured_steps(1000, 10**6, 2048) == plan.MIN_MEASURED_STEPS
    if not onednn.available():
        pytest.skip(f"oneDNN extension: {onednn.unavailable_reason()}")
    monkeypatch.setattr(plan, "MEASURED_MAX_ELEMENTS", 40 * 256 * (8 + 4 * 64))
    monkeypatch.setattr(plan, "ONEDNN_MIN_LAYER_FLOPS", 0)
    timed = []
    real = measure.onednn_layer
    monkeypatch.setattr(measure, "onednn_layer", lambda *a: timed.append(a[0]) or real(*a))
    threads = plan.onednn_threads(500, 256, 8, 64)
    (key, entry), = [(k, v) for k, v in plan.decisions().items() if "onednn-lstm" in k]
    assert timed == [40] and "|40x256x8x64|" in key and entry["threads"] == threads
