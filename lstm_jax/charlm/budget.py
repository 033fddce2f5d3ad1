"""A run that fits a time budget: its length in steps, planned from what the steps cost here.

``train.py --minutes M`` trains for M minutes of wall-clock time with the learning-rate schedule
ending at the budget. The length is not guessed from the machine: before the first real step the
run's own compiled chunk is timed on a scratch copy of the fresh state (``measure_costs``), one
epoch end (validation and samples) is timed too, and ``plan_total_steps`` takes the largest step
count whose steps and epoch ends fit in what is left of the budget after a safety margin. That
count is fixed there and saved with the run (``TrainConfig.total_steps``): the cosine spans it
exactly, and a resumed run follows the same schedule to the same last step, bitwise, whatever its
own machine's speed. The scratch steps are thrown away: the run itself starts from step 0 with the
schedule already known, so a budget run of N steps is the same run as ``--total-steps N``.

A plan is a forecast; a machine can turn slower after it (another job starts, the clock drops).
``Deadline`` guards the budget: before each chunk it checks that the chunk and one epoch end still
fit, at the pace the run is going now, and where they do not the run ends its epoch there (its
validation and checkpoint inside the budget) and stops short of the plan, as an interrupted run
would: resuming it finishes the planned schedule, bitwise.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Costs", "Deadline", "measure_costs", "plan_total_steps", "MARGIN"]

# Kept free of the budget for what is not timed in advance: checkpoint writes, the progress bar,
# and the noise of a shared machine.
MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds per train step, and per epoch end (validation and samples), as measured here."""

    step_s: float
    epoch_end_s: float


def measure_costs(trainer: Any, epoch_end: Callable[[Any], Any], min_chunks: int = 3, max_chunks: int = 9,
                  min_seconds: float = 0.5) -> Costs:
    """Time ``trainer``'s compiled chunk and ``epoch_end(state)`` on a scratch state.

    Every chunk length an epoch uses (``chunk_steps`` and the epoch's remainder) compiles first,
    not timed, so that the run itself compiles nothing (``plan_total_steps`` with ``chunk_steps``
    ends the run on those lengths too). Then chunks of ``chunk_steps`` steps are timed one by one,
    at least ``min_chunks`` and then more until ``min_seconds`` have passed or ``max_chunks`` ran,
    and the step costs the median chunk's time over its steps: on a shared machine one chunk can
    run well off the pace of the next, and a plan from one slow chunk leaves that much
    of the budget unused (a fast one is caught by ``Deadline``). ``epoch_end`` (everything a run does at an
    epoch's end: validation, samples, the checkpoint, the plot) runs three times and the slower of
    the last two counts (the first compiles what it needs). The scratch state is dropped: nothing
    here touches the run's own state.
    """
    sizes = trainer.chunk_sizes(0)
    n = sizes[0]
    scratch = trainer.init_state()
    for size in sorted(set(sizes), reverse=True):
        scratch, _ = trainer.run_chunk(scratch, size)  # compiles; its losses reached the host: done
    seconds, start = [], time.perf_counter()
    while len(seconds) < min_chunks or (len(seconds) < max_chunks and time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        scratch, _ = trainer.run_chunk(scratch, n)  # its losses reached the host: the chunk is done
        seconds.append(time.perf_counter() - t0)
    step_s = statistics.median(seconds) / n
    epoch_end(scratch)
    ends = []
    for _ in range(2):
        start = time.perf_counter()
        epoch_end(scratch)
        ends.append(time.perf_counter() - start)
    return Costs(step_s, max(ends))


class Deadline:
    """The budget's guard while a planned run trains: ``allows(n)`` (asked before each chunk of
    ``n`` steps) is ``True`` while that chunk and one epoch end still finish by ``at`` (a
    ``clock()`` reading), at the pace the run keeps now.

    The pace is the slower of the planned ``costs`` and what the run shows: the time between two
    ``allows`` calls (one chunk and its bookkeeping) and the last epoch end (``epoch_ended``). The
    first call after an epoch end, or of an epoch (``new_epoch``), has no chunk before it to time.
    """

    def __init__(self, at: float, costs: Costs, clock: Callable[[], float] = time.monotonic):
        self.at, self.costs, self.clock = at, costs, clock
        self.step_s, self.epoch_end_s = costs.step_s, costs.epoch_end_s
        self._last: tuple[float, int] | None = None

    def new_epoch(self) -> None:
        self._last = None

    def epoch_ended(self, seconds: float) -> None:
        """Record an epoch end's ``seconds``; the next ``allows`` times no chunk across it."""
        self.epoch_end_s = max(self.costs.epoch_end_s, seconds)
        self._last = None

    def allows(self, n: int) -> bool:
        now = self.clock()
        if self._last is not None:
            then, steps = self._last
            self.step_s = max(self.costs.step_s, (now - then) / steps)
        self._last = (now, n)
        return now + n * self.step_s + self.epoch_end_s <= self.at


def plan_total_steps(seconds_left: float, costs: Costs, steps_per_epoch: int, margin: float = MARGIN,
                     chunk_steps: int = 1) -> int:
    """The largest step count ``N`` whose steps and epoch ends fit in ``seconds_left``:
    ``N * step_s + ceil(N / steps_per_epoch) * epoch_end_s <= (1 - margin) * seconds_left``
    (the run ends with an epoch end, whole or not). 0 when not even one step and its epoch end fit.

    With ``chunk_steps`` (the run's steps per dispatch) ``N`` is also cut where the last epoch's
    steps split into chunk lengths a whole epoch uses (``chunk_steps`` and ``steps_per_epoch %
    chunk_steps``), fewer than ``chunk_steps`` steps back: each chunk length is a program of its
    own, and one first met in the last epoch would compile past the budget's end. Where no such
    count is left (a plan shorter than one chunk) the uncut count is kept."""
    budget = (1 - margin) * seconds_left

    def cost(n: int) -> float:
        return n * costs.step_s + math.ceil(n / steps_per_epoch) * costs.epoch_end_s

    lo, hi = 0, max(int(budget / max(costs.step_s, 1e-9)), 0)
    while lo < hi:  # cost grows with n: the largest n with cost(n) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return _cut_to_chunks(lo, steps_per_epoch, chunk_steps) or lo


def _cut_to_chunks(total: int, steps_per_epoch: int, chunk_steps: int) -> int:
    """The largest count ``<= total`` whose last epoch's chunks have lengths an epoch already
    uses (``chunk_steps``, ``steps_per_epoch % chunk_steps``); 0 where there is none."""
    known = {0, steps_per_epoch % chunk_steps}
    while total > 0 and (total % steps_per_epoch) % chunk_steps not in known:
        total -= 1
    return total
