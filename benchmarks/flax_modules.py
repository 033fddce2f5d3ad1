"""lstm_jax's NNX module against the functional stack it wraps and Flax's own nnx.RNN, side by side.

    python -m benchmarks.flax_modules            # seed, default, large; LSTM and GRU
    python -m benchmarks.flax_modules --quick

The same char model three ways, one jitted train step per call (a library user's own loop):
nnx.Embed (V=92 -> 64), L recurrent layers, a dense head to 92 logits, mean cross-entropy,
RMSprop. (1) the functional ``RecurrentStack`` under plain ``jax.jit``; (2) ``lstm_jax.nnx.LSTM``/
``GRU`` inside an NNX model; (3) Flax's ``nnx.RNN(nnx.OptimizedLSTMCell / nnx.GRUCell)``. Both
NNX models are split once and merged inside the jitted step (``nnx.split`` / ``nnx.merge``), the
fast way Flax recommends. Cases take turns round by round (``speed.measure``).
Writes ``benchmarks/results/flax-modules-<backend>[-<cpu>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json

import jax
import optax
from flax import nnx

from benchmarks import machine
from benchmarks.speed import CONFIGS, E, V, _tokens, jax_case, measure, rmsprop_step
from lstm_jax import RecurrentStack, cross_entropy, make_cell, runtime
from lstm_jax import nnx as lj_nnx


def case_functional(cell, b, t, h, layers):
    stack = RecurrentStack(make_cell(cell, h), num_layers=layers)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"embed": jax.random.normal(k[0], (V, E)), "rnn": stack.init(k[1], E),
              "head": {"kernel": jax.random.normal(k[2], (h, V)) * h**-0.5, "bias": jax.numpy.zeros(V)}}

    def loss(p, x, y):
        ys = stack.apply(p["rnn"], p["embed"][x])[1]
        return cross_entropy(ys @ p["head"]["kernel"] + p["head"]["bias"], y)

    tx = optax.rmsprop(1e-3)
    return jax_case(rmsprop_step(loss, tx), (params, tx.init(params)), _tokens(b, t))


class Net(nnx.Module):
    """Embedding, the given recurrent layers, dense head: the same model around either RNN."""

    def __init__(self, layers: list, hidden: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, E, rngs=rngs)
        self.rnn = nnx.List(layers)
        self.head = nnx.Linear(hidden, V, rngs=rngs)

    def __call__(self, x):
        y = self.embed(x)
        for layer in self.rnn:
            # nnx.RNN draws its (zero) initial carry from an RNG stream: a fresh one inside the trace
            y = layer(y, rngs=nnx.Rngs(0)) if isinstance(layer, nnx.RNN) else layer(y)
        return self.head(y)


def case_nnx(make_layers, h, b, t):
    rngs = nnx.Rngs(0)
    graphdef, params, rest = nnx.split(Net(make_layers(rngs), h, rngs), nnx.Param, ...)  # rest: RNG state
    tx = optax.rmsprop(1e-3)

    def loss(p, x, y):
        return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

    return jax_case(rmsprop_step(loss, tx), (params, tx.init(params)), _tokens(b, t))


def ours(cell, h, layers):
    kind = {"lstm": lj_nnx.LSTM, "gru": lj_nnx.GRU}[cell]
    return lambda rngs: [kind(E, h, num_layers=layers, rngs=rngs)]


def flax_own(cell, h, layers):
    make = {"lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell}[cell]
    return lambda rngs: [nnx.RNN(make(E if i == 0 else h, h, rngs=rngs)) for i in range(layers)]


def main():
    runtime.tune_malloc()  # before this process allocates its arrays
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--cells", nargs="+", default=["lstm", "gru"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    info = machine.describe()
    rows = []
    for name in args.configs:
        b, t, h, layers = CONFIGS[name]
        steps = 2 if name != "seed" else 5
        rounds = 3 if args.quick else 5
        for cell in args.cells:
            cases = {"functional RecurrentStack": case_functional(cell, b, t, h, layers),
                     "lstm_jax.nnx module": case_nnx(ours(cell, h, layers), h, b, t),
                     "Flax nnx.RNN": case_nnx(flax_own(cell, h, layers), h, b, t)}
            times = measure(cases, rounds, steps)
            row = dict(config=name, cell=cell, **{k: v * 1e3 for k, v in times.items()})
            row["module_vs_functional"] = times["lstm_jax.nnx module"] / times["functional RecurrentStack"]
            row["flax_vs_module"] = times["Flax nnx.RNN"] / times["lstm_jax.nnx module"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = dict(machine=info, rows=rows)
    tag = f"flax-modules-{info['backend']}" + (f"-{machine.cpu_tag()}" if info["backend"] == "cpu" else "")
    lines = [f"# lstm_jax.nnx against the functional stack and Flax nnx.RNN ({info['backend']})", "",
             f"Machine: {machine.describe_line(info)}.", "",
             "ms per train step, one jitted step per call, median of rounds taking turns "
             "(`python -m benchmarks.flax_modules`).", "",
             "| config | cell | functional RecurrentStack | lstm_jax.nnx module | Flax nnx.RNN "
             "| module / functional | Flax / module |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['cell']} | {r['functional RecurrentStack']:.1f} "
                     f"| {r['lstm_jax.nnx module']:.1f} "
                     f"| {r['Flax nnx.RNN']:.1f} | {r['module_vs_functional']:.3f} | {r['flax_vs_module']:.2f}x |")
    machine.write_results(tag, out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
