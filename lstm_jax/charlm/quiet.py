"""Quiet what a failed checkpoint read leaves behind, and nothing else.

When orbax fails to read one array of a damaged checkpoint, the restore reports the checkpoint and
skips it; the sibling reads still run and their failures surface later, on garbage collection or at
exit, as tracebacks that would bury the one clear line the user should see. The filters here drop
exactly those (matched by the damaged folder's path or the closed event loop), for the process's
life; every other exception and log line prints as usual.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path

__all__ = ["quiet_background_errors", "REPORTED_READ_FAILURES", "silence_background_errors"]


@contextlib.contextmanager
def quiet_background_errors():
    """Silence what a failed restore leaves behind: orbax reads arrays in coroutines, and when one
    read fails the others' exceptions surface later, on garbage collection, as "Exception ignored
    in <coroutine ...>" tracebacks. The failure itself reaches the caller as the raised error."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


class _ReportedReadFailures(logging.Filter):
    """Drops asyncio's "Task / Future / _GatheringFuture exception was never retrieved" records
    about reads of a checkpoint this process has already reported as damaged, and nothing else.

    When one of orbax's array reads fails, ``asyncio.gather`` raises its error to the restore
    (which reports the checkpoint and skips it) while the sibling reads still run; their failures
    are never awaited, so asyncio logs each one, with its traceback, when the task is collected.
    That can be after ``restore`` has returned, or at exit, so the filter lives as long as the
    process. A record is dropped only if its text or its exception's traceback names the folder of
    a checkpoint in ``paths``: the same failure in any other file or code still prints.
    """

    _UNRETRIEVED = "exception was never retrieved"

    def __init__(self):
        super().__init__()
        self.paths: set[str] = set()

    def watch(self, path: Path) -> None:
        self.paths.update({str(path), str(Path(path).resolve())})
        logger = logging.getLogger("asyncio")
        if self not in logger.filters:
            logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._UNRETRIEVED not in message.split("\n", 1)[0]:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            message += "".join(traceback.format_exception(*record.exc_info))
        return not any(path + os.sep in message for path in self.paths)


REPORTED_READ_FAILURES = _ReportedReadFailures()
_REPORTED_READ_FAILURES = REPORTED_READ_FAILURES  # the name the tests and older code use


class _WithoutClosedLoopTracebacks(io.TextIOBase):
    """A text stream that passes everything to ``stream`` except whole tracebacks ending in
    ``RuntimeError: Event loop is closed``. Several threads print them at once, so their lines
    interleave: lines are held from a ``Traceback`` header until every open traceback has reached
    its exception line, then dropped if all of those were that error, else written as received.
    Lines that belong to no traceback pass straight through."""

    _EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")

    def __init__(self, stream):
        self._stream, self._partial, self._held, self._ends, self._open = stream, "", [], [], 0

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line + "\n")
        return len(text)

    def _line(self, line: str) -> None:
        if line.startswith("Traceback (most recent call last):"):
            self._open += 1
        elif not self._open or not (line[:1] in (" ", "\t") or self._EXCEPTION.match(line)):
            self._stream.write(line)  # outside any traceback, or between a traceback's lines
            return
        self._held.append(line)
        if line[:1] not in (" ", "\t") and self._EXCEPTION.match(line):
            self._ends.append(line)
            self._open -= 1
            if not self._open:
                if not all(end.startswith("RuntimeError: Event loop is closed") for end in self._ends):
                    self._stream.write("".join(self._held))
                self._held, self._ends = [], []

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


def silence_background_errors() -> None:
    """For command-line scripts: after a failed restore, tensorstore's outstanding reads finish
    on orbax's closed event loop and print "RuntimeError: Event loop is closed" tracebacks from
    background threads, some through the exception hooks, some straight to ``sys.stderr``
    (C++ threads). Hide exactly those; every other exception and line prints as usual."""
    if not isinstance(sys.stderr, _WithoutClosedLoopTracebacks):
        sys.stderr = _WithoutClosedLoopTracebacks(sys.stderr)
    default = sys.excepthook

    def hook(kind, value, tb):
        if not (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)):
            default(kind, value, tb)

    sys.excepthook = hook
    previous = threading.excepthook
    threading.excepthook = lambda args: None if (
        isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value)) else previous(args)
