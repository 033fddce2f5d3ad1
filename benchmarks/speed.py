"""Train-step speed of lstm_jax against its peers, measured side by side in one run.

A train step is: embedding (V=92 -> 64), L recurrent layers, dense to 92 logits at every step,
mean cross-entropy, backward, RMSprop update. Every implementation does exactly that work; the
median of ``--steps`` timed steps after warm-up is reported, with the compile (first-call) time.

    python -m benchmarks.speed                 # everything, on every backend JAX sees
    python -m benchmarks.speed --quick         # fewer steps and no sweeps
    python -m benchmarks.speed --set device --configs default large seed xl --deadline-s 180 --out DIR
                                               # an accelerator's rows (benchmarks/device_check.py runs this)

``--set device`` measures what matters on a GPU: lstm_jax's Trainer with each layer route (``impl``
``auto``, ``fused``, ``scan``, ``cudnn``; bf16 too), the fused layer's ``unroll`` lever, Flax
``nn.RNN(OptimizedLSTMCell)`` and PyTorch's cuDNN ``nn.LSTM``/``nn.GRU`` in float32 and bf16
autocast, with the compile time and the peak device memory of each (for JAX the compiled program's
own arguments, outputs and temporaries; for PyTorch ``torch.cuda.max_memory_allocated``).
``--deadline-s`` starts no new group of rows after that many seconds, writes what it has and skips
the sweeps and the generation benchmark.

Peers (when installed): PyTorch nn.LSTM/GRU/RNN (CPU threads = cores; cuDNN on GPU) in float32
and with bf16 autocast, and Flax linen nn.RNN over OptimizedLSTMCell/GRUCell/SimpleCell. The bf16
rows (lstm_jax's bf16 mode, PyTorch's autocast) run at every size on GPU and on CPUs with bf16
units (avx512_bf16 or amx_bf16); on a CPU without them the results say so instead (PyTorch's
autocast ran 10-25x slower than float32 on such a CPU). The peers take turns round by round, and
the allocator setting (``lstm_jax.runtime.tune_malloc()``, made first) holds for every peer alike.
PyTorch runs in a child process of its own (``in_own_process``), stepping only when told, so the
turns are kept: sharing libgomp with lstm_jax's oneDNN layer, whose calls on several threads hold an
OpenMP team of their own, left the process with more OpenMP threads than cores, at which libgomp
stops spin-waiting between parallel regions, and PyTorch's LSTM, which opens regions at every time
step, then ran 1.5-2x slower (seed 22 -> 46 ms per step; measured this way on the 2-core Intel Xeon).
Writes benchmarks/results/speed-<backend>[-<cpu>].{json,md}, the CPU named in the file and its name.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import machine
from lstm_jax import dispatch, onednn, parallel, runtime, scan_steps
from lstm_jax.charlm.model import CharLM, CharLMConfig, cross_entropy
from lstm_jax.charlm.sampling import generate
from lstm_jax.dispatch import plan

V, E = 92, 64
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name: (batch, time, hidden, layers)
    "seed": (128, 40, 128, 1),
    "default": (64, 100, 256, 2),
    "large": (64, 100, 512, 2),
    "xl": (256, 200, 1024, 2),  # GPU-sized: an accelerator's configs only
    "tiny": (4, 8, 16, 2),  # benchmarks/device_check.py --dry-run: the code paths, in seconds on a CPU
}
CPU_CONFIGS = ["seed", "default", "large"]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class Case(NamedTuple):
    """One implementation under test: ``run(n)`` performs ``n`` train steps and waits for them;
    ``peak_bytes``: the device memory its step needs, where known."""

    run: Callable[[int], None]
    compile_s: float
    peak_bytes: int | None = None


def compiled_bytes(lowered) -> int | None:
    """The device memory of a lowered program once compiled: arguments, outputs and temporaries
    (less what outputs alias), from XLA's memory analysis (None where the backend gives none)."""
    try:
        stats = lowered.compile().memory_analysis()
        return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                   - stats.alias_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def measure(cases: dict[str, Case], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each case, the cases taking turns round by round so that
    a slow spell of a shared machine hits all of them alike (ratios from the same rounds)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            t0 = time.perf_counter()
            case.run(steps)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


def in_own_process(builder: str, *args, **kwargs) -> Case:
    """``globals()[builder](*args, **kwargs)`` built and run in a child process (spawned: a fresh
    interpreter, which tunes the allocator as the parent did); ``run(n)``
    tells it to take ``n`` steps and waits. A builder's RuntimeError is raised here."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(there, builder, args, kwargs), daemon=True)
    proc.start()
    kind, value = here.recv()
    if kind == "error":
        proc.join()
        raise RuntimeError(value)

    def run(n: int) -> None:
        here.send(n)
        here.recv()

    return Case(run, *value)


def _serve(conn, builder: str, args, kwargs) -> None:
    if dispatch.cpu_choices_apply(dispatch.likely_platform()):
        runtime.tune_malloc()
    try:
        case = globals()[builder](*args, **kwargs)
    except RuntimeError as err:
        conn.send(("error", str(err)))
        return
    conn.send(("ready", (case.compile_s, case.peak_bytes)))
    while True:
        try:
            n = conn.recv()
        except EOFError:  # the parent is done with this case
            return
        case.run(n)
        conn.send(True)


def jax_case(step, state: tuple, batch: tuple, per_dispatch: int = 1) -> Case:
    """``step(*state, *batch) -> (*state, loss)`` (a plain function), jitted here. ``per_dispatch > 1``
    runs that many steps per call through ``lstm_jax.scan_steps`` (one ``lax.scan``, the state
    donated), on that many copies of the batch, as a user of the library would."""

    def one(state, batch):
        *state, loss = step(*state, *batch)
        return tuple(state), loss

    if per_dispatch > 1:
        batch = jax.tree.map(lambda b: jnp.broadcast_to(b, (per_dispatch, *b.shape)), batch)
    program = jax.jit(one) if per_dispatch == 1 else scan_steps(one)
    box = [tuple(state)]

    def run(n: int) -> None:
        loss = None
        for _ in range(max(1, n // per_dispatch)):
            box[0], loss = program(box[0], batch)  # one loss, or one per step
        jax.block_until_ready(loss)

    t0 = time.perf_counter()
    run(per_dispatch)
    compile_s = time.perf_counter() - t0
    run(per_dispatch)  # warm-up
    peak = compiled_bytes(program.lower(box[0], batch)) if hasattr(program, "lower") else None
    return Case(run, compile_s, peak)


def train_flops(batch, t, hidden, layers, cell) -> float:
    """Matmul FLOPs of one train step (forward + 2x for backward)."""
    g = GATES[cell]
    per_char = sum(2 * ((E if l == 0 else hidden) + hidden) * g * hidden for l in range(layers)) + 2 * hidden * V
    return 3.0 * per_char * batch * t


def rmsprop_step(loss, tx):
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``: the same update for every JAX model."""

    def step(p, o, x, y):
        l, g = jax.value_and_grad(loss)(p, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    return step


# --- lstm_jax ---------------------------------------------------------------------------------

def lstm_jax_step(cell: str, hidden: int, layers: int, impl: str, dtype: str = "float32", unroll: int = 1,
                  remat: bool = False):
    """A plain (not yet jitted) train step of lstm_jax's char model and its initial state."""
    model = CharLM(CharLMConfig(V, cell=cell, hidden_size=hidden, num_layers=layers, embed_size=E, dtype=dtype))
    params = model.init(jax.random.PRNGKey(0))
    tx = optax.rmsprop(1e-3)

    def loss(p, x, y):
        return cross_entropy(model.apply(p, None, x, impl=impl, unroll=unroll, remat=remat)[1], y)

    return rmsprop_step(loss, tx), (params, tx.init(params))


def _tokens(b, t):
    x = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, V)
    return x, x


def case_lstm_jax(cell, b, t, h, layers, impl, dtype="float32", unroll=1, per_dispatch=1) -> Case:
    step, state = lstm_jax_step(cell, h, layers, impl, dtype, unroll)
    return jax_case(step, state, _tokens(b, t), per_dispatch)


def case_lstm_jax_staggered(b, t, h, per_dispatch=10) -> Case:
    """The char model with its two LSTM layers in one staggered scan (``lstm_jax.kernels.staggered``:
    layer 2 a step behind layer 1, ``T + 1`` sequential steps instead of ``2T``), autodiff backward."""
    from lstm_jax import LSTMCell
    from lstm_jax.kernels.staggered import staggered_lstm2

    cell = LSTMCell(h)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = dict(embed=0.1 * jax.random.normal(k[0], (V, E)), l1=cell.init(k[1], E), l2=cell.init(k[2], h),
                  head=dict(kernel=0.05 * jax.random.normal(k[3], (h, V)), bias=jnp.zeros(V)))
    tx = optax.rmsprop(1e-3)

    def loss(p, x, y):
        x_proj = jnp.take(p["embed"], x.T, axis=0) @ p["l1"]["input_kernel"] + p["l1"]["bias"]  # (T, B, 4H)
        zero = cell.initial_carry(x.shape[0])
        ys = staggered_lstm2(p["l1"]["recurrent_kernel"], p["l2"]["input_kernel"], p["l2"]["bias"],
                             p["l2"]["recurrent_kernel"], x_proj, zero, zero)[3]
        logits = ys.reshape(-1, h) @ p["head"]["kernel"] + p["head"]["bias"]
        return cross_entropy(logits, y.T.reshape(-1))

    return jax_case(rmsprop_step(loss, tx), (params, tx.init(params)), _tokens(b, t), per_dispatch)


def case_lstm_jax_synchronous(*args, **kwargs) -> Case:
    """``case_lstm_jax`` under JAX's synchronous CPU dispatch, the option docs/cpu-backends.md gives a user's
    own one-step calls (the program runs on the calling thread, from the main malloc heap; see
    ``lstm_jax.runtime``). The setting is process-wide and read when JAX's CPU client starts, so
    this runs in a child process of its own (``in_own_process``), before its first computation."""
    from jax._src import xla_bridge  # private: a jax without this check measures unchecked

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        raise RuntimeError("synchronous dispatch must be set before JAX's first computation in this process")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return case_lstm_jax(*args, **kwargs)


def case_lstm_jax_trainer(cell, b, t, h, layers, chunk=10, dtype="float32", devices=1, impl="auto") -> Case:
    """lstm_jax's real training path: ``Trainer`` runs ``chunk`` steps per dispatch (lax.scan),
    batches gathered on the device, state donated, losses copied to the host after each chunk;
    data parallel over the first ``devices`` devices (train.py: one CPU device per core); the
    layers' ``impl`` as given."""
    from lstm_jax.charlm.training import TrainConfig, Trainer

    model = CharLM(CharLMConfig(V, cell=cell, hidden_size=h, num_layers=layers, embed_size=E, dtype=dtype))
    ids = np.random.default_rng(0).integers(0, V, b * (t * chunk * 8 + 2)).astype(np.int32)
    trainer = Trainer(model, TrainConfig(batch_size=b, seq_len=t, chunk_steps=chunk, learning_rate=1e-3,
                                         lr_schedule="constant", clip_norm=0.0), ids, epochs=10**6,
                      mesh=parallel.data_mesh(devices), impl=impl)
    box = [trainer.init_state()]

    def run(n: int) -> None:
        for _ in range(max(1, n // chunk)):
            box[0], _ = trainer.run_chunk(box[0], chunk)  # returns the losses on the host: synchronised

    t0 = time.perf_counter()
    run(chunk)
    compile_s = time.perf_counter() - t0
    return Case(run, compile_s, compiled_bytes(trainer.lower(box[0], chunk)))


def without_onednn(build: Callable[[], Case]) -> Case:
    """``build()`` with ``LSTM_JAX_ONEDNN=0`` while it traces: its program keeps the fused layer."""
    before = os.environ.get(onednn.ENV)
    os.environ[onednn.ENV] = "0"
    try:
        return build()
    finally:
        os.environ.pop(onednn.ENV) if before is None else os.environ.__setitem__(onednn.ENV, before)


# --- Flax ---------------------------------------------------------------------------------------

def case_flax(cell, b, t, h, layers, per_dispatch=1) -> Case:
    import flax.linen as nn

    cells = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Embed(V, E)(x)
            for _ in range(layers):
                y = nn.RNN(cells[cell](h))(y)
            return nn.Dense(V)(y)

    net = Net()
    x, y = _tokens(b, t)
    params = net.init(jax.random.PRNGKey(0), x)
    tx = optax.rmsprop(1e-3)

    step = rmsprop_step(lambda p, x, y: cross_entropy(net.apply(p, x), y), tx)
    return jax_case(step, (params, tx.init(params)), (x, y), per_dispatch)


# --- PyTorch ------------------------------------------------------------------------------------

def case_torch(cell, b, t, h, layers, device="cpu", autocast_bf16=False) -> Case:
    import torch

    torch.set_num_threads(os.cpu_count())
    mods = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
    emb, rnn, out = (torch.nn.Embedding(V, E), mods[cell](E, h, num_layers=layers, batch_first=True),
                     torch.nn.Linear(h, V))
    params = [*emb.parameters(), *rnn.parameters(), *out.parameters()]
    for m in (emb, rnn, out):
        m.to(device)
    opt = torch.optim.RMSprop(params, lr=1e-3)
    x = torch.randint(0, V, (b, t), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast_bf16):
            y, _ = rnn(emb(x))
            loss = torch.nn.functional.cross_entropy(out(y).reshape(-1, V).float(), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    def run(n: int) -> None:
        for _ in range(n):
            step()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(1)
    compile_s = time.perf_counter() - t0
    run(3)  # warm-up
    return Case(run, compile_s, int(torch.cuda.max_memory_allocated()) if device == "cuda" else None)


# --- generation ----------------------------------------------------------------------------------

def bench_generation(length=1000, rounds=3):
    """4 temperatures x ``length`` characters from a 2x256 LSTM: one jitted scan against a PyTorch
    per-character loop, taking turns for ``rounds`` rounds; median chars/s."""
    model = CharLM(CharLMConfig(V, hidden_size=256, num_layers=2))
    params = model.init(jax.random.PRNGKey(0))
    prime = np.arange(20, dtype=np.int32) % V
    temps = [0.2, 0.5, 1.0, 1.2]
    generate(model, params, prime, temps, length, jax.random.PRNGKey(0))  # compile
    cases = {"lstm_jax": Case(lambda n: generate(model, params, prime, temps, length, jax.random.PRNGKey(1)), 0.0)}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
        emb, rnn, out = (torch.nn.Embedding(V, V), torch.nn.LSTM(V, 256, num_layers=2, batch_first=True),
                         torch.nn.Linear(256, V))
        temp = torch.tensor(temps)[:, None]

        @torch.no_grad()
        def torch_loop(n):
            y, state = rnn(emb(torch.from_numpy(np.tile(prime, (len(temps), 1))).long()))
            logits = out(y[:, -1])
            for _ in range(length):
                nxt = torch.multinomial(torch.softmax(logits / temp, -1), 1)
                y, state = rnn(emb(nxt), state)
                logits = out(y[:, -1])

        cases["torch_loop"] = Case(torch_loop, 0.0)
    seconds = measure(cases, rounds, 1)
    result = {f"{name}_chars_per_s": len(temps) * length / s for name, s in seconds.items()}
    if "torch_loop" in seconds:
        result["ratio"] = seconds["torch_loop"] / seconds["lstm_jax"]
    return result


def matmul_peak(dtype, n: int = 2048) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def memory_bytes(t, remat) -> int:
    step, (p, o) = lstm_jax_step("lstm", 256, 2, "scan" if remat else "auto", remat=remat)
    x = jnp.zeros((64, t), jnp.int32)
    stats = jax.jit(step).lower(p, o, x, x).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)


def device_builders(cell: str, b: int, t: int, h: int, layers: int, unrolls, has_torch: bool,
                    dev: str) -> dict[str, Callable[[], Case]]:
    """The rows of ``--set device``: lstm_jax's Trainer on each layer route and in bf16, the fused
    layer's ``unroll`` lever in a user's own 10-step call, Flax and PyTorch (cuDNN on a GPU)."""
    trainer = functools.partial(case_lstm_jax_trainer, cell, b, t, h, layers)
    builders = {"lstm_jax Trainer (10 steps/dispatch)": trainer,
                "lstm_jax Trainer, fused layer": functools.partial(trainer, impl="fused"),
                "lstm_jax Trainer, autodiff scan": functools.partial(trainer, impl="scan")}
    if cell == "lstm":
        builders["lstm_jax Trainer, cudnn layer"] = functools.partial(trainer, impl="cudnn")
    builders["lstm_jax bf16 Trainer (10 steps/dispatch)"] = functools.partial(trainer, dtype="bfloat16")
    for u in unrolls:
        builders[f"lstm_jax fused, unroll {u} (10 steps/dispatch)"] = functools.partial(
            case_lstm_jax, cell, b, t, h, layers, "fused", unroll=u, per_dispatch=10)
    if cell == "lstm" and layers == 2:
        builders["lstm_jax staggered 2 layers, autodiff (10 steps/dispatch)"] = functools.partial(
            case_lstm_jax_staggered, b, t, h)
    if cell == "lstm":
        builders["flax nn.RNN (10 steps/dispatch)"] = functools.partial(case_flax, cell, b, t, h, layers,
                                                                        per_dispatch=10)
    if has_torch:
        builders[f"torch nn.{cell.upper()}"] = functools.partial(in_own_process, "case_torch", cell, b, t, h,
                                                                 layers, dev)
        builders[f"torch nn.{cell.upper()} bf16 autocast"] = functools.partial(
            in_own_process, "case_torch", cell, b, t, h, layers, dev, autocast_bf16=True)
    return builders


def main(argv: list[str] | None = None):
    on_cpu = dispatch.cpu_choices_apply(dispatch.likely_platform())
    if on_cpu:
        runtime.tune_malloc()  # before this process allocates its arrays, for every peer alike
        parallel.cpu_devices_per_core()  # as train.py: one CPU device per core (before JAX starts)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 10 steps per implementation, taking turns")
    ap.add_argument("--quick", action="store_true", help="2 rounds, no sweeps")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=CPU_CONFIGS)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    ap.add_argument("--set", choices=["all", "device"], default="all",
                    help="'all': every row (CPU set-ups too); 'device': an accelerator's rows")
    ap.add_argument("--unrolls", type=int, nargs="+", default=[1, 4, 16], help="--set device: the fused layer's "
                                                                                "unroll lever [1 4 16]")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no new group of rows after this many seconds; skip sweeps and generation")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the matmul that measures the peak [2048]")
    ap.add_argument("--out", default=None, help="folder of the result files [benchmarks/results]")
    ap.add_argument("--tag", default=None, help="result file stem [speed-<backend>[-<cpu>]]")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    late = lambda: args.deadline_s is not None and time.perf_counter() - start > args.deadline_s
    rounds = 2 if args.quick else args.rounds
    backend = jax.default_backend()
    rows, skipped = [], []
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    peak = {"float32": matmul_peak(jnp.float32, args.matmul_n), "bfloat16": matmul_peak(jnp.bfloat16, args.matmul_n)}
    info = machine.describe()
    bf16_units = backend != "cpu" or info["flags"]["avx512_bf16"] or info["flags"]["amx_bf16"]
    no_bf16 = "skipped: this CPU has no bf16 units (avx512_bf16 / amx_bf16), where bf16 runs slower than float32"
    per_round = 10
    for name in args.configs:
        b, t, h, layers = CONFIGS[name]
        for cell in args.cells:
            if late():
                skipped.append(f"{name}/{cell}")
                continue
            if args.set == "device":
                builders = device_builders(cell, b, t, h, layers, args.unrolls, has_torch,
                                           "cuda" if backend == "gpu" else "cpu")
                cases = {}
                for impl, build in builders.items():
                    if late():
                        rows.append(dict(config=name, cell=cell, impl=impl, error="not built: --deadline-s passed"))
                        continue
                    try:
                        cases[impl] = build()
                    except Exception as err:  # noqa: BLE001 -- one row's failure is a result, not the run's end
                        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
                        print(f"{name:8s} {cell:5s} {impl:44s} failed: {first}", flush=True)
                        rows.append(dict(config=name, cell=cell, impl=impl, error=f"failed: {first}"))
                rows += measured_rows(name, cell, cases, rounds, per_round, peak)
                if args.out:  # what is measured so far, in case the run is stopped
                    write(dict(backend=backend, tag=args.tag, rows=rows, partial=True, set=args.set,
                               matmul_peak_gflops={k: v / 1e9 for k, v in peak.items()}, machine=info,
                               generation=None, sweeps={}, command="(partial)"), Path(args.out))
                continue
            builders = {"lstm_jax Trainer (10 steps/dispatch)": lambda: case_lstm_jax_trainer(cell, b, t, h, layers),
                        "lstm_jax, 1 step/dispatch": lambda: case_lstm_jax(cell, b, t, h, layers, "auto"),
                        "lstm_jax, scan_steps (10 steps/dispatch)":
                            lambda: case_lstm_jax(cell, b, t, h, layers, "auto", per_dispatch=10),
                        "lstm_jax autodiff scan (10 steps/dispatch)":
                            lambda: case_lstm_jax(cell, b, t, h, layers, "scan", per_dispatch=10)}
            if backend == "cpu":
                builders["lstm_jax, 1 step/dispatch, synchronous dispatch"] = lambda: in_own_process(
                    "case_lstm_jax_synchronous", cell, b, t, h, layers, "auto")
            n = parallel.devices_for_batch(b)  # train.py's candidate on CPU: one device per core
            if backend == "cpu" and n > 1:
                builders[f"lstm_jax Trainer, {n} CPU devices"] = lambda: case_lstm_jax_trainer(
                    cell, b, t, h, layers, devices=n)
                if bf16_units:
                    builders[f"lstm_jax bf16 Trainer, {n} CPU devices"] = lambda: case_lstm_jax_trainer(
                        cell, b, t, h, layers, dtype="bfloat16", devices=n)
            if cell in ("lstm", "gru") and onednn.available():  # the same Trainers on the pure-JAX fused layer
                for dtype in ("float32", "bfloat16") if bf16_units else ("float32",):
                    bf = " bf16" if dtype == "bfloat16" else ""
                    for d in sorted({1, n}) if backend == "cpu" else [1]:
                        where = f", {d} CPU devices" if d > 1 else ""
                        builders[f"lstm_jax{bf} Trainer{where}, fused layer (no oneDNN)"] = functools.partial(
                            without_onednn, functools.partial(case_lstm_jax_trainer, cell, b, t, h, layers,
                                                              dtype=dtype, devices=d))
            if bf16_units:
                builders["lstm_jax bf16 Trainer (10 steps/dispatch)"] = lambda: case_lstm_jax_trainer(
                    cell, b, t, h, layers, dtype="bfloat16")
                builders["lstm_jax bf16, 1 step/dispatch"] = lambda: case_lstm_jax(
                    cell, b, t, h, layers, "auto", "bfloat16")
                if backend == "cpu":
                    builders["lstm_jax bf16, 1 step/dispatch, synchronous dispatch"] = lambda: in_own_process(
                        "case_lstm_jax_synchronous", cell, b, t, h, layers, "auto", "bfloat16")
            else:
                rows.append(dict(config=name, cell=cell, impl="lstm_jax bf16", error=no_bf16))
            builders["flax nn.RNN"] = lambda: case_flax(cell, b, t, h, layers)
            builders["flax nn.RNN (10 steps/dispatch)"] = lambda: case_flax(cell, b, t, h, layers, per_dispatch=10)
            if has_torch:
                dev = "cuda" if backend == "gpu" else "cpu"
                builders[f"torch nn.{cell.upper()}"] = lambda: in_own_process("case_torch", cell, b, t, h, layers, dev)
                if bf16_units:
                    builders[f"torch nn.{cell.upper()} bf16 autocast"] = lambda: in_own_process(
                        "case_torch", cell, b, t, h, layers, dev, autocast_bf16=True)
                else:
                    rows.append(dict(config=name, cell=cell, impl=f"torch nn.{cell.upper()} bf16 autocast",
                                     error=no_bf16))
            cases = {}
            for impl, build in builders.items():
                try:
                    cases[impl] = build()
                except RuntimeError as err:  # e.g. PyTorch's CPU bf16 LSTM needs oneDNN bf16 support
                    print(f"{name:8s} {cell:5s} {impl:44s} unavailable: {str(err).splitlines()[0][:100]}", flush=True)
                    rows.append(dict(config=name, cell=cell, impl=impl,
                                     error="unavailable: " + str(err).splitlines()[0][:200]))
            rows += measured_rows(name, cell, cases, rounds, per_round, peak)
    quick_end = late() or args.set == "device"
    out = dict(backend=backend, devices=[str(d) for d in jax.devices()], cpus=os.cpu_count(),
               device_kind=jax.devices()[0].device_kind, machine=info, cpu_tag=machine.cpu_tag(),
               jax=jax.__version__, set=args.set, skipped_for_time=skipped, tag=args.tag,
               matmul_peak_gflops={k: v / 1e9 for k, v in peak.items()}, rows=rows, sweeps={},
               generation=None if quick_end else bench_generation(),
               command="python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv),
               onednn=dict(available=onednn.available(), unavailable_reason=onednn.unavailable_reason(),
                           threads_per_layer_shape={k: v.get("threads", 0) for k, v in plan.decisions().items()
                                                    if "|onednn-" in k}))
    folder = Path(args.out) if args.out else RESULTS
    write(out, folder)  # the table first; the sweeps take a while
    if not args.quick and not quick_end:
        out["sweeps"] = run_sweeps(lambda sweeps: write(dict(out, sweeps=sweeps), folder))
        write(out, folder)
    print(markdown(out))
    return out


def measured_rows(name: str, cell: str, cases: dict[str, Case], rounds: int, per_round: int, peak: dict) -> list:
    """The rows of one group of cases, measured taking turns (printed as they come)."""
    b, t, h, layers = CONFIGS[name]
    rows = []
    for impl, step_s in measure(cases, rounds, per_round).items():
        flops = train_flops(b, t, h, layers, cell)
        dtype = "bfloat16" if "bf16" in impl else "float32"
        compile_s, peak_bytes = cases[impl].compile_s, cases[impl].peak_bytes
        rows.append(dict(config=name, cell=cell, impl=impl, batch=b, seq_len=t, hidden=h, layers=layers,
                         ms_per_step=step_s * 1e3, chars_per_s=b * t / step_s, compile_s=compile_s,
                         peak_bytes=peak_bytes, gflops=flops / step_s / 1e9,
                         share_of_matmul_peak=flops / step_s / peak[dtype]))
        memory = f" peak {peak_bytes / 2**20:8.1f} MiB" if peak_bytes else ""
        print(f"{name:8s} {cell:5s} {impl:44s} {step_s * 1e3:9.1f} ms {b * t / step_s:10.0f} chars/s "
              f"compile {compile_s:5.1f} s{memory}", flush=True)
    return rows


def result_name(out: dict) -> str:
    """The result files' stem: ``--tag``, else speed-<backend>[-<cpu>]."""
    if out.get("tag"):
        return out["tag"]
    return f"speed-{out['backend']}" + (f"-{out['cpu_tag']}" if out["backend"] == "cpu" else "")


def write(out: dict, folder: Path = RESULTS) -> None:
    machine.write_results(result_name(out), out, markdown(out), folder)


def _chars_per_s(b, t, h, layers=1) -> float:
    case = case_lstm_jax("lstm", b, t, h, layers, "auto", per_dispatch=10)
    return b * t / measure({"": case}, 3, 10)[""]


def run_sweeps(save=lambda sweeps: None):
    sweeps = {"chars_per_s_vs_T": [], "chars_per_s_vs_B": [], "chars_per_s_vs_H": [], "compile_s_vs_T": [],
              "temp_bytes_vs_T": []}
    for t in (25, 50, 100, 200):
        sweeps["chars_per_s_vs_T"].append((t, _chars_per_s(64, t, 256)))
    save(sweeps)
    for b in (16, 32, 64, 128, 256):
        sweeps["chars_per_s_vs_B"].append((b, _chars_per_s(b, 100, 256)))
    save(sweeps)
    for h in (64, 128, 256, 512):
        sweeps["chars_per_s_vs_H"].append((h, _chars_per_s(64, 100, h)))
    save(sweeps)
    for t in (40, 160, 640):
        for unroll in (1, 8):
            sweeps["compile_s_vs_T"].append(
                (t, unroll, case_lstm_jax("lstm", 128, t, 128, 1, "scan", unroll=unroll).compile_s))
    save(sweeps)
    for t in (100, 400, 1600):
        sweeps["temp_bytes_vs_T"].append((t, memory_bytes(t, False), memory_bytes(t, True)))
    return sweeps


def train_py_setup(rows: list[dict], config: str, cell: str, dtype: str) -> dict | None:
    """The Trainer row ``lstm_jax.training.fastest_setup`` would pick among those measured: the
    candidates in its order (fewest devices first, the fused layer before ``impl='auto'``), each
    later one taken only if 1.1x faster than the best before it."""
    from lstm_jax.dispatch.measure import simplest_fast_enough

    same = _measured(rows, config, cell)
    bf = " bf16" if dtype == "bfloat16" else ""
    order = [k for d in _device_counts(same, bf) for k in _trainer_rows(bf, d) if k in same]
    if not order:
        return None
    best = simplest_fast_enough({k: same[k]["ms_per_step"] for k in order})
    peer = lambda name: (f"{same[best]['chars_per_s'] / same[name]['chars_per_s']:.2f}x" if name in same else "-")
    return dict(config=config, cell=cell, dtype=dtype, impl=best, chars_per_s=same[best]["chars_per_s"],
                vs_torch=peer(f"torch nn.{cell.upper()}"), vs_torch_bf16=peer(f"torch nn.{cell.upper()} bf16 autocast"))


def _measured(rows: list[dict], config: str, cell: str) -> dict[str, dict]:
    """One config's and cell's rows that have a measurement, by implementation name."""
    return {r["impl"]: r for r in rows if r["config"] == config and r["cell"] == cell and "error" not in r}


def _trainer_rows(bf: str, devices: int) -> tuple[str, str]:
    """The names of the Trainer rows (``bf``: '' or ' bf16') on ``devices``: the fused layers, then
    ``impl='auto'``, in ``fastest_setup``'s order."""
    where = f", {devices} CPU devices" if devices > 1 else ""
    return (f"lstm_jax{bf} Trainer{where}, fused layer (no oneDNN)",
            f"lstm_jax{bf} Trainer{where}" if devices > 1 else f"lstm_jax{bf} Trainer (10 steps/dispatch)")


def _device_counts(impls, bf: str = "") -> list[int]:
    """The device counts of the (``bf``: ' bf16') Trainer rows among ``impls``: 1 and one per core."""
    return sorted({1} | {int(k.split(", ")[1].split()[0]) for k in impls
                         if k.startswith(f"lstm_jax{bf} Trainer, ") and "CPU devices" in k})


def _setup_name(impl: str) -> str:
    """A Trainer row's set-up in the docs' words: '2 devices, fused', '1 device'."""
    devices = impl.split(", ")[1].split()[0] if " CPU devices" in impl else "1"
    return f"{devices} device{'s' if devices != '1' else ''}" + (", fused" if "fused layer" in impl else "")


def summary_tables(rows: list[dict]) -> list[str]:
    """The speed tables of the README and docs/performance.md, from one run's rows: the Trainer
    set-up train.py takes (by ``fastest_setup``'s rule) against PyTorch; a user's own step against PyTorch; and the same
    Trainers on the fused layers against ``impl='auto'`` (oneDNN where it measured faster)."""
    pairs = list(dict.fromkeys((r["config"], r["cell"]) for r in rows))
    lines = ["| config | cell | float32: train.py's set-up | chars/s | vs PyTorch | bf16: train.py's set-up | chars/s "
             "| vs PyTorch bf16 autocast |", "|---|---|---|---|---|---|---|---|"]
    for cfg, cell in pairs:
        f32, bf16 = (train_py_setup(rows, cfg, cell, dt) for dt in ("float32", "bfloat16"))
        if f32 is None:
            continue
        bf = (f"{_setup_name(bf16['impl'])} | {bf16['chars_per_s']:,.0f} | {bf16['vs_torch_bf16']}" if bf16
              else "- | - | -")
        lines.append(f"| {cfg} | {cell} | {_setup_name(f32['impl'])} | {f32['chars_per_s']:,.0f} "
                     f"| {f32['vs_torch']} | {bf} |")
    user = [("lstm_jax, 1 step/dispatch", "torch"), ("lstm_jax, 1 step/dispatch, synchronous dispatch", "torch"),
            ("lstm_jax, scan_steps (10 steps/dispatch)", "torch"), ("lstm_jax bf16, 1 step/dispatch", "bf16"),
            ("lstm_jax bf16, 1 step/dispatch, synchronous dispatch", "bf16")]
    lines += ["", "| config | cell | float32, 1 step per call | synchronous dispatch | 10 per call (`scan_steps`) "
              "| bf16, 1 step per call | synchronous dispatch |", "|---|---|---|---|---|---|---|"]
    for cfg, cell in pairs:
        same = _measured(rows, cfg, cell)
        peers = {"torch": same.get(f"torch nn.{cell.upper()}"),
                 "bf16": same.get(f"torch nn.{cell.upper()} bf16 autocast")}
        cells = [f"{same[impl]['chars_per_s'] / peers[peer]['chars_per_s']:.2f}x"
                 if impl in same and peers[peer] else "-"
                 for impl, peer in user]
        lines.append(f"| {cfg} | {cell} | " + " | ".join(cells) + " |")
    n = _device_counts(r["impl"] for r in rows)[-1]  # one device per core
    counts = sorted({1, n})
    lines += ["", "| config | cell | " + " | ".join(
        f"{dt if d == 1 else ''}{', ' if d == 1 else ''}{d} device{'s' if d > 1 else ''}: fused | oneDNN (auto)"
        for dt in ("float32", "bf16") for d in counts) + " |", "|---|---|" + "---|---|" * 2 * len(counts)]
    for cfg, cell in pairs:
        same = {impl: r["chars_per_s"] for impl, r in _measured(rows, cfg, cell).items()}
        cells = []
        for bf in ("", " bf16"):
            for d in counts:
                fused, ours = (same.get(k) for k in _trainer_rows(bf, d))
                cells += [f"{fused:,.0f}" if fused else "-",
                          f"{ours:,.0f} ({ours / fused:.2f}x)" if fused and ours else "-"]
        if any(c != "-" for c in cells[::2]):
            lines.append(f"| {cfg} | {cell} | " + " | ".join(cells) + " |")
    return lines


def markdown(out) -> str:
    where = machine.describe_line(out["machine"]) if isinstance(out["machine"], dict) else out["machine"]
    lines = [f"# Train-step speed on {out['backend']}: {where}", "",
             f"Command: `{out['command']}`. Per implementation, the median over rounds of 10 steps after warm-up; "
             f"the implementations of a row group take turns round by round, so ratios are to peers measured in "
             f"the same rounds. 'n steps/dispatch' runs n train steps in one jitted `lax.scan` (lstm_jax's "
             f"Trainer does this); without it every step is its own jitted call. Large-matmul peak: "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in out["matmul_peak_gflops"].items()), "",
             "| config | cell | implementation | ms/step | chars/s | compile s | GFLOP/s | % of matmul peak "
             "| vs torch | vs torch bf16 | vs flax | vs flax 10/dispatch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peer_names = {"torch": lambda cell: f"torch nn.{cell.upper()}",
                  "torch_bf16": lambda cell: f"torch nn.{cell.upper()} bf16 autocast",
                  "flax": lambda cell: "flax nn.RNN",
                  "flax10": lambda cell: "flax nn.RNN (10 steps/dispatch)"}
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['cell']} | {r['impl']} | {r['error'][:110]} | | | | | | | | |")
            continue
        same = {p["impl"]: p for p in out["rows"]
                if p["config"] == r["config"] and p["cell"] == r["cell"] and "error" not in p}

        def ratio(peer):
            p = same.get(peer_names[peer](r["cell"]))
            return f"{r['chars_per_s'] / p['chars_per_s']:.2f}x" if p and p is not r else "-"

        lines.append(f"| {r['config']} | {r['cell']} | {r['impl']} | {r['ms_per_step']:.1f} | "
                     f"{r['chars_per_s']:,.0f} | {r['compile_s']:.1f} | {r['gflops']:.1f} | "
                     f"{100 * r['share_of_matmul_peak']:.0f}% | "
                     f"{ratio('torch')} | {ratio('torch_bf16')} | {ratio('flax')} | {ratio('flax10')} |")
    if any(r["impl"].startswith("lstm_jax") and "error" not in r for r in out["rows"]):
        lines += ["", "The summary tables (README, docs/performance.md): the Trainer set-up `train.py` takes by "
                  "`fastest_setup`'s rule (candidates "
                  "from the simplest: fewest devices, fused layer first; a later one must be 1.1x faster than the best "
                  "before it), applied to the rows above; a user's own step on one device, `impl='auto'`, against "
                  "PyTorch in the same dtype; fused layers against `impl='auto'` in the same Trainers:", "",
                  *summary_tables(out["rows"])]
    dnnl = out.get("onednn")
    if dnnl is not None:
        if not dnnl["available"]:
            lines += ["", f"oneDNN LSTM layer (lstm_jax.onednn): not available ({dnnl['unavailable_reason']})."]
        else:
            chosen = [f"{k.split('|onednn-')[1].replace(f'|v{onednn.MEASURE_VERSION}|', ' ').replace('|', ' ')}: "
                      f"{f'oneDNN, {v} thread(s)' if v else 'fused'}"
                      for k, v in dnnl["threads_per_layer_shape"].items()]
            lines += ["", "LSTM and GRU layers (cell, steps x rows x inputs x hidden, dtype, cores per device) "
                      "as `impl='auto'` chose them by measurement (lstm_jax.onednn.pays): " + "; ".join(chosen) + "."]
    g = out["generation"]
    if out.get("skipped_for_time"):
        lines += ["", "Not measured (the run's --deadline-s had passed): " + ", ".join(out["skipped_for_time"]) + "."]
    if any(r.get("peak_bytes") for r in out["rows"]):
        lines += ["", "Peak device memory of a step (JAX: the compiled program's arguments, outputs and temporaries; "
                  "PyTorch: torch.cuda.max_memory_allocated), MiB: " + "; ".join(
                      f"{r['config']} {r['cell']} {r['impl']}: {r['peak_bytes'] / 2**20:,.0f}"
                      for r in out["rows"] if r.get("peak_bytes"))]
    if g is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"Generation (2x256 LSTM, 4 temperatures x 1000 chars, one batch): lstm_jax "
              f"{g['lstm_jax_chars_per_s']:,.0f} chars/s"
              + (f", PyTorch per-character loop {g['torch_loop_chars_per_s']:,.0f} "
                 f"chars/s ({g['ratio']:.1f}x)" if "ratio" in g else "")]
    for name, values in out["sweeps"].items():
        lines += ["", f"{name}: " + ", ".join(str(tuple(round(v, 3) if isinstance(v, float) else v for v in row))
                                              for row in values)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
