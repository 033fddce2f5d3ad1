"""Train-step speed of lstm_jax against its peers, measured side by side in one run.

A train step is: embedding (V=92 -> 64), L recurrent layers, dense to 92 logits at every step,
mean cross-entropy, backward, RMSprop update. Every implementation does exactly that work; the
median of ``--steps`` timed steps after warm-up is reported, with the compile (first-call) time.

    python benchmarks/speed.py                 # everything, on every backend JAX sees
    python benchmarks/speed.py --quick         # fewer steps and no sweeps

Peers (when installed): PyTorch nn.LSTM/GRU/RNN (CPU threads = cores; cuDNN on GPU), Flax linen
nn.RNN over OptimizedLSTMCell/GRUCell/SimpleCell, and jax.experimental.rnn (cuDNN) on GPU.
Writes benchmarks/results/speed-<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lstm_jax.model import CharLM, CharLMConfig, cross_entropy  # noqa: E402
from lstm_jax.sampling import generate  # noqa: E402

V, E = 92, 64
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name: (batch, time, hidden, layers)
    "seed": (128, 40, 128, 1),
    "default": (64, 100, 256, 2),
    "large": (64, 100, 512, 2),
}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _time(step, state: tuple, batch: tuple, steps: int, warmup: int = 3) -> tuple[float, float]:
    """``(first-call seconds, median step seconds)`` of ``step(*state, *batch) -> (*state, loss)``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(*state, *batch))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(step(*out[:-1], *batch))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times[warmup:]))


def train_flops(batch, t, hidden, layers, cell) -> float:
    """Matmul FLOPs of one train step (forward + 2x for backward)."""
    g = GATES[cell]
    per_char = sum(2 * ((E if l == 0 else hidden) + hidden) * g * hidden for l in range(layers)) + 2 * hidden * V
    return 3.0 * per_char * batch * t


# --- lstm_jax ---------------------------------------------------------------------------------

def lstm_jax_step(cell: str, hidden: int, layers: int, impl: str, dtype: str = "float32", unroll: int = 1,
                  remat: bool = False):
    model = CharLM(CharLMConfig(V, cell=cell, hidden_size=hidden, num_layers=layers, embed_size=E, dtype=dtype))
    params = model.init(jax.random.PRNGKey(0))
    tx = optax.rmsprop(1e-3)

    def loss(p, x, y):
        emb = jnp.take(p["embedding"], x, axis=0)
        _, ys = model.stack.apply(p["rnn"], emb, impl=impl, unroll=unroll, remat=remat)
        logits = ys @ p["head"]["kernel"] + p["head"]["bias"]
        return cross_entropy(logits, y)

    @jax.jit
    def step(p, o, x, y):
        l, g = jax.value_and_grad(loss)(p, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    return step, (params, tx.init(params))


def bench_lstm_jax(cell, b, t, h, layers, impl, steps, dtype="float32", unroll=1):
    step, (p, o) = lstm_jax_step(cell, h, layers, impl, dtype, unroll)
    x = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, V)
    return _time(step, (p, o), (x, x), steps)


def bench_lstm_jax_trainer(cell, b, t, h, layers, steps, chunk=10):
    """lstm_jax's real training path: ``Trainer`` runs ``chunk`` steps per dispatch (lax.scan),
    batches gathered on the device, state donated; reported per step."""
    from lstm_jax.training import Trainer, TrainConfig

    model = CharLM(CharLMConfig(V, cell=cell, hidden_size=h, num_layers=layers, embed_size=E))
    ids = np.random.default_rng(0).integers(0, V, b * (t * chunk * 2 + 2)).astype(np.int32)
    trainer = Trainer(model, TrainConfig(batch_size=b, seq_len=t, chunk_steps=chunk, learning_rate=1e-3,
                                         lr_schedule="constant", clip_norm=0.0), ids)
    state = trainer.init_state()
    t0 = time.perf_counter()
    state, _ = trainer.run_chunk(state, chunk)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(max(2, steps // chunk) + 1):
        t0 = time.perf_counter()
        state, _ = trainer.run_chunk(state, chunk)  # returns the losses on the host: synchronised
        times.append((time.perf_counter() - t0) / chunk)
    return compile_s, float(np.median(times[1:]))


# --- Flax ---------------------------------------------------------------------------------------

def bench_flax(cell, b, t, h, layers, steps):
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
    x = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, V)
    params = net.init(jax.random.PRNGKey(0), x)
    tx = optax.rmsprop(1e-3)

    @jax.jit
    def step(p, o, x, y):
        l, g = jax.value_and_grad(lambda p: cross_entropy(net.apply(p, x), y))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    return _time(step, (params, tx.init(params)), (x, x), steps)


# --- PyTorch ------------------------------------------------------------------------------------

def bench_torch(cell, b, t, h, layers, steps, device="cpu", autocast_bf16=False):
    import torch

    torch.set_num_threads(os.cpu_count())
    mods = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
    emb, rnn, out = torch.nn.Embedding(V, E), mods[cell](E, h, num_layers=layers, batch_first=True), torch.nn.Linear(h, V)
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

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


# --- generation ----------------------------------------------------------------------------------

def bench_generation(length=1000):
    model = CharLM(CharLMConfig(V, hidden_size=256, num_layers=2))
    params = model.init(jax.random.PRNGKey(0))
    prime = np.arange(20, dtype=np.int32) % V
    temps = [0.2, 0.5, 1.0, 1.2]
    generate(model, params, prime, temps, length, jax.random.PRNGKey(0))  # compile
    t0 = time.perf_counter()
    generate(model, params, prime, temps, length, jax.random.PRNGKey(1))
    ours = len(temps) * length / (time.perf_counter() - t0)
    result = {"lstm_jax_chars_per_s": ours}
    try:
        import torch
    except ImportError:
        return result
    torch.set_num_threads(os.cpu_count())
    emb, rnn, out = torch.nn.Embedding(V, V), torch.nn.LSTM(V, 256, num_layers=2, batch_first=True), torch.nn.Linear(256, V)
    temp = torch.tensor(temps)[:, None]
    with torch.no_grad():
        t0 = time.perf_counter()
        tok = torch.from_numpy(np.tile(prime, (4, 1))).long()
        y, state = rnn(emb(tok))
        logits = out(y[:, -1])
        for _ in range(length):
            nxt = torch.multinomial(torch.softmax(logits / temp, -1), 1)
            y, state = rnn(emb(nxt), state)
            logits = out(y[:, -1])
        result["torch_loop_chars_per_s"] = len(temps) * length / (time.perf_counter() - t0)
    result["ratio"] = result["lstm_jax_chars_per_s"] / result["torch_loop_chars_per_s"]
    return result


def matmul_peak(dtype) -> float:
    n = 2048
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
    stats = step.lower(p, o, x, x).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 steps, no sweeps")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    args = ap.parse_args()
    steps = 5 if args.quick else args.steps
    backend = jax.default_backend()
    rows = []
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    peak = {"float32": matmul_peak(jnp.float32), "bfloat16": matmul_peak(jnp.bfloat16)}
    for name in args.configs:
        b, t, h, layers = CONFIGS[name]
        for cell in args.cells:
            cases = [("lstm_jax Trainer (10 steps/dispatch)", lambda: bench_lstm_jax_trainer(cell, b, t, h, layers, steps)),
                     ("lstm_jax scan", lambda: bench_lstm_jax(cell, b, t, h, layers, "scan", steps)),
                     ("lstm_jax bf16", lambda: bench_lstm_jax(cell, b, t, h, layers, "auto", steps, "bfloat16"))]
            if cell != "rnn":
                cases.insert(1, ("lstm_jax fused", lambda: bench_lstm_jax(cell, b, t, h, layers, "fused", steps)))
            cases.append(("flax nn.RNN", lambda: bench_flax(cell, b, t, h, layers, steps)))
            if has_torch:
                dev = "cuda" if backend == "gpu" else "cpu"
                cases.append((f"torch nn.{cell.upper()}", lambda: bench_torch(cell, b, t, h, layers, steps, dev)))
                if name == "seed" or backend == "gpu":  # CPU autocast runs 10-25x slower than f32 here
                    cases.append((f"torch nn.{cell.upper()} bf16 autocast",
                                  lambda: bench_torch(cell, b, t, h, layers, steps, dev, autocast_bf16=True)))
            for impl, fn in cases:
                try:
                    compile_s, step_s = fn()
                except RuntimeError as err:  # e.g. PyTorch's CPU bf16 LSTM needs oneDNN bf16 support
                    print(f"{name:8s} {cell:5s} {impl:36s} unavailable: {str(err).splitlines()[0][:100]}", flush=True)
                    rows.append(dict(config=name, cell=cell, impl=impl, error=str(err).splitlines()[0][:200]))
                    continue
                flops = train_flops(b, t, h, layers, cell)
                dtype = "bfloat16" if "bf16" in impl else "float32"
                rows.append(dict(config=name, cell=cell, impl=impl, batch=b, seq_len=t, hidden=h, layers=layers,
                                 ms_per_step=step_s * 1e3, chars_per_s=b * t / step_s, compile_s=compile_s,
                                 gflops=flops / step_s / 1e9, share_of_matmul_peak=flops / step_s / peak[dtype]))
                print(f"{name:8s} {cell:5s} {impl:36s} {step_s * 1e3:9.1f} ms {b * t / step_s:10.0f} chars/s "
                      f"compile {compile_s:5.1f} s", flush=True)
    out = dict(backend=backend, devices=[str(d) for d in jax.devices()], cpus=os.cpu_count(),
               machine=platform.processor() or platform.machine(), jax=jax.__version__,
               matmul_peak_gflops={k: v / 1e9 for k, v in peak.items()}, rows=rows, sweeps={},
               generation=bench_generation(), command="python benchmarks/speed.py " + " ".join(sys.argv[1:]))
    write(out)  # the table first; the sweeps take a while
    if not args.quick:
        out["sweeps"] = run_sweeps(steps, lambda sweeps: write(dict(out, sweeps=sweeps)))
        write(out)
    print(markdown(out))


def write(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"speed-{out['backend']}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"speed-{out['backend']}.md").write_text(markdown(out))


def run_sweeps(steps, save=lambda sweeps: None):
    sweeps = {"chars_per_s_vs_T": [], "chars_per_s_vs_B": [], "chars_per_s_vs_H": [], "compile_s_vs_T": [],
              "temp_bytes_vs_T": []}
    for t in (25, 50, 100, 200):
        sweeps["chars_per_s_vs_T"].append((t, 64 * t / bench_lstm_jax("lstm", 64, t, 256, 1, "auto", steps)[1]))
    save(sweeps)
    for b in (16, 32, 64, 128, 256):
        sweeps["chars_per_s_vs_B"].append((b, b * 100 / bench_lstm_jax("lstm", b, 100, 256, 1, "auto", steps)[1]))
    save(sweeps)
    for h in (64, 128, 256, 512):
        sweeps["chars_per_s_vs_H"].append((h, 64 * 100 / bench_lstm_jax("lstm", 64, 100, h, 1, "auto", steps)[1]))
    save(sweeps)
    for t in (40, 160, 640):
        for unroll in (1, 8):
            sweeps["compile_s_vs_T"].append((t, unroll, bench_lstm_jax("lstm", 128, t, 128, 1, "scan", 2, unroll=unroll)[0]))
    save(sweeps)
    for t in (100, 400, 1600):
        sweeps["temp_bytes_vs_T"].append((t, memory_bytes(t, False), memory_bytes(t, True)))
    return sweeps


def markdown(out) -> str:
    lines = [f"# Train-step speed on {out['backend']} ({out['machine']}, {out['cpus']} CPUs, jax {out['jax']})", "",
             f"Command: `{out['command']}`. Median of timed steps after warm-up; ratios are to the peer "
             f"measured in the same run. Large-matmul peak: "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in out["matmul_peak_gflops"].items()), "",
             "| config | cell | implementation | ms/step | chars/s | compile s | GFLOP/s | % of matmul peak | vs torch | vs flax |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['cell']} | {r['impl']} | unavailable: {r['error'][:80]} | | | | | | |")
            continue
        peers = {p["impl"].split()[0]: p for p in out["rows"] if p["config"] == r["config"] and p["cell"] == r["cell"]
                 and "error" not in p and p["impl"] in (f"torch nn.{r['cell'].upper()}", "flax nn.RNN")}
        ratio = lambda k: f"{r['chars_per_s'] / peers[k]['chars_per_s']:.2f}x" if k in peers else "-"
        lines.append(f"| {r['config']} | {r['cell']} | {r['impl']} | {r['ms_per_step']:.1f} | {r['chars_per_s']:,.0f} | "
                     f"{r['compile_s']:.1f} | {r['gflops']:.1f} | {100 * r['share_of_matmul_peak']:.0f}% | "
                     f"{ratio('torch')} | {ratio('flax')} |")
    g = out["generation"]
    lines += ["", f"Generation (2x256 LSTM, 4 temperatures x 1000 chars, one batch): lstm_jax "
              f"{g['lstm_jax_chars_per_s']:,.0f} chars/s" + (f", PyTorch per-character loop {g['torch_loop_chars_per_s']:,.0f} "
                                                          f"chars/s ({g['ratio']:.1f}x)" if "ratio" in g else "")]
    for name, values in out["sweeps"].items():
        lines += ["", f"{name}: " + ", ".join(str(tuple(round(v, 3) if isinstance(v, float) else v for v in row)) for row in values)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
