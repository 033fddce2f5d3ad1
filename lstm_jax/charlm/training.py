"""The jitted train step, the chunked epoch loop and validation bits-per-character.

Two ways to cut the corpus into batches, both gathered on the device from one int32 array:

* ``preset='lm'`` (default): ``batch_size`` contiguous streams; every step takes the next
  ``seq_len`` characters of each stream, predicts the next character at every position and
  carries the recurrent state into the next step (truncated BPTT). The carry resets each epoch.
* ``preset='keras'``: the lesson's set-up: windows of ``seq_len`` (40) characters every
  ``window_step`` (3), shuffled each epoch, predicting only the character after each window.

``run_chunk`` runs ``num_steps`` train steps inside one jitted ``lax.scan``; the host sees only
the chunk's losses (``lstm_jax.scan_steps`` does the same for a train step the library user writes). The
train step is a pure function of ``(state, step)``; everything a bitwise resume needs is in
``TrainState``.

Devices: the trainer runs on a ``jax.sharding.Mesh`` with one ``data`` axis (``lstm_jax.parallel``;
default: every device of every process). The lm streams, the carried state and every batch are
split over it along the batch axis, so each device holds and trains on its own streams; params and
optimizer state are replicated. The loss and its gradient run through ``parallel.value_and_grad``
(each device runs the single-device program on its rows, one all-reduce of the gradients), the
optimizer update on the replicated result. The same program runs on one device, and gives the
same losses to float32 rounding on any number of them: the batch, the dropout masks (one key per
sequence) and the data order do not depend on the device count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lstm_jax import dispatch
from lstm_jax.charlm.model import DTYPES, CharLM, cross_entropy, nats_to_bpc
from lstm_jax.core.errors import ConfigError, CorpusError, NonFiniteLossError
from lstm_jax.core.host import machine_key
from lstm_jax.dispatch import cache, measure
from lstm_jax.layers import parallel

__all__ = ["TrainConfig", "TrainState", "Trainer", "Setup", "make_optimizer", "decayed_leaves", "param_ema",
           "ParamEMAState", "eval_params", "evaluate_bpc", "fastest_setup", "fastest_device_count"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "lm"  # 'lm' or 'keras'
    batch_size: int = 64
    seq_len: int = 100
    window_step: int = 3  # keras preset only
    optimizer: str = "rmsprop"
    learning_rate: float = 2e-3
    lr_schedule: str = "constant"  # or 'cosine' (decays to 10% over the run)
    total_steps: int = 0  # the run's length in steps, which a cosine spans; 0: epochs x steps per epoch
    clip_norm: float = 5.0  # 0 disables clipping
    chunk_steps: int = 50
    seed: int = 0
    ema_decay: float = 0.0  # > 0: keep an average of the weights for evaluation (param_ema); 0 disables it
    weight_decay: float = 0.0  # decoupled weight decay of the weight matrices (make_optimizer); 0 disables it

    def __post_init__(self):
        if self.preset not in ("lm", "keras"):
            raise ConfigError(f"TrainConfig.preset must be 'lm' or 'keras', got {self.preset!r}.", "TrainConfig.preset")
        for name in ("batch_size", "seq_len", "window_step", "chunk_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.", f"TrainConfig.{name}")
        if self.total_steps < 0:
            raise ConfigError(f"TrainConfig.total_steps must be >= 0 (0: epochs x steps per epoch), got "
                              f"{self.total_steps}.", "TrainConfig.total_steps")
        if not self.clip_norm >= 0:
            raise ConfigError(f"TrainConfig.clip_norm must be >= 0 (0 = no clipping), got {self.clip_norm}.",
                              "TrainConfig.clip_norm")
        if not self.learning_rate > 0:
            raise ConfigError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}.",
                              "TrainConfig.learning_rate")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"TrainConfig.ema_decay must be in [0, 1) (0 disables the average; Keras's "
                              f"ema_momentum is 0.99), got {self.ema_decay}.", "TrainConfig.ema_decay")
        if not (0 <= self.weight_decay < math.inf):
            raise ConfigError(f"TrainConfig.weight_decay must be a number >= 0 (0 disables it; Keras's AdamW uses "
                              f"0.004), got {self.weight_decay}.", "TrainConfig.weight_decay")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"TrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.",
                              "TrainConfig.lr_schedule")


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: Array  # int32 scalar: optimizer steps taken; the data position derives from it
    key: Array  # the run's base PRNG key (raw uint32); per-step keys are folded from the step
    carry: Any  # the recurrent state carried between steps (lm preset)


def cosine_schedule(learning_rate: float, total_steps: int | Array, alpha: float = 0.1) -> Callable[[Array], Array]:
    """``lr(step) = learning_rate * (alpha + (1 - alpha) * (1 + cos(pi * min(step, N) / N)) / 2)``,
    ``N = total_steps``: optax's ``cosine_decay_schedule``, except that ``total_steps`` may be a
    traced value, so that a jitted train step takes the schedule's length as an argument (a time
    budget fixes it after the step has been compiled and timed; nothing is compiled again)."""
    def schedule(step: Array) -> Array:
        n = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
        frac = jnp.minimum(jnp.asarray(step, jnp.float32), n) / n
        return learning_rate * (alpha + (1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))

    return schedule


class ParamEMAState(NamedTuple):
    ema: Any  # the average of the weights, the params' structure and dtypes


def param_ema(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the weights, kept in the optimizer state (Keras's
    ``use_ema=True, ema_momentum=decay``; Flax/optax users often keep it beside the state).

    Chained last, it sees the final updates and leaves them unchanged; after every step

        ema <- decay * ema + (1 - decay) * (params + updates)

    starting from the initial weights, with no bias correction (as Keras). Being part of the
    optimizer state, it is checkpointed with it, so a resumed run continues the same average.
    ``eval_params`` reads it."""
    def init(params):
        return ParamEMAState(jax.tree.map(jnp.asarray, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the params: call update(updates, state, params).")
        new = optax.apply_updates(params, updates)  # the weights after this step
        ema = optax.incremental_update(new, state.ema, 1 - decay)  # (1 - decay) * new + decay * ema
        return updates, ParamEMAState(jax.tree.map(lambda a, e: a.astype(e.dtype), ema, state.ema))

    return optax.GradientTransformation(init, update)


def eval_params(params, opt_state):
    """The weights to evaluate and sample with: the average of ``param_ema`` where the optimizer
    state keeps one, else ``params``."""
    average = optax.tree_utils.tree_get(opt_state, "ParamEMAState")
    return params if average is None else average.ema


OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd", "adagrad", "lion", "nadam", "adabelief")
KERAS_RMSPROP = dict(decay=0.9, eps=1e-7, eps_in_sqrt=False)  # Keras's rho and epsilon, outside the root


def decayed_leaves(params: Any) -> Any:
    """The leaves decoupled weight decay applies to: arrays of two or more dimensions (the kernels
    and the embedding), not the biases (as nanoGPT and most Flax recipes do)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(name: str, learning_rate: float, clip_norm: float = 0.0, schedule: str = "constant",
                   total_steps: int | Array = 1, ema_decay: float = 0.0,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """RMSprop as Keras (rho 0.9, eps 1e-7 outside the square root), or any optax optimiser by name.
    ``schedule='cosine'`` decays the rate to 10% over ``total_steps`` (``cosine_schedule``; a
    traced value is allowed); the optimizer state's structure does not depend on it.

    ``weight_decay > 0`` adds decoupled weight decay (Loshchilov and Hutter's AdamW rule, Keras 3's
    ``weight_decay`` argument of every optimizer): each step also subtracts
    ``lr_t * weight_decay * w`` from every weight matrix (``decayed_leaves``), ``lr_t`` the
    scheduled rate, apart from the optimizer's own scaling of the gradient. For ``'adamw'`` it
    replaces optax's default of 1e-4 (and ``'lion'`` keeps its own 1e-3 besides).

    Warning: PyTorch's ``RMSprop(weight_decay=)`` and ``Adam(weight_decay=)`` are an L2 penalty
    instead (``wd * w`` added to the gradient before the running RMS scales it), so the same
    number decays differently there; PyTorch's ``AdamW`` is this rule. Keras decays every
    variable unless excluded; here the biases are not decayed.

    ``ema_decay > 0`` chains ``param_ema(ema_decay)`` last."""
    lr = cosine_schedule(learning_rate, total_steps) if schedule == "cosine" else learning_rate
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r} is not supported; use {', '.join(OPTIMIZERS[:-1])} or "
                          f"{OPTIMIZERS[-1]}.", "optimizer")
    if name == "adamw" and weight_decay > 0:
        opt = optax.adamw(lr, weight_decay=weight_decay, mask=decayed_leaves)
    elif weight_decay > 0:  # the direction at rate 1, the decay added, then the scheduled rate
        direction = (optax.scale_by_rms(**KERAS_RMSPROP) if name == "rmsprop"
                     else optax.chain(getattr(optax, name)(1.0), optax.scale(-1.0)))
        opt = optax.chain(direction, optax.add_decayed_weights(weight_decay, mask=decayed_leaves),
                          optax.scale_by_learning_rate(lr))
    elif name == "rmsprop":
        opt = optax.rmsprop(lr, **KERAS_RMSPROP)
    else:
        opt = getattr(optax, name)(lr)
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm > 0 else opt
    return optax.chain(opt, param_ema(ema_decay)) if ema_decay > 0 else opt


class Trainer:
    """Holds the model, optimiser and device-resident training text; compiles the chunk once.

    ``mesh`` (default ``parallel.data_mesh()``: every device) must divide ``batch_size``. With
    several processes every process passes the whole ``train_ids``; each device receives only
    its own streams. ``impl`` is how the recurrent layers run (``scan_cell``'s ``impl``: 'auto',
    'fused', 'onednn', 'cudnn' or 'scan'); ``fastest_setup`` measures which to use. Every choice
    gives the same losses to float32 rounding (cuDNN's products may round as TF32).

    The learning-rate schedule spans ``total_steps`` (``config.total_steps``, else ``epochs`` x
    ``steps_per_epoch``). It is an argument of the compiled chunk, not a constant in it:
    ``schedule_steps`` may be set after the chunk was compiled and timed (``charlm.budget`` plans
    a time budget's length that way) without compiling again.
    """

    def __init__(self, model: CharLM, config: TrainConfig, train_ids: np.ndarray, epochs: int = 1,
                 mesh: Mesh | None = None, impl: str = "auto"):
        dispatch.check_impl(impl)
        self.model, self.config, self.impl = model, config, impl
        self.mesh = parallel.data_mesh() if mesh is None else mesh
        b, t = config.batch_size, config.seq_len
        parallel.check_divisible(b, self.mesh, "TrainConfig.batch_size")
        n = len(train_ids)
        if config.preset == "lm":
            stream_len = n // b
            self.steps_per_epoch = (stream_len - 1) // t
            streams = np.asarray(train_ids[: b * stream_len], np.int32).reshape(b, stream_len)
            self.data = parallel.shard_host_array(streams, self.mesh) if self.steps_per_epoch >= 1 else None
            self.num_windows = 0
        else:  # random windows: every device needs the whole text, and only its own windows are cut
            self.num_windows = max((n - t - 1) // config.window_step + 1, 0)
            self.steps_per_epoch = self.num_windows // b
            self.data = parallel.replicate(np.asarray(train_ids, np.int32), self.mesh)
        if self.steps_per_epoch < 1:
            raise CorpusError(
                f"The training text has {n} characters, too short for one batch of {b} x {t + 1}; "
                f"use a longer corpus or a smaller TrainConfig.batch_size or TrainConfig.seq_len."
            )
        self.schedule_steps = config.total_steps or self.steps_per_epoch * epochs  # the cosine's length
        self.tx = self._optimizer(self.schedule_steps)  # its state's structure does not depend on the length
        # every device runs the single-device loss on its rows; one all-reduce of the gradients
        self._value_and_grad = parallel.value_and_grad(self._loss, self.mesh, has_aux=True)
        rep, split = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        self.state_sharding = TrainState(rep, rep, rep, rep, split)  # a pytree prefix of TrainState
        # The corpus is an argument, not a closed-over constant: XLA would otherwise fold the whole
        # text into the compiled program (slow to compile, a copy per chunk length).
        self._chunk = jax.jit(self._run_chunk, static_argnames="num_steps", donate_argnums=0,
                              out_shardings=(self.state_sharding, rep))

    def _optimizer(self, total_steps: int | Array) -> optax.GradientTransformation:
        c = self.config
        return make_optimizer(c.optimizer, c.learning_rate, c.clip_norm, c.lr_schedule, total_steps, c.ema_decay,
                              c.weight_decay)

    def init_state(self, key: Array | None = None) -> TrainState:
        """A fresh state, laid out on the mesh; built under jit so that every leaf is its own
        (donatable) buffer. The same in every process (same seed)."""
        key = jax.random.PRNGKey(self.config.seed) if key is None else key
        return jax.jit(self._fresh_state, out_shardings=self.state_sharding)(np.asarray(key))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state on this mesh: the restore target."""
        shapes = jax.eval_shape(self._fresh_state, jax.ShapeDtypeStruct((2,), jnp.uint32))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            jax.tree.broadcast(self.state_sharding, shapes))

    def _fresh_state(self, key: Array) -> TrainState:
        params = self.model.init(jax.random.fold_in(key, 0))
        carry = self.model.initial_carry((self.config.batch_size,))
        return TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32), key, carry)

    # -- one step ---------------------------------------------------------------------------------
    def _batch(self, data: Array, step: Array, order: Array | None) -> tuple[Array, Array]:
        """This step's inputs and targets, split over the mesh: each device cuts its own rows."""
        t, split = self.config.seq_len, parallel.batch_sharding(self.mesh)
        if self.config.preset == "lm":  # streams are split already; the slice keeps them so
            window = jax.lax.dynamic_slice_in_dim(data, (step % self.steps_per_epoch) * t, t + 1, axis=1)
            return window[:, :-1], window[:, 1:]
        b = self.config.batch_size
        idx = jax.lax.dynamic_slice_in_dim(order, (step % self.steps_per_epoch) * b, b)
        starts = jax.lax.with_sharding_constraint(idx * self.config.window_step, split)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, t + 1))(starts)
        return windows[:, :-1], windows[:, -1]

    def _loss(self, params, carry, x, y, keys):
        carry, logits = self.model.apply(params, carry, x, dropout_key=keys, impl=self.impl)
        if self.config.preset == "keras":
            return cross_entropy(logits[:, -1], y), carry
        return cross_entropy(logits, y), carry

    def _train_step(self, state: TrainState, data: Array, order: Array | None,
                    total_steps: Array) -> tuple[TrainState, Array]:
        b = self.config.batch_size
        x, y = self._batch(data, state.step, order)
        carry = state.carry if self.config.preset == "lm" else self.model.initial_carry((b,))
        # one dropout key per sequence: the masks do not depend on how the batch is split
        c = self.model.config
        dropout = c.dropout > 0 or c.recurrent_dropout > 0 or c.output_dropout > 0
        keys = jax.random.split(jax.random.fold_in(state.key, state.step), b) if dropout else None
        (loss, carry), grads = self._value_and_grad(state.params, carry, x, y, keys)
        updates, opt_state = self._optimizer(total_steps).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        carry = jax.lax.stop_gradient(carry)
        return TrainState(params, opt_state, state.step + 1, state.key, carry), loss

    def _run_chunk(self, state: TrainState, data: Array, total_steps: Array,
                   num_steps: int) -> tuple[TrainState, Array]:
        epoch = state.step // self.steps_per_epoch
        fresh = state.step % self.steps_per_epoch == 0  # chunks never span an epoch boundary
        zeros = self.model.initial_carry((self.config.batch_size,))
        state = state._replace(carry=jax.tree.map(lambda z, c: jnp.where(fresh, z, c), zeros, state.carry))
        order = None
        if self.config.preset == "keras":
            order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(state.key, 1), epoch),
                                           self.num_windows)
        return jax.lax.scan(lambda s, _: self._train_step(s, data, order, total_steps), state, None,
                            length=num_steps)

    # -- the loop ---------------------------------------------------------------------------------
    def chunk_sizes(self, step: int, end: int | None = None) -> list[int]:
        """Chunk lengths from ``step`` to the end of its epoch, or to step ``end`` where that comes
        first (the same cut after any resume)."""
        left = self.steps_per_epoch - step % self.steps_per_epoch
        if end is not None:
            left = max(min(left, end - step), 0)
        k = self.config.chunk_steps
        return [k] * (left // k) + ([left % k] if left % k else [])

    def lower(self, state: TrainState, num_steps: int) -> jax.stages.Lowered:
        """The chunk of ``num_steps`` steps as jit lowers it (to read or compare its program)."""
        return self._chunk.lower(state, self.data, np.int32(self.schedule_steps), num_steps=num_steps)

    def run_chunk(self, state: TrainState, num_steps: int) -> tuple[TrainState, np.ndarray]:
        """``num_steps`` train steps in one dispatch; raises ``NonFiniteLossError`` on NaN/inf."""
        state, losses = self._chunk(state, self.data, np.int32(self.schedule_steps), num_steps=num_steps)
        losses = np.asarray(losses)
        if not np.isfinite(losses).all():
            bad = int(np.argmin(np.isfinite(losses)))
            raise NonFiniteLossError(
                f"The training loss became {losses[bad]} at step {int(state.step) - num_steps + bad + 1}; "
                f"lower TrainConfig.learning_rate or set TrainConfig.clip_norm (the last good checkpoint is kept)."
            )
        return state, losses

    def train_epoch(self, state: TrainState, on_chunk: Callable[[np.ndarray], None] = lambda l: None,
                    end: int | None = None, keep_going: Callable[[int], bool] | None = None):
        """Run to the end of the current epoch (or to step ``end`` where that comes first); returns
        ``(state, per-step losses in nats)``. ``keep_going(n)``, where given, is asked before each
        chunk of ``n`` steps; ``False`` ends the epoch there (a time budget running out)."""
        losses = []
        for n in self.chunk_sizes(int(state.step), end):
            if keep_going is not None and not keep_going(n):
                break
            state, chunk_losses = self.run_chunk(state, n)
            losses.append(chunk_losses)
            on_chunk(chunk_losses)
        return state, np.concatenate(losses) if losses else np.zeros(0)


class Setup(NamedTuple):
    """What ``fastest_setup`` chose: the device count, the layers' ``impl``, and the measured
    seconds per step of every candidate, keyed ``'<devices>:<impl>'``."""
    devices: int
    impl: str
    seconds: dict


def fastest_setup(model: CharLM, config: TrainConfig, train_ids: np.ndarray, counts: Sequence[int] = (1,),
                  impls: Sequence[str] | None = None, steps: int = 8, rounds: int = 5) -> Setup:
    """Which device count of ``counts`` (this process's first devices) and which layer ``impl``
    train ``model`` fastest here, timed on real ``Trainer`` steps.

    Device count: on CPU, one device per core lets each core run a share of the batch, where one
    program runs a recurrent loop's small per-step products on about one core; whether that pays
    depends on the CPU and the model (``benchmarks/scaling.py`` and its results).

    Layer ``impl`` (default: the dispatch's ``step_impls`` for each device count: ``'fused'``,
    ``'auto'`` and ``'onednn'`` where oneDNN is ready and the model is an LSTM or GRU on CPU big
    enough for it, else ``('auto',)``): ``'auto'`` puts each layer on oneDNN where that layer alone
    measured faster (``lstm_jax.dispatch``), but a layer alone is not the whole step (the head, the
    optimizer and the devices' split change the balance), so the whole step decides, ``'onednn'``
    (every layer on it) included. Where ``'auto'`` compiles to the same program as ``'fused'`` (no
    layer took oneDNN) or ``'onednn'`` (every layer did) it is not timed twice. With
    ``LSTM_JAX_DISPATCH=fixed`` nothing is timed: the first candidate is taken.

    One compile per candidate, then ``rounds`` rounds of ``steps`` steps, the candidates taking
    turns, the median per step: on a shared machine a short timing can pick either of two
    candidates a tenth apart, and the compiles cost more than these steps. Candidates are ordered
    from the simplest (fewest devices, the fused layer first); a later one must beat the best
    earlier one by ``dispatch.measure.MARGIN``. The answer is cached per machine, model and
    training set-up (all of it but the learning rate, seed and chunk length, and of the dropout
    rates, the weight average and the decay only whether they are on: how much changes no step's
    cost; ``lstm_jax.dispatch.cache``), so a resumed or repeated run does not measure again.
    """
    counts, c = sorted(set(counts)), model.config
    if impls is None:  # the dispatch's candidates for this model, per device count (its rows per device)
        per_count = {n: dispatch.step_impls(c.cell, config.seq_len, max(config.batch_size // n, 1), c.hidden_size,
                                            DTYPES[c.dtype], c.recurrent_dropout > 0) for n in counts}
    else:
        per_count = {n: impls for n in counts}
    candidates = [(n, dispatch.check_impl(i)) for n in counts for i in dict.fromkeys(per_count[n])]
    if len(candidates) == 1 or not dispatch.measuring():
        return Setup(*candidates[0], {})
    short = dataclasses.replace(config, chunk_steps=steps)
    free = ("learning_rate", "seed", "chunk_steps", "total_steps")  # no bearing on a step's cost
    cost = {k: v for k, v in dataclasses.asdict(config).items() if k not in free}
    cost.update(ema_decay=config.ema_decay > 0, weight_decay=config.weight_decay > 0)  # on or off, not how much
    shape = {**dataclasses.asdict(c), **{k: getattr(c, k) > 0 for k in ("dropout", "recurrent_dropout",
                                                                        "output_dropout")}}  # on or off too
    key = f"{machine_key()}|trainer|onednn v{dispatch.plan.ONEDNN_MEASURE_VERSION}|{shape}|{cost}|{candidates}"

    def timed() -> dict:
        runs, programs = {}, set()
        for n, impl in candidates:
            trainer = Trainer(model, short, train_ids, epochs=1, mesh=parallel.data_mesh(n), impl=impl)
            state = trainer.init_state()
            hlo = trainer.lower(state, steps).as_text()
            if (n, hlo) not in programs:  # 'auto' that took no oneDNN layer (or every one) is not timed twice
                programs.add((n, hlo))
                state, _ = trainer.run_chunk(state, steps)  # compile
                runs[f"{n}:{impl}"] = [trainer, state]

        def chunk(k: str) -> np.ndarray:
            runs[k][1], losses = runs[k][0].run_chunk(runs[k][1], steps)  # losses on the host: waited for
            return losses

        seconds = measure.median_seconds({k: functools.partial(chunk, k) for k in runs}, rounds)
        seconds = {k: v / steps for k, v in seconds.items()}
        best = measure.simplest_fast_enough(seconds)
        return {"setup": best, "seconds_per_step": seconds}

    entry = cache.cached(key, timed)
    devices, impl = entry["setup"].split(":")
    return Setup(int(devices), impl, dict(entry["seconds_per_step"]))


def fastest_device_count(model: CharLM, config: TrainConfig, train_ids: np.ndarray, counts: Sequence[int],
                         steps: int = 4, rounds: int = 3, impl: str = "auto") -> tuple[int, dict]:
    """``fastest_setup`` for the device count alone, with the layers' ``impl`` fixed. Returns
    ``(count, seconds per step by count)``."""
    setup = fastest_setup(model, config, train_ids, counts, (impl,), steps, rounds)
    return setup.devices, {int(k.split(":")[0]): v for k, v in setup.seconds.items()}


@functools.partial(jax.jit, static_argnames=("model", "chunk_len"))
def _eval_nll(model: CharLM, params, tokens: Array, targets: Array, weights: Array, chunk_len: int) -> Array:
    s, n = tokens.shape
    params = model.fold_embedding(params)  # once, not once per chunk

    def body(carry, xs):
        x, y, w = xs
        carry, logits = model.apply(params, carry, x)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return carry, (nll * w).sum()

    split = lambda a: jnp.moveaxis(a.reshape(s, n // chunk_len, chunk_len), 1, 0)
    _, sums = jax.lax.scan(body, model.initial_carry((s,)), (split(tokens), split(targets), split(weights)))
    return sums.sum()


def evaluate_bpc(model: CharLM, params, ids: np.ndarray, streams: int = 16, chunk_len: int = 256,
                 mesh: Mesh | None = None) -> float:
    """Bits per character over the whole of ``ids``: every character after the first is scored
    once, with the state carried through ``streams`` contiguous parts of the text.

    With ``mesh`` the streams are split over its devices (padded with empty streams to a multiple
    of the device count, so the result does not depend on it); ``params`` then live on the mesh
    (replicated, as the ``Trainer`` keeps them). Every process of a multi-process run calls it.
    """
    ids = np.asarray(ids, np.int32)
    n = len(ids) - 1
    if n < 1:
        raise CorpusError("The validation text has fewer than 2 characters; use a larger corpus or split.")
    streams = max(1, min(streams, n))
    length = -(-n // streams)
    length = -(-length // chunk_len) * chunk_len
    rows = streams if mesh is None else -(-streams // mesh.size) * mesh.size
    pad = rows * length - n
    if mesh is None:
        grid = lambda a: jnp.asarray(np.pad(a, (0, pad)).reshape(rows, length))
    else:
        grid = lambda a: parallel.shard_host_array(np.pad(a, (0, pad)).reshape(rows, length), mesh)
    weights = grid(np.ones(n, np.float32))
    total = _eval_nll(model, params, grid(ids[:-1]), grid(ids[1:]), weights, chunk_len)
    return float(nats_to_bpc(total / n))
