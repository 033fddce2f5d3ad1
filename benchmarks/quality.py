"""Quality under a fixed time budget: validation bits-per-character against training minutes.

Trains train.py's default configuration (or the flags given) on the state_union corpus for
``--minutes`` of training time, measuring validation bpc over the whole held-out 2002-2006 text
every ``--eval-every`` minutes (evaluation time is not counted). The run's length follows
train.py's ``--minutes`` rule (``lstm_jax.charlm.budget``): the compiled step is timed on a scratch
state, the step count that fits the budget is fixed, and a cosine schedule spans it (with
``--lr-schedule cosine``, the default). With ``--peer torch`` the PyTorch reference (nn.LSTM,
embedding 64, 2x256, RMSprop lr 2e-3, clip 5, B=64, T=100, truncated BPTT; float32) runs in the
same process afterwards under the same protocol and the same rule: its step timed on a scratch
copy, its cosine (to 10%) over the steps that fit.

    NLTK_DATA=../shared/nltk_data python -m benchmarks.quality --minutes 8 --peer torch

Validation reads the trained weights; with ``--ema-decay D`` (train.py's weight average, which
does not change the training) the average is validated too where the run ends (``val_bpc_ema``).
With ``--same-params`` the hidden size is the one (a multiple of 8) whose model has the parameter
count nearest train.py's default model (the 2x256 LSTM): the cells compared at equal size, e.g.

    NLTK_DATA=../shared/nltk_data python -m benchmarks.quality --cell mingru --same-params --tag quality-cells-mingru

Writes benchmarks/results/quality.json, quality.md and quality.png (``--tag`` names them).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import machine
from lstm_jax import dispatch, runtime
from lstm_jax.charlm import budget
from lstm_jax.charlm import train as train_script  # train.py's defaults are what is measured
from lstm_jax.charlm.data import Vocabulary, load_corpus, split_documents
from lstm_jax.charlm.model import CharLM, CharLMConfig, nats_to_bpc
from lstm_jax.charlm.training import TrainConfig, Trainer, eval_params, evaluate_bpc, fastest_setup
from lstm_jax.core.errors import ConfigError, LstmJaxError
from lstm_jax.layers import parallel

RESULTS = Path(__file__).resolve().parent / "results"


def parameter_count(config: dict, vocab_size: int) -> int:
    """The number of parameters of the char model ``config`` describes (shapes only, nothing computed)."""
    model = CharLM(CharLMConfig(vocab_size, **{k: config[k] for k in train_script.MODEL_KEYS}))
    return sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0))))


def same_size_hidden(config: dict, vocab_size: int) -> int:
    """The hidden size, a multiple of 8, whose model has the parameter count nearest train.py's
    default model's (every other setting as in ``config``): the count grows with the hidden size,
    so a bisection finds the crossing and the nearer neighbour wins."""
    target = parameter_count({**config, **{k: train_script.DEFAULTS[k] for k in ("cell", "hidden_size")}},
                             vocab_size)
    count = lambda units: parameter_count({**config, "hidden_size": 8 * units}, vocab_size)
    low, high = 1, 2
    while count(high) < target:
        low, high = high, 2 * high
    while high - low > 1:  # count(low) < target <= count(high), or low = 1
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < target else (low, mid)
    return 8 * min((low, high), key=lambda units: abs(count(units) - target))


def run_lstm_jax(config: dict, train_ids, val_ids, vocab_size: int, minutes: float, eval_every: float,
                 devices: int = 1, impl: str = "auto", chosen: tuple[str, ...] = ()) -> tuple[list[dict], float]:
    """The validation curve of a ``minutes``-long run, and the planned step time in seconds.
    ``chosen``: what ``--recipe auto`` decides here (``'dropout'``: by the steps planned from the
    timed step, as train.py forecasts them; ``config`` records the choice)."""
    mesh = parallel.data_mesh(devices)

    def timed_trainer() -> tuple[Trainer, budget.Costs]:
        model = CharLM(CharLMConfig(vocab_size, **{k: config[k] for k in train_script.MODEL_KEYS}))
        trainer = Trainer(model, TrainConfig(**{k: config[k] for k in train_script.TRAIN_KEYS}), train_ids,
                          config["epochs"], mesh, impl)
        return trainer, budget.measure_costs(trainer, lambda state: None)  # compiled, timed on a scratch state

    trainer, costs = timed_trainer()
    planned = budget.plan_total_steps(minutes * 60, costs, trainer.steps_per_epoch,
                                      chunk_steps=trainer.config.chunk_steps), "steps planned for the budget"
    if "dropout" in chosen and train_script.recipe_dropout(config, *planned, print):
        trainer, costs = timed_trainer()  # the budget counts training time only: timing again costs none of it
    model = trainer.model
    total = trainer.schedule_steps = budget.plan_total_steps(minutes * 60, costs, trainer.steps_per_epoch,
                                                             chunk_steps=trainer.config.chunk_steps)
    if total < 1:
        least = max(0.1, math.ceil(100 * costs.step_s / 60) / 100)
        raise ConfigError(f"--minutes {minutes:g} holds no train step here ({1e3 * costs.step_s:.0f} ms per step); "
                          f"give --minutes {least:g} or more.", "--minutes")
    print(f"lstm_jax {1e3 * costs.step_s:.1f} ms per step: {total} steps planned", flush=True)
    state = trainer.init_state()
    curve, train_s, next_eval, recent = [], 0.0, eval_every * 60, []
    while train_s < minutes * 60 and int(state.step) < total:
        for n in trainer.chunk_sizes(int(state.step), total):
            t0 = time.perf_counter()
            state, losses = trainer.run_chunk(state, n)
            train_s += time.perf_counter() - t0
            recent = (recent + list(losses))[-200:]
            done = train_s >= minutes * 60 or int(state.step) >= total
            if train_s >= next_eval or done:
                val = evaluate_bpc(model, state.params, val_ids, 16, mesh=mesh)
                curve.append(dict(minutes=train_s / 60, step=int(state.step),
                                  train_bpc=float(nats_to_bpc(np.mean(recent))), val_bpc=val))
                average = eval_params(state.params, state.opt_state)
                if done and average is not state.params:  # --ema-decay: the average, where the run ends
                    curve[-1]["val_bpc_ema"] = evaluate_bpc(model, average, val_ids, 16, mesh=mesh)
                ema = curve[-1].get("val_bpc_ema")
                print(f"lstm_jax {train_s / 60:5.2f} min step {int(state.step):6d} "
                      f"train {curve[-1]['train_bpc']:.3f} val {val:.3f}"
                      + (f", the weights' average {ema:.3f}" if ema else ""), flush=True)
                next_eval += eval_every * 60
                if done:
                    return curve, costs.step_s
    return curve, costs.step_s


def run_torch(train_ids, val_ids, vocab_size: int, minutes: float, eval_every: float) -> list[dict]:
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab_size, 64)
            self.rnn = torch.nn.LSTM(64, 256, num_layers=2, batch_first=True)
            self.out = torch.nn.Linear(256, vocab_size)

        def forward(self, x, state=None):
            y, state = self.rnn(self.emb(x), state)
            return self.out(y), state

    net = Net()
    b, t = 64, 100
    n = len(train_ids) // b
    data = torch.from_numpy(np.asarray(train_ids[: b * n], np.int64).reshape(b, n))
    spe = (n - 1) // t

    def train_step(net, opt, sched, step, state):
        s = step % spe
        if s == 0:
            state = None
        x, y = data[:, s * t : s * t + t], data[:, s * t + 1 : s * t + t + 1]
        logits, state = net(x, state)
        state = tuple(h.detach() for h in state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        return loss.item(), state

    def cosine(total):  # as lstm_jax's cosine_schedule: to 10% over the planned steps
        return lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    # the same rule as lstm_jax's: the step timed on a scratch copy, then the steps that fit, planned
    scratch = copy.deepcopy(net)
    scratch_opt = torch.optim.RMSprop(scratch.parameters(), lr=2e-3)
    scratch_sched = torch.optim.lr_scheduler.LambdaLR(scratch_opt, lambda step: 1.0)
    state = train_step(scratch, scratch_opt, scratch_sched, 0, None)[1]
    t0 = time.perf_counter()
    for step in range(1, 21):
        state = train_step(scratch, scratch_opt, scratch_sched, step, state)[1]
    step_s = (time.perf_counter() - t0) / 20
    total = budget.plan_total_steps(minutes * 60, budget.Costs(step_s, 0.0), spe)
    print(f"torch    {1e3 * step_s:.1f} ms per step: {total} steps planned", flush=True)
    del scratch, scratch_opt, scratch_sched
    opt = torch.optim.RMSprop(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total))

    def val_bpc():
        ids = np.asarray(val_ids, np.int64)
        streams = 16
        length = (len(ids) - 1) // streams
        x = torch.from_numpy(ids[: streams * length].reshape(streams, length))
        y = torch.from_numpy(ids[1 : streams * length + 1].reshape(streams, length))
        total, state = 0.0, None
        with torch.no_grad():
            for s in range(0, length, 256):
                logits, state = net(x[:, s : s + 256], state)
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, vocab_size), y[:, s : s + 256].reshape(-1), reduction="sum").item()
        return total / (streams * length) / math.log(2)

    curve, train_s, next_eval, recent, step, state = [], 0.0, eval_every * 60, [], 0, None
    while train_s < minutes * 60 and step < total:
        t0 = time.perf_counter()
        loss, state = train_step(net, opt, sched, step, state)
        recent = (recent + [loss])[-200:]
        step += 1
        train_s += time.perf_counter() - t0
        if train_s >= next_eval or train_s >= minutes * 60 or step >= total:
            val = val_bpc()
            curve.append(dict(minutes=train_s / 60, step=step, train_bpc=float(np.mean(recent) / math.log(2)),
                              val_bpc=val))
            print(f"torch    {train_s / 60:5.2f} min step {step:6d} "
                  f"train {curve[-1]['train_bpc']:.3f} val {val:.3f}", flush=True)
            next_eval += eval_every * 60
    return curve


def main() -> None:
    on_cpu = dispatch.cpu_choices_apply(dispatch.likely_platform())
    if on_cpu:
        runtime.tune_malloc()  # before this process allocates its arrays
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between evaluations")
    p.add_argument("--peer", choices=["none", "torch"], default="none")
    p.add_argument("--tag", default="quality", help="output file stem under benchmarks/results/")
    p.add_argument("--same-params", action="store_true",
                   help="set --hidden-size so the model has about as many parameters as train.py's default model")
    args, flags = p.parse_known_args()
    if not args.eval_every > 0:
        p.error(f"--eval-every must be a positive number of minutes, got {args.eval_every:g}.")
    if not re.fullmatch(r"[\w.-]+", args.tag):
        p.error(f"--tag names the result files under benchmarks/results/ (letters, digits, '-', '_', '.'), got "
                f"{args.tag!r}; pass a plain name such as quality-mine.")
    train_args = train_script.parse_args(flags)
    try:
        train_script.check_length({"minutes": args.minutes}, None, None)  # train.py's rule for --minutes
        run(p, args, train_args, on_cpu)
    except LstmJaxError as err:  # bad input met on the way (a model flag, the corpus): one line, exit 2
        p.error(err.in_words_of(train_script.FLAGS))


def run(p: argparse.ArgumentParser, args: argparse.Namespace, train_args: argparse.Namespace, on_cpu: bool) -> None:
    """The runs ``main`` asked for, their results written under ``--tag``."""
    if train_args.epochs is not None or train_args.total_steps is not None:
        p.error("the run's length and schedule are planned from --minutes here; drop --epochs and --total-steps.")
    if on_cpu:
        parallel.cpu_devices_per_core(train_args.cpu_devices)  # as train.py: one CPU device per core
    config = train_script.resolve_config(train_args, None)
    chosen = train_script.recipe_keys(train_args, None, config)
    train_script.recipe_before_model(config, chosen, print)
    most = parallel.devices_for_batch(config["batch_size"])
    corpus = load_corpus(config["corpus"])
    train_text, val_text = split_documents(corpus, config["val_from_year"])
    vocab = Vocabulary.from_text(train_text, val_text)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    if args.same_params:
        if train_args.hidden_size is not None:
            p.error("--same-params chooses the hidden size; drop --hidden-size (or --same-params).")
        config["hidden_size"] = same_size_hidden(config, len(vocab))
        print(f"--same-params: {config['cell']} with hidden size {config['hidden_size']}", flush=True)
    params = parameter_count(config, len(vocab))
    devices, impl = train_args.devices or 1, "auto"
    if jax.default_backend() == "cpu":  # as train.py: the device count and the layers measured faster here
        model = CharLM(CharLMConfig(len(vocab), **{k: config[k] for k in train_script.MODEL_KEYS}))
        counts = [devices] if train_args.devices else sorted({1, most})
        devices, impl, seconds = fastest_setup(model, TrainConfig(**{k: config[k] for k in train_script.TRAIN_KEYS}),
                                               train_ids, counts)
        print(f"CPU set-up (devices:layers): {seconds}; training on {devices}:{impl}", flush=True)
    curve, step_s = run_lstm_jax(config, train_ids, val_ids, len(vocab), args.minutes, args.eval_every, devices,
                                 impl, chosen)
    runs = {"lstm_jax": curve}
    if args.peer == "torch":
        runs["torch"] = run_torch(train_ids, val_ids, len(vocab), args.minutes, args.eval_every)
    config_out = {k: config[k] for k in train_script.MODEL_KEYS + train_script.TRAIN_KEYS + ("recipe",)}
    out = dict(minutes=args.minutes, corpus=corpus.source, config=config_out, machine=machine.describe(),
               cpus=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(), devices=devices, layers=impl,
               params=params, step_ms=1e3 * step_s, runs=runs,
               command="NLTK_DATA=../shared/nltk_data python -m benchmarks.quality " + " ".join(sys.argv[1:]))
    lines = [f"# Validation bpc against training minutes ({args.minutes:g}-minute budget; "
             f"{machine.describe_line(out['machine'])}; lstm_jax on {devices} device(s), layers impl={impl!r})", "",
             f"Command: `{out['command']}`", "",
             f"lstm_jax config: `{json.dumps(config_out)}` ({params:,} parameters; {1e3 * step_s:.1f} ms per step)", "",
             "| run | minutes | step | train bpc | validation bpc |", "|---|---|---|---|---|"]
    for name, curve in runs.items():
        lines += [f"| {name} | {r['minutes']:.2f} | {r['step']} | {r['train_bpc']:.3f} | {r['val_bpc']:.3f} |"
                  for r in curve]
    lines += ["", "Best validation bpc: "
              + ", ".join(f"{k} {min(r['val_bpc'] for r in c):.3f}" for k, c in runs.items() if c)]
    if "val_bpc_ema" in curve[-1]:
        lines += ["", f"The weights' average (--ema-decay {config['ema_decay']:g}) at the end: "
                      f"{curve[-1]['val_bpc_ema']:.3f}"]
    machine.write_results(args.tag, out, "\n".join(lines) + "\n")
    plot(out, RESULTS / f"{args.tag}.png")
    print("\n".join(lines))


def plot(out: dict, path: Path) -> None:
    """Validation bpc against training minutes, one line per run, the machine in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for name, curve in out["runs"].items():
        ax.plot([r["minutes"] for r in curve], [r["val_bpc"] for r in curve], "o-", label=name)
    m = out["machine"]
    where = (f"{m['cpu']}, {m['cores']} cores "
             f"({', '.join(f for f in ('avx2', 'avx512f', 'amx_bf16') if m['flags'][f])})"
             if isinstance(m, dict) else m)
    ax.set(xlabel="training minutes", ylabel="validation bits per character",
           title=f"state_union, 2002-2006 held out\n{where}")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": "Validation bpc against training minutes", "Description": where})
    plt.close(fig)


if __name__ == "__main__":
    main()
