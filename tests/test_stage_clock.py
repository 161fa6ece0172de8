"""How a pipeline's stages spent an epoch: the clock, and the split the busy times suggest."""

import time

import pytest

from locallearn.parallel.stage_clock import MARGIN, StageClock, calibrated_split, stage_report


def test_the_clock_counts_waiting_apart_from_work():
    clock = StageClock()
    clock.start()
    time.sleep(0.02)  # work
    with clock.waiting():
        time.sleep(0.05)
    busy, wall = clock.stop()
    assert clock.waited >= 0.05 and wall >= 0.07
    assert busy == pytest.approx(wall - clock.waited) and 0.015 < busy < wall - 0.045
    clock.start()
    assert clock.waited == 0.0  # a new epoch starts from nothing


def test_busy_times_scale_each_stage_and_rebalance():
    # the model thought both halves equal; the second stage really worked four times as long
    split, slowest = calibrated_split([1.0, 1.0, 1.0, 1.0], [2, 2], [1.0, 4.0])
    assert split == [3, 1] and slowest == pytest.approx(3.0)  # blocks 1-3: 0.5 + 0.5 + 2.0


def test_a_split_is_suggested_only_when_it_helps_enough():
    times = [1.0] * 20
    # stage 2's blocks scale to 1.15 each: [11, 9] would take 11 s against 11.5 (4% < MARGIN)
    line, record = stage_report(1, [10.0, 11.5], 12.0, [10, 10], times)
    assert MARGIN > 0.04 and "suggested_split" not in record and "suggest" not in line
    # at 1.25 each, [11, 9] takes 11.25 s against 12.5: 10% faster
    line, record = stage_report(1, [10.0, 12.5], 13.0, [10, 10], times)
    assert record["suggested_split"] == [11, 9]
    assert "parallel.split=[11, 9] (now [10, 10])" in line
    assert record["busy_seconds"] == [10.0, 12.5] and record["seconds"] == 13.0
    assert "stage 1 10.00 s (77%), stage 2 12.50 s (96%)" in line


def test_a_given_split_gets_no_suggestion():
    line, record = stage_report(2, [1.0, 4.0], 4.5, [2, 2], None)
    assert record == {"epoch": 2, "seconds": 4.5, "busy_seconds": [1.0, 4.0]}
    assert line.startswith("pipeline epoch 2: 4.50 s; busy:")
