"""The dispatch on each platform, checked by the platform's name without its device: cuDNN on CUDA
(measured or fixed), never on CPU or TPU, never for bf16 or other cells; nothing CPU-only (oneDNN,
the carry layout, per-core devices, the allocator) off CPU whatever the switches say; bf16
products proposed on TPU; ``impl='cudnn'`` refused where it cannot run, in one sentence."""

from __future__ import annotations

import pytest

from lstm_jax import ConfigError, GRUCell, LSTMCell, MGUCell, RNNCell, dispatch
from lstm_jax.charlm import train
from lstm_jax.dispatch import measure, plan

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
SHAPE = dict(steps=100, rows=64, features=64)


@pytest.fixture
def clean(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    for name in ("LSTM_JAX_LAYOUT", "LSTM_JAX_DISPATCH", "LSTM_JAX_ONEDNN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(plan, "_memo", {})
    timed = []

    def fake_cudnn_layer(*args):
        timed.append(args)
        return {"other": fake_cudnn_layer.other, "cudnn": 1.0}

    fake_cudnn_layer.other = 2.0
    monkeypatch.setattr(measure, "cudnn_layer", fake_cudnn_layer)
    return monkeypatch, fake_cudnn_layer, timed


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fixed_plans_per_platform(clean, platform):
    monkeypatch, _, timed = clean
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    want = {"cpu": "fused", "cuda": "cudnn", "rocm": "fused", "tpu": "fused"}[platform]
    assert plan.plan_layer(LSTMCell(128), platform=platform, **SHAPE).impl == want
    assert plan.plan_layer(LSTMCell(128), platform=platform, seq_lengths=True, **SHAPE).impl == (
        "cudnn" if want == "cudnn" else "fused")
    bf16 = LSTMCell(128, dtype="bfloat16")
    assert plan.plan_layer(bf16, platform=platform, **SHAPE).impl == "fused"
    assert plan.plan_layer(GRUCell(128), platform=platform, **SHAPE).impl == "fused"
    assert plan.plan_layer(RNNCell(128), platform=platform, **SHAPE).impl == "fused"
    assert plan.plan_layer(MGUCell(128), platform=platform, **SHAPE).impl == "scan"
    assert timed == []


@pytest.mark.parametrize("platform", PLATFORMS)
def test_measured_cudnn_only_on_cuda_and_rocm_and_only_where_it_wins(clean, platform):
    monkeypatch, fake, timed = clean
    monkeypatch.setenv("LSTM_JAX_ONEDNN", "0")  # the CPU's own measurements are tested elsewhere
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "row-major")
    gpu = platform in ("cuda", "rocm")
    fake.other = 2.0  # the fused layer twice as slow: cuDNN wins on a GPU
    assert (plan.plan_layer(LSTMCell(128), platform=platform, **SHAPE).impl == "cudnn") == gpu
    assert len(timed) == int(gpu)
    assert plan.plan_layer(LSTMCell(128, dtype="bfloat16"), platform=platform, **SHAPE).impl == "fused"
    assert plan.plan_layer(GRUCell(128), platform=platform, **SHAPE).impl == "fused"
    assert len(timed) == int(gpu)  # neither asked for a measurement
    monkeypatch.setattr(plan, "_memo", {})
    fake.other = measure.MARGIN * 0.99  # cuDNN faster, but not by the margin: the fused layer stays
    assert plan.plan_layer(LSTMCell(256), platform=platform, **SHAPE).impl == "fused"


def test_a_cudnn_measurement_is_cached(clean):
    monkeypatch, fake, timed = clean
    first = plan.plan_layer(LSTMCell(128), platform="cuda", **SHAPE)
    monkeypatch.setattr(plan, "_memo", {})  # another process: reads the machine's cache
    assert plan.plan_layer(LSTMCell(128), platform="cuda", **SHAPE) == first and len(timed) == 1


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_nothing_cpu_only_runs_off_cpu_whatever_the_switches(clean, platform):
    monkeypatch, *_ = clean
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    monkeypatch.setenv("LSTM_JAX_ONEDNN", "1")
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "transposed")
    monkeypatch.setattr(plan.onednn, "loaded", lambda: True)
    for cell in (LSTMCell(128, dtype="bfloat16"), GRUCell(128)):
        p = plan.plan_layer(cell, platform=platform, **SHAPE)
        assert p.impl == "fused" and not p.transposed
    assert not dispatch.cpu_choices_apply(platform)
    assert dispatch.cpu_choices_apply("cpu")


def test_on_cpu_the_cpu_switches_still_apply(clean):
    monkeypatch, *_ = clean
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    monkeypatch.setenv("LSTM_JAX_LAYOUT", "transposed")
    assert plan.plan_layer(GRUCell(128), platform="cpu", **SHAPE).transposed


@pytest.mark.parametrize("platform, dtype", [("cpu", "float32"), ("cuda", "float32"), ("rocm", "float32"),
                                             ("tpu", "bfloat16")])
def test_the_proposed_compute_dtype_per_platform_reaches_train_py(platform, dtype):
    assert dispatch.proposed_compute_dtype(platform) == dtype
    args = train.parse_args([])
    assert train.resolve_config(args, None, platform=platform)["dtype"] == dtype
    assert train.resolve_config(train.parse_args(["--dtype", "float32"]), None, platform=platform)["dtype"] == "float32"
    saved = {**train.resolve_config(args, None, platform="cpu"), "dtype": "float32"}
    assert train.resolve_config(args, saved, platform=platform)["dtype"] == "float32"  # a resumed run keeps its own


@pytest.mark.parametrize(
    "cell, platform, remat, needed, use",
    [
        (LSTMCell(8), "cpu", False, "needs a CUDA or ROCm device", "impl='fused' or 'auto'"),
        (LSTMCell(8), "tpu", False, "needs a CUDA or ROCm device", "impl='fused' or 'auto'"),
        (GRUCell(8), "cuda", False, "LSTM layers only, not a GRUCell", "impl='fused' or 'auto'"),
        (MGUCell(8), "cuda", False, "LSTM layers only, not a MGUCell", "impl='scan' or 'auto'"),
        (LSTMCell(8, dtype="bfloat16"), "cuda", False, "float32 only", "impl='fused' or 'auto'"),
        (LSTMCell(8), "cuda", True, "remat=True has no meaning", "impl='scan' or 'auto'"),
    ],
)
def test_impl_cudnn_where_it_cannot_run_names_what_is_needed_and_the_impl_to_use(cell, platform, remat, needed,
                                                                                  use):
    with pytest.raises(ConfigError, match="impl='cudnn'") as err:
        plan.plan_layer(cell, impl="cudnn", platform=platform, remat=remat, **SHAPE)
    assert needed in str(err.value) and use in str(err.value)
    assert str(err.value).count(". ") == 1 and str(err.value).endswith(".")


def test_impl_cudnn_on_cuda_is_taken_with_and_without_lengths(clean):
    for lengths in (False, True):
        assert plan.plan_layer(LSTMCell(8), impl="cudnn", platform="cuda", seq_lengths=lengths, **SHAPE).impl == "cudnn"
    assert plan.plan_layer(LSTMCell(8), impl="cudnn", platform="cuda", steps=0, rows=4, features=3).impl == "scan"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_py_tunes_the_allocator_and_splits_cores_on_cpu_only(monkeypatch, platform):
    calls = []
    monkeypatch.setattr(dispatch, "likely_platform", lambda: platform)
    monkeypatch.setattr(train.runtime, "tune_malloc", lambda: calls.append("malloc"))
    monkeypatch.setattr(train.parallel, "cpu_devices_per_core", lambda *a: calls.append("cores"))
    monkeypatch.setattr(train, "run", lambda args: 0)
    assert train.main(["--run-dir", "unused"]) == 0
    assert train.main(["--run-dir", "unused", "--cpu-devices", "2"]) == 0
    assert calls == (["malloc", "cores"] * 2 if platform == "cpu" else [])


@pytest.mark.parametrize("configured, want", [("tpu", "tpu"), ("cuda,cpu", "cuda"), ("gpu", "cuda"), ("cpu", "cpu")])
def test_likely_platform_before_the_backends_start(monkeypatch, configured, want):
    import jax
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    old = jax.config.jax_platforms  # read only when backends start, which they have here
    jax.config.update("jax_platforms", configured)
    try:
        assert dispatch.likely_platform() == want
    finally:
        jax.config.update("jax_platforms", old)


@pytest.mark.parametrize("version, want", [("cuda 13000", "cuda"), ("rocm 6.2", "rocm")])
def test_jaxs_gpu_backend_is_named_cuda_or_rocm(monkeypatch, version, want):
    import jax

    class Client:
        platform_version = version

    class Device:
        client = Client()

    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    assert dispatch.current_platform("gpu") == want
    assert dispatch.current_platform("tpu") == "tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert plan.plan_layer(LSTMCell(8), impl="cudnn", **SHAPE).impl == "cudnn"  # "gpu" resolved, not refused


@pytest.mark.parametrize("seq_lengths", [False, True], ids=["full", "lengths"])
def test_the_cudnn_measurement_runs_while_a_program_is_traced(monkeypatch, seq_lengths):
    """What the dispatch times on a GPU, timed here with lstm_ref standing in for cuDNN: it runs
    inside a trace (plan_layer is asked while the user's step is jitted) and times both layers."""
    import functools

    import jax
    import jax.numpy as jnp

    from lstm_jax.kernels import cudnn

    monkeypatch.setattr(cudnn, "cudnn_lstm", functools.partial(cudnn.cudnn_lstm, reference=True))
    seen = {}

    def traced(x):
        seen.update(measure.cudnn_layer(6, 3, 4, 5, seq_lengths, rounds=1))
        return x + 1

    jax.jit(traced)(jnp.zeros(2))
    assert set(seen) == {"other", "cudnn"} and all(v > 0 for v in seen.values())
