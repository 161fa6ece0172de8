"""Which blocks each stage trains, and how fast a pipeline can be.

A pipeline of stages that work at the same time on consecutive batches goes as fast as its
slowest stage: with per-block step times ``t_1 .. t_L`` and stages of contiguous blocks, one
batch leaves the pipeline every ``max_k sum_{l in stage k} t_l`` (plus the time to pass a
message). Stage 0 also makes each batch (reads it, draws its views and negatives): that time
counts with block 1's (:func:`with_data`). :func:`balanced_split` chooses the contiguous split
that makes this bound smallest and :func:`predicted_speedup` gives the speed-up over one
process, ``sum_l t_l / max_k T_k``; it assumes each stage has a device of its own and ignores the
time of the messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule

__all__ = ["balanced_split", "check_split", "measure_block_times", "measure_data_seconds",
           "measure_on_fresh_batch", "predicted_speedup", "stage_ranges", "stage_times",
           "with_data"]


def check_split(split: Sequence[int], n_blocks: int) -> None:
    """A ValueError unless ``split`` gives every stage >= 1 block and adds up to ``n_blocks``."""
    if any(k < 1 for k in split):
        raise ValueError(f"parallel.split={list(split)} is invalid: every stage needs >= 1 block")
    if sum(split) != n_blocks:
        raise ValueError(
            f"parallel.split={list(split)} adds up to {sum(split)} blocks but the network has "
            f"{n_blocks}; give block counts that add up to {n_blocks}"
        )


def stage_ranges(split: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of the blocks of every stage."""
    bounds = [0]
    for k in split:
        bounds.append(bounds[-1] + k)
    return list(zip(bounds[:-1], bounds[1:]))


def stage_times(times: Sequence[float], split: Sequence[int]) -> list[float]:
    """Step time of every stage: the sum of its blocks' times."""
    return [float(sum(times[a:b])) for a, b in stage_ranges(split)]


def balanced_split(times: Sequence[float], stages: int) -> list[int]:
    """The contiguous split of blocks into ``stages`` groups whose slowest group is fastest
    (ties: the first such split in the order of the search, earlier stages larger)."""
    n = len(times)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} stages")
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + float(t))
    inf = float("inf")
    # best[k][i]: smallest bottleneck of the first i blocks in k stages; cut[k][i]: last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    split, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        split.append(i - j)
        i = j
    return split[::-1]


def predicted_speedup(times: Sequence[float], split: Sequence[int]) -> float:
    """Throughput of the pipeline over that of one process: ``sum(times) / slowest stage``."""
    return float(sum(times)) / max(stage_times(times, split))


def measure_block_times(net: BlockNet, rule: Rule, batch: Batch, repeats: int = 2) -> list[float]:
    """Seconds of one training step of every block on ``batch`` (the fastest of ``repeats``).

    Fills and then clears ``.grad``; the parameters, buffers and the rule's state (a step
    count, prototypes placed) are restored afterwards. Draw ``batch`` with a generator of its
    own (and under :func:`torch.random.fork_rng`) so that the run's random numbers stay
    untouched.
    """
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in (net, rule)]
    try:
        return _block_times(net, rule, batch, repeats)
    finally:
        for module, state in saved:
            module.load_state_dict(state)


def _block_times(net: BlockNet, rule: Rule, batch: Batch, repeats: int) -> list[float]:
    n_blocks = len(net.blocks)
    times = [float("inf")] * n_blocks
    start = rule.start_carry(net, batch)
    signal = None  # with late signals from the top: a block's step is its pass and its update
    if rule.late_feedback:
        top = start
        for level in range(n_blocks):
            top = rule.frozen_carry(net, top, level, level + 1)
        signal, _ = rule.feedback_signal(net, top)
    for _ in range(repeats):
        carry = start
        for level in range(n_blocks):
            t0 = time.perf_counter()
            if signal is None:
                _, carry = rule.blocks_grads(net, carry, level, level + 1)
            else:
                rule.blocks_grads(net, rule.with_feedback(carry, signal), level, level + 1)
                carry = rule.frozen_carry(net, carry, level, level + 1)
            times[level] = min(times[level], time.perf_counter() - t0)
    for p in list(net.parameters()) + list(rule.parameters()):
        p.grad = None
    return times


def measure_on_fresh_batch(net: BlockNet, rule: Rule, task, batch_size: int, seed: int,
                           device: torch.device, repeats: int = 2) -> list[float]:
    """:func:`measure_block_times` on a batch drawn with its own generator, the global random
    states (of the CPU and of ``device``) restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        gen = torch.Generator().manual_seed(seed + 104729)
        batch = next(iter(task.batches(gen, batch_size, rule.view_kind)))
        return measure_block_times(net, rule, batch, repeats)


def with_data(times: Sequence[float], data: float) -> list[float]:
    """Block times with stage 0's time to make a batch added to block 1's (it always runs on
    stage 0): what the split and the model balance."""
    return [times[0] + data, *times[1:]] if len(times) else []


def measure_data_seconds(rule: Rule, net: BlockNet, task, batch_size: int, seed: int,
                         device: torch.device, repeats: int = 2) -> float:
    """Seconds for stage 0 to make one batch: draw it (views included) and its carry
    (negatives), the fastest of ``repeats`` batches after the first (which also draws the
    epoch's order); on a generator of its own, the global random states restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    best = float("inf")
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 104723)
        batches = iter(task.batches(gen, batch_size, rule.view_kind))
        rule.start_carry(net, next(batches))
        for _ in range(repeats):
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            rule.start_carry(net, batch)
            best = min(best, time.perf_counter() - t0)
    return 0.0 if best == float("inf") else best
