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
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Costs", "measure_costs", "plan_total_steps", "MARGIN"]

# Kept free of the budget for what is not timed in advance: checkpoint writes, the progress bar,
# and the noise of a shared machine.
MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds per train step, and per epoch end (validation and samples), as measured here."""

    step_s: float
    epoch_end_s: float


def measure_costs(trainer: Any, epoch_end: Callable[[Any], Any], timed_chunks: int = 1) -> Costs:
    """Time ``trainer``'s compiled chunk and one ``epoch_end(state)`` on a scratch state.

    The first chunk compiles (not timed), then ``timed_chunks`` chunks of ``chunk_steps`` steps
    are timed; ``epoch_end`` (everything a run does at an epoch's end: validation, samples, the
    checkpoint, the plot) is run twice and the second run timed (the first compiles what it
    needs). The scratch state is dropped: nothing here touches the run's own state.
    """
    n = trainer.chunk_sizes(0)[0]
    scratch = trainer.init_state()
    scratch, _ = trainer.run_chunk(scratch, n)  # compiles; its losses reached the host: done
    start = time.perf_counter()
    for _ in range(timed_chunks):
        scratch, _ = trainer.run_chunk(scratch, n)
    step_s = (time.perf_counter() - start) / (timed_chunks * n)
    epoch_end(scratch)
    start = time.perf_counter()
    epoch_end(scratch)
    return Costs(step_s, time.perf_counter() - start)


def plan_total_steps(seconds_left: float, costs: Costs, steps_per_epoch: int, margin: float = MARGIN) -> int:
    """The largest step count ``N`` whose steps and epoch ends fit in ``seconds_left``:
    ``N * step_s + ceil(N / steps_per_epoch) * epoch_end_s <= (1 - margin) * seconds_left``
    (the run ends with an epoch end, whole or not). 0 when not even one step and its epoch end fit."""
    budget = (1 - margin) * seconds_left

    def cost(n: int) -> float:
        return n * costs.step_s + math.ceil(n / steps_per_epoch) * costs.epoch_end_s

    lo, hi = 0, max(int(budget / max(costs.step_s, 1e-9)), 0)
    while lo < hi:  # cost grows with n: the largest n with cost(n) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo
