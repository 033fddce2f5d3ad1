"""The machine's cache of measured choices: one JSON file shared by every process of the machine.

The file lives in ``$LSTM_JAX_CACHE_DIR`` when set, else in the user cache folder that
``platformdirs`` names (on Linux ``$XDG_CACHE_HOME/lstm_jax`` or ``~/.cache/lstm_jax``). Writes go
under a ``filelock`` lock (portable: ``fcntl`` on POSIX, ``msvcrt`` on Windows) and through an
atomic rename, so processes starting together measure once and a reader never sees half a file.
Keys start with ``core.host.machine_key()``: a choice is never reused on another CPU or jax.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout
from platformdirs import user_cache_dir

from lstm_jax.core.files import atomic_write_text
from lstm_jax.dispatch import switches

__all__ = ["cache_path", "cached"]

LOCK_TIMEOUT_S = 600.0  # another process measuring longer than this is taken as stuck: measure for ourselves
_locks: dict[str, FileLock] = {}
_locks_guard = threading.Lock()


def cache_path() -> Path:
    """The JSON file of measured choices shared by this machine's processes."""
    root = switches.cache_dir() or user_cache_dir("lstm_jax", appauthor=False)
    return Path(root) / "layouts.json"


def _lock_for(path: Path) -> FileLock:
    """One re-entrant lock object per file: a measurement that needs another (timing a Trainer
    traces layers, which ask for their own plans) takes it again in the same thread."""
    with _locks_guard:
        key = str(path)
        if key not in _locks:
            _locks[key] = FileLock(str(path.with_suffix(".lock")), timeout=LOCK_TIMEOUT_S)
        return _locks[key]


def cached(key: str, measure: Callable[[], dict]) -> dict:
    """The entry stored under ``key`` in the machine's cache, or ``measure()``'s, stored there first.

    One process measures while the others wait on the lock, then read. Without a writable cache
    folder (or when the lock cannot be had) the process measures for itself and stores nothing."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock_for(path)
        lock.acquire()
    except (OSError, Timeout):
        return measure()
    try:
        entry = _read(path).get(key)
        if entry is None:
            entry = measure()
            entries = _read(path)  # again: a nested measurement may have added entries meanwhile
            entries[key] = entry
            try:
                atomic_write_text(path, json.dumps(entries, indent=1) + "\n")
            except OSError:
                pass  # a read-only cache: the choice holds for this process only
        return entry
    finally:
        lock.release()


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):  # absent or damaged: measure again and rewrite it
        return {}
