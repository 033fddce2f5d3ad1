"""Orbax checkpoints of the whole training state, with config and vocabulary as JSON beside it.

A run folder holds::

    config.json            the run's configuration and vocabulary (written atomically)
    checkpoints/<step>/    the last ``keep`` checkpoints: TrainState + JSON metadata
    best/<step>/           the checkpoint with the lowest validation bpc so far

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a process
killed during a save leaves the previous checkpoints intact. Restoring goes against an abstract
target built on the current machine, so a checkpoint written on a GPU restores on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lstm_jax.data import Vocabulary
from lstm_jax.errors import CheckpointError
from lstm_jax.model import CharLM, CharLMConfig
from lstm_jax.training import TrainConfig, TrainState, make_optimizer

__all__ = ["Checkpointer", "read_run_config", "write_run_config", "load_run", "CONFIG_FILE"]

CONFIG_FILE = "config.json"


def write_run_config(run_dir: Path, config: dict) -> None:
    """Write ``config.json`` atomically (a temporary file renamed into place)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / CONFIG_FILE)


def read_run_config(run_dir: Path) -> dict:
    """The run's ``config.json``; ``CheckpointError`` if the folder is not an lstm_jax run."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"Checkpoint folder {run_dir} does not exist; pass the --run-dir of a training run.")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not an lstm_jax run folder (no {CONFIG_FILE}); pass the --run-dir of a training run.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the run folder is damaged.") from None
    if not isinstance(config, dict) or "model" not in config or "vocab" not in config:
        raise CheckpointError(f"{path} was not written by lstm_jax (no model or vocab); pass another run folder.")
    return config


class Checkpointer:
    """Save and restore ``TrainState`` pytrees with orbax; keeps the last ``keep`` and the best."""

    def __init__(self, run_dir: Path | str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.run_dir = Path(run_dir).absolute()

        def options(prefix: str, **kw) -> ocp.CheckpointManagerOptions:
            # Each manager its own barrier names: both save the same step in a multi-process run.
            return ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
                cleanup_tmp_directories=not read_only,  # a reader must not remove a writer's tmp folder
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix), **kw)

        self.latest = ocp.CheckpointManager(self.run_dir / "checkpoints", options=options("latest", max_to_keep=keep))
        self.best = ocp.CheckpointManager(self.run_dir / "best", options=options(
            "best", max_to_keep=1, best_fn=lambda m: m["val_bpc"], best_mode="min"))
        self._best_bpc: float | None = None  # read from disk once, then tracked in memory

    def steps(self, which: str = "latest") -> list[int]:
        return list(self._manager(which).all_steps())

    def _manager(self, which: str) -> ocp.CheckpointManager:
        return self.best if which == "best" else self.latest

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` (async) and ``meta`` (JSON); also as best if ``meta['val_bpc']`` improved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        if "val_bpc" in meta and meta["val_bpc"] < self.best_bpc():
            self.best.save(step, args=args, metrics={"val_bpc": meta["val_bpc"]}, force=True)
            self._best_bpc = meta["val_bpc"]

    def best_bpc(self) -> float:
        """The best validation bpc saved so far (infinity when there is none)."""
        if self._best_bpc is None:
            step = self.best.best_step()
            self._best_bpc = float("inf") if step is None else self.best.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["val_bpc"]
        return self._best_bpc

    def restore(self, abstract_state: Any, which: str | int = "latest") -> tuple[Any, dict]:
        """Restore ``(state, meta)``: ``which`` is 'latest', 'best' or a step of the last ones."""
        manager = self._manager(which if isinstance(which, str) else "latest")
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{self.run_dir} holds no complete checkpoint; train first (python train.py --run-dir {self.run_dir}).")
        if which == "best":
            step = manager.best_step()
        elif which == "latest":
            step = manager.latest_step()
        else:
            step = int(which)
            if step not in steps:
                raise CheckpointError(f"{self.run_dir} has no checkpoint at step {step}; available: {sorted(steps)}.")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"The checkpoint at step {step} in {self.run_dir} does not match this model "
                f"({str(err).splitlines()[0][:200]}); use the run's own config or a new --run-dir."
            ) from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def load_run(run_dir: Path | str, which: str | int = "latest") -> tuple[CharLM, Any, Vocabulary, dict]:
    """``(model, params, vocabulary, meta)`` of a run folder, restored onto this machine's devices."""
    config = read_run_config(Path(run_dir))
    model = CharLM(CharLMConfig(**config["model"]))
    train = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig) if f.name in config})
    tx = make_optimizer(train.optimizer, train.learning_rate, train.clip_norm, train.lr_schedule)
    params = model.init(jax.random.PRNGKey(0))
    target = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0),
                        model.initial_carry((train.batch_size,)))
    ckpt = Checkpointer(run_dir, async_save=False, read_only=True)
    try:
        state, meta = ckpt.restore(target, which)
    finally:
        ckpt.close()
    return model, state.params, Vocabulary(config["vocab"]), meta
