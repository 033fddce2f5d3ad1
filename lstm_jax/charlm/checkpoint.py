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
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lstm_jax.charlm.data import Vocabulary
from lstm_jax.charlm.model import CharLM, CharLMConfig
from lstm_jax.charlm.quiet import (  # noqa: F401  (the last two: where callers found them)
    _REPORTED_READ_FAILURES,
    REPORTED_READ_FAILURES,
    _WithoutClosedLoopTracebacks,
    quiet_background_errors,
    silence_background_errors,
)
from lstm_jax.charlm.runlock import RunLock  # noqa: F401  (where callers found it)
from lstm_jax.charlm.training import TrainConfig, TrainState, eval_params, make_optimizer
from lstm_jax.core.errors import CheckpointError
from lstm_jax.core.files import atomic_write_text

__all__ = ["Checkpointer", "RunLock", "read_run_config", "write_run_config", "load_run", "CONFIG_FILE"]

CONFIG_FILE = "config.json"
SEAL_FILE = "lstm_jax_sha256.json"  # in each checkpoint folder: the SHA-256 of each of its files


def write_run_config(run_dir: Path, config: dict) -> None:
    """Write ``config.json`` atomically (a temporary file renamed into place)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))


def read_run_config(run_dir: Path) -> dict:
    """The run's ``config.json``; ``CheckpointError`` if the folder is not an lstm_jax run."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run_dir {run_dir} does not exist; pass the run_dir of a training run.", "run_dir")
    if not path.is_file():
        raise CheckpointError(f"run_dir {run_dir} is not an lstm_jax run folder (no {CONFIG_FILE}); pass the "
                              "run_dir of a training run.", "run_dir")
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
        self.run_dir, self.read_only = Path(run_dir).absolute(), read_only

        def options(prefix: str, **kw) -> ocp.CheckpointManagerOptions:
            # Each manager its own barrier names: both save the same step in a multi-process run.
            return ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
                cleanup_tmp_directories=not read_only,  # a reader must not remove a writer's tmp folder
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix), **kw)

        handlers = lambda: dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
        self.latest = ocp.CheckpointManager(self.run_dir / "checkpoints", options=options("latest", max_to_keep=keep),
                                            item_handlers=handlers())
        self.best = ocp.CheckpointManager(self.run_dir / "best", options=options(
            "best", max_to_keep=1, best_fn=lambda m: m["val_bpc"], best_mode="min"), item_handlers=handlers())
        self._best_bpc: float | None = None  # read from disk once, then tracked in memory
        self.damaged: list[Path] = []  # checkpoints the last restore found damaged and skipped
        self.notes: list[str] = []  # one line for each, and the step used instead, for the user

    def steps(self, which: str = "latest") -> list[int]:
        return list(self._manager(which).all_steps())

    def _manager(self, which: str) -> ocp.CheckpointManager:
        return self.best if which == "best" else self.latest

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` (async) and ``meta`` (JSON, with the state's fingerprint); also as best
        if ``meta['val_bpc']`` improved. Every process of a multi-process run calls it."""
        self.seal()
        meta = {**meta, "fingerprint": fingerprint(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        if "val_bpc" in meta and meta["val_bpc"] < self.best_bpc():
            self.best.save(step, args=args, metrics={"val_bpc": meta["val_bpc"]}, force=True)
            self._best_bpc = meta["val_bpc"]

    def best_bpc(self) -> float:
        """The best validation bpc saved so far (infinity when there is none or it is unreadable)."""
        if self._best_bpc is None:
            self._best_bpc = float("inf")
            step = self.best.best_step()
            if step is not None:
                try:
                    self._best_bpc = self.best.restore(step, args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore()))["meta"]["val_bpc"]
                except Exception:  # damaged: the next good epoch replaces it
                    pass
        return self._best_bpc

    def _candidates(self, which: str | int) -> list[tuple[str, ocp.CheckpointManager, int]]:
        """Where to look, in order: the newest first ('latest': the kept checkpoints and best/,
        which a kill between the two saves can leave one step ahead), best/ first ('best'), or
        exactly one step."""
        latest = [("checkpoints", self.latest, s) for s in self.latest.all_steps()]
        best = [("best", self.best, s) for s in self.best.all_steps()]
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            found = [c for c in latest + best if c[2] == int(which)][:1]
            if not found:
                steps = sorted({c[2] for c in latest + best})
                raise CheckpointError(f"{self.run_dir} has no checkpoint at step {which}; available: {steps}.")
            return found
        newest = sorted(latest + best, key=lambda c: (-c[2], c[0] == "best"))
        return (best + [c for c in newest if c[0] != "best"]) if which == "best" else newest

    def restore(self, abstract_state: Any, which: str | int = "latest") -> tuple[Any, dict]:
        """Restore ``(state, meta)``: ``which`` is 'latest', 'best' or a step number.

        A checkpoint that cannot be read, or whose numbers differ from the fingerprint saved with
        them, is damaged: it is skipped for the next newest (for 'latest' and 'best'), and
        ``self.notes`` says so. A checkpoint of another model shape raises ``CheckpointError``.
        """
        self.damaged, self.notes = [], []
        candidates = self._candidates(which)
        if not candidates:
            raise CheckpointError(f"{self.run_dir} holds no complete checkpoint; train first "
                                  f"(lstm-jax-train --run-dir {self.run_dir}).")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        target_shapes = _shapes(target)
        for folder, manager, step in candidates:
            path = self.run_dir / folder / str(step)
            broken = _check_seal(path)  # before orbax reads anything: a failed read leaves noise behind
            if broken:
                self._skip(path, ValueError(broken))
                continue
            try:
                saved_shapes = _shapes(manager.item_metadata(step)["state"])
            except Exception as err:
                self._skip(path, err)
                continue
            if saved_shapes != target_shapes:
                raise CheckpointError(
                    f"The checkpoint at step {step} in {self.run_dir} holds arrays of other shapes than this "
                    f"model's ({len(saved_shapes)} vs {len(target_shapes)} arrays); the run's config.json "
                    f"does not match its checkpoints: restore config.json or use a new run_dir.")
            try:
                with quiet_background_errors():
                    out = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                saved = out["meta"].get("fingerprint")
                if saved is not None and saved != fingerprint(out["state"]):
                    raise ValueError("its numbers differ from the fingerprint saved with them")
            except Exception as err:
                self._skip(path, err)
                continue
            if self.damaged:
                self.notes.append(f"using the newest intact checkpoint instead: step {step} ({folder}/{step}).")
            return out["state"], out["meta"]
        tried = ", ".join(f"{folder}/{step}" for folder, _, step in candidates)
        raise CheckpointError(f"Every checkpoint in {self.run_dir} is damaged ({tried}); restore the folder "
                              f"from a copy or start a new run_dir.")

    def _skip(self, path: Path, err: Exception) -> None:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        self.damaged.append(path)
        REPORTED_READ_FAILURES.watch(path)
        self.notes.append(f"checkpoint {path} is damaged ({first}); skipping it.")

    def quarantine(self) -> list[Path]:
        """Move the damaged checkpoints the last restore skipped to ``<run>/damaged/`` (kept for
        inspection, out of the way of new saves at the same steps); returns the new paths."""
        moved = []
        for path in self.damaged:
            dest = self.run_dir / "damaged" / f"{path.parent.name}-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if path.exists():
                dest.parent.mkdir(exist_ok=True)
                os.replace(path, dest)
                moved.append(dest)
        self.reload()
        return moved

    def reload(self) -> None:
        """Re-read the folders (after another process changed them)."""
        self.latest.reload()
        self.best.reload()
        self._best_bpc = None

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def seal(self) -> None:
        """Write the SHA-256 of every file of each finished checkpoint that has none yet (process 0
        only), so that a restore finds damage before orbax reads a byte. Runs before each save and
        on close; a checkpoint finished just before a kill stays unsealed and is checked by its
        fingerprint alone."""
        self.wait()
        if jax.process_index() != 0 or self.read_only:
            return
        for folder, manager in (("checkpoints", self.latest), ("best", self.best)):
            for step in manager.all_steps():
                path = self.run_dir / folder / str(step)
                if path.is_dir() and not (path / SEAL_FILE).exists():
                    _write_seal(path)

    def close(self) -> None:
        self.seal()
        self.latest.close()
        self.best.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_seal(path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != SEAL_FILE)
    seal = {str(p.relative_to(path)): _sha256(p) for p in files}
    atomic_write_text(path / SEAL_FILE, json.dumps(seal, indent=1))


def _check_seal(path: Path) -> str | None:
    """What is wrong with a sealed checkpoint folder's files, or None (also when it has no seal)."""
    seal_path = path / SEAL_FILE
    if not seal_path.is_file():
        return None
    try:
        seal = json.loads(seal_path.read_text())
    except (OSError, ValueError):
        return f"its checksum file {SEAL_FILE} is unreadable"
    for name, digest in seal.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its SHA-256"
    return None


def fingerprint(state: Any) -> list[int]:
    """One uint32 per array of ``state``: a position-weighted sum of its bits, mod 2**32. Any
    changed value changes it; the same on any number of devices (integer sums are exact)."""
    return [int(v) for v in np.asarray(_fingerprint(state))]


@jax.jit
def _fingerprint(state: Any) -> jax.Array:
    def one(x):
        bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
        weights = jnp.arange(x.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.sum(bits.reshape(-1) * weights, dtype=jnp.uint32)

    return jnp.stack([one(x) for x in jax.tree.leaves(state)] or [jnp.uint32(0)])


def _shapes(tree: Any) -> list[tuple]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(x.shape), str(x.dtype)) for x in leaves)


READ_ATTEMPTS = 5  # load_run: tries at listing a folder that a running trainer is pruning


def load_run(run_dir: Path | str, which: str | int = "latest") -> tuple[CharLM, Any, Vocabulary, dict]:
    """``(model, params, vocabulary, meta)`` of a run folder, restored onto this machine's devices;
    ``params`` are the weights' average where the run kept one (``--ema-decay``).

    Damaged checkpoints are skipped for the newest intact one; ``meta['restore_notes']`` then
    says which were skipped and which step was used."""
    config = read_run_config(Path(run_dir))
    model = CharLM(CharLMConfig(**config["model"]))
    train = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig) if f.name in config})
    tx = make_optimizer(train.optimizer, train.learning_rate, train.clip_norm, train.lr_schedule,
                        ema_decay=train.ema_decay, weight_decay=train.weight_decay)
    params = model.init(jax.random.PRNGKey(0))
    target = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0),
                        model.initial_carry((train.batch_size,)))
    for attempt in range(READ_ATTEMPTS):
        try:  # a trainer running on the folder may remove an old checkpoint while orbax lists them
            ckpt = Checkpointer(run_dir, async_save=False, read_only=True)
            break
        except FileNotFoundError as err:
            if attempt == READ_ATTEMPTS - 1:
                raise CheckpointError(f"The checkpoints in {run_dir} kept changing while they were read ({err}); "
                                      f"try again, or read a copy of the folder.") from err
            time.sleep(0.2)
    try:
        state, meta = ckpt.restore(target, which)
    finally:
        ckpt.close()
    params = eval_params(state.params, state.opt_state)  # the weights' average where the run kept one
    return model, params, Vocabulary(config["vocab"]), {**meta, "restore_notes": ckpt.notes}
