"""Top-down signals that arrive late (``parallel.feedback_delay = D``).

A rule whose blocks learn from a signal of the top (CLAPP++DFB's top context, the DFA family's
output error) cannot update a low block before the batch has reached the top. With a delay of
``D`` batches every block keeps its input of each batch that passes it; when the signal of batch
``t`` arrives, at step ``t + D``, the block recomputes its output on the kept input with the
weights it has then and applies its update. Each epoch takes ``N + D`` optimiser steps: the
first ``D`` update nothing but what learns from the top at once (the DFA read-out), the last
``D`` only drain the kept batches, so every parameter gets one update per batch.

The arithmetic is the same in one process (:class:`DelayedSteps`, the signals in a queue) and in
a pipeline (:class:`KeptInputs` per stage, the signals sent down from the last stage), so a
pipelined run equals its one-process simulation bit for bit; the delay's effect on learning is
measured apart from the parallelism by running the simulation.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule

__all__ = ["DelayedSteps", "KeptInputs", "enable_delay", "merge_tick", "tensor_bytes"]


def enable_delay(rule: Rule, delay: int) -> None:
    """Set ``rule`` to take its signal from the top late (``delay`` > 0; 0 changes nothing);
    a one-line ValueError when it has no such signal."""
    if not delay:
        return
    why = rule.delay_refusal()
    if why is not None:
        raise ValueError(f"parallel.feedback_delay={delay} does not apply: {why}; valid: "
                         "parallel.feedback_delay=0")
    rule.late_feedback = True


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors in ``obj`` (dicts, lists, tuples of tensors)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


class KeptInputs:
    """The inputs that blocks ``start..stop-1`` keep for the batches whose signal has not come.

    :meth:`forward` passes a batch's carry through the blocks (no gradients), keeping what each
    block received; :meth:`update` fills ``.grad`` of the blocks for the oldest kept batch from
    its signal, block by block, each block on its own kept input.
    """

    def __init__(self, rule: Rule, start: int, stop: int):
        self.rule, self.start, self.stop = rule, start, stop
        self.kept: deque[tuple[int, list[dict[str, Any]]]] = deque()
        self.batch_bytes = 0  # of one kept batch (the first one)

    def __len__(self) -> int:
        return len(self.kept)

    def peak_mib(self, delay: int) -> float:
        """The most memory the kept inputs take with ``delay``: ``delay + 1`` batches."""
        return self.batch_bytes * (delay + 1) / 2**20

    def forward(self, net: BlockNet, carry: dict[str, Any], n: int) -> dict[str, Any]:
        """Keep ``carry`` at every block of the range; return what block ``stop`` receives."""
        inputs = []
        for level in range(self.start, self.stop):
            inputs.append(carry)
            carry = self.rule.frozen_carry(net, carry, level, level + 1)
        if not self.batch_bytes:
            self.batch_bytes = tensor_bytes(inputs)
        self.kept.append((n, inputs))
        return carry

    def update(self, net: BlockNet, signal: Any) -> tuple[dict[str, float], float | None, int]:
        """Gradients of the oldest kept batch from its ``signal``: the blocks' metrics, the sum
        of their losses (``None`` where they report none), and the batch's size."""
        n, inputs = self.kept.popleft()
        metrics: dict[str, float] = {}
        total: float | None = None  # None: the blocks report no loss (DFA)
        for level, carry in zip(range(self.start, self.stop), inputs):
            carry = self.rule.with_feedback({**carry, "loss": 0.0}, signal)
            block, _ = self.rule.blocks_grads(net, carry, level, level + 1)
            if "loss" in block:
                total = (total or 0.0) + block.pop("loss")
            metrics.update(block)
        return metrics, total, n


def merge_tick(top: dict[str, float], blocks: dict[str, float] | None,
               total: float | None) -> dict[str, float]:
    """One step's metrics: the top's (of the newest batch) and the blocks' (of the batch whose
    signal came); ``loss`` is the top's where it has one (DFA's read-out), else the blocks'."""
    out = dict(blocks or {})
    out.update(top)
    if "loss" not in out and total is not None:
        out["loss"] = total
    return out


class DelayedSteps:
    """The one-process run of a delayed rule: every block of the network, the signals queued.

    The loop calls :meth:`step` once per batch (after zeroing the gradients; it steps the
    optimiser afterwards) and, at the end of the epoch, :meth:`drain` while :meth:`pending`.
    """

    def __init__(self, rule: Rule, n_blocks: int, delay: int):
        self.rule, self.delay = rule, delay
        self.inputs = KeptInputs(rule, 0, n_blocks)
        self.signals: deque[Any] = deque()

    def kept_mib(self) -> float:
        """The most memory the kept inputs take: ``delay + 1`` batches."""
        return self.inputs.peak_mib(self.delay)

    def step(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        carry = self.rule.start_carry(net, batch)
        out = self.inputs.forward(net, carry, batch.x.shape[0])
        signal, top = self.rule.feedback_signal(net, out)
        self.signals.append(signal)
        if len(self.inputs) <= self.delay:
            return merge_tick(top, None, None)
        blocks, total, _ = self.inputs.update(net, self.signals.popleft())
        return merge_tick(top, blocks, total)

    def pending(self) -> int:
        return len(self.inputs)

    def drain(self, net: BlockNet) -> tuple[dict[str, float], int]:
        """The update of the oldest kept batch (end of the epoch): its metrics and size."""
        blocks, total, n = self.inputs.update(net, self.signals.popleft())
        return merge_tick({}, blocks, total), n
