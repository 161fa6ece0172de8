"""How each stage of a pipeline spent an epoch: working, or waiting for a message.

A stage waits when it receives a batch that the stage below has not finished, when the stage
above has not yet taken the batches it posted (:data:`~locallearn.parallel.messages.IN_FLIGHT`
under way), and, with late signals, when a signal from the top has not come. Everything else
(making batches on stage 0, the blocks' steps, the optimiser) is work. The busiest stage sets
the pace; the others' waiting is what an uneven split costs. When the split was chosen from
block times measured at the start, the block times of each stage are scaled to what the stage
really worked, and the balanced split of the scaled times is suggested where it would make the
busiest stage at least :data:`MARGIN` faster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from locallearn.parallel.split import balanced_split, stage_ranges, stage_times

__all__ = ["MARGIN", "StageClock", "calibrated_split", "stage_report"]


class StageClock:
    """The seconds of one stage's epoch, and how many of them it waited."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.waited, self._t0 = 0.0, time.perf_counter()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - t0

    def stop(self) -> tuple[float, float]:
        """``(busy, wall)`` seconds since :meth:`start`."""
        wall = time.perf_counter() - self._t0
        return wall - self.waited, wall


#: a split is suggested when it would cut the busiest stage's time by at least this fraction
MARGIN = 0.05


def calibrated_split(times: Sequence[float], split: Sequence[int],
                     busy: Sequence[float]) -> tuple[list[int], float]:
    """The balanced split of ``times`` after scaling each stage's block times so that they
    add up to the seconds the stage was busy, and its busiest stage's predicted seconds."""
    scaled: list[float] = []
    for (a, b), model, real in zip(stage_ranges(split), stage_times(times, split), busy):
        factor = real / model if model > 0 else 1.0
        scaled += [t * factor for t in times[a:b]]
    better = balanced_split(scaled, len(split))
    return better, max(stage_times(scaled, better))


def stage_report(epoch: int, busy: Sequence[float], wall: float, split: Sequence[int],
                 times: Sequence[float] | None) -> tuple[str, dict]:
    """A line for the log and a record for ``pipeline.json`` of one epoch's stage times
    (``times``: the block times the split was chosen from, stage 0's batch-making included;
    ``None`` for a split given in the config)."""
    parts = ", ".join(f"stage {k + 1} {b:.2f} s ({100 * b / wall:.0f}%)"
                      for k, b in enumerate(busy))
    line = f"pipeline epoch {epoch}: {wall:.2f} s; busy: {parts}"
    record: dict = {"epoch": epoch, "seconds": wall, "busy_seconds": list(busy)}
    if times is not None and len(split) > 1:
        better, slowest = calibrated_split(times, split, busy)
        if better != list(split) and slowest < (1 - MARGIN) * max(busy):
            record["suggested_split"] = better
            line += (f"; the busy times suggest parallel.split={better} "
                     f"(now {list(split)})")
    return line, record
