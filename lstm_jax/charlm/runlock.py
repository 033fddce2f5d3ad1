"""One trainer per run folder: a lock file that names its holder."""

from __future__ import annotations

import os
from pathlib import Path

from lstm_jax.core.errors import CheckpointError

__all__ = ["RunLock"]


class RunLock:
    """One trainer per run folder: an exclusive ``flock`` on ``<run>/lstm_jax.lock``, which holds
    the holder's PID and host. The kernel drops the lock when its process dies, however it dies,
    so a lock left by a killed run is taken over (``took_over`` then names the dead holder). The
    processes of one multi-process run share the folder: only process 0 takes the lock. Readers
    (``sample.py``) never take it.
    """

    FILE = "lstm_jax.lock"

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / self.FILE
        self.took_over: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"{self.path.parent} is being trained by {holder}; wait for it to finish, stop it, "
                                  f"or pass another run_dir (sample.py can read the folder meanwhile).") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        self.took_over = previous or None  # written by a holder that died without releasing
        me = f"PID {os.getpid()} on host {socket.gethostname()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
