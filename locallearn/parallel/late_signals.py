"""A pipeline's epoch when the top's signal reaches the blocks late (``parallel.feedback_delay``,
:mod:`locallearn.delay`): the last stage sends each batch's signal to every other stage as soon
as it has it, and a stage applies its update for batch ``t`` at its step ``t + D``, waiting for
the signal if it has not come. The arithmetic is that of the one-process simulation, which it
equals bit for bit.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import torch.distributed as dist

from locallearn.delay import KeptInputs, merge_tick
from locallearn.parallel import messages
from locallearn.train import add_metrics

__all__ = ["LateSignalEpochs"]


class LateSignalEpochs:
    """Mixin of :class:`~locallearn.parallel.stage_trainer.PipelineTrainer` (listed before it):
    the epoch with late signals from the top."""

    def _train_epoch_late(self) -> dict[str, float]:
        """An epoch with the top's signals arriving ``feedback_delay`` batches late."""
        self.net.train()
        kept = KeptInputs(self.rule, self.start, self.stop)
        own: deque[Any] = deque()  # the last stage's own signals
        posted: list[messages.Posted] = []  # the signals sent down (last stage)
        sent: list[messages.Posted] = []  # the batches sent on (other stages)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for n, carry in self._incoming():
            self._late_tick(kept, own, (posted, sent), carry, n, sums, counts)
        if not self.last:
            self.send_forward(sent, messages.END)
        while len(kept):  # drain the kept batches
            self._late_tick(kept, own, (posted, sent), None, 0, sums, counts)
        with self.clock.waiting():
            messages.settle(posted)
            messages.settle(sent)
        self._record_stage_times()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, {k: v / counts[k] for k, v in sums.items()})
        merged: dict[str, float] = {}
        for part in parts:
            merged.update({k: v for k, v in part.items() if k != "loss_part"})
        if "loss" not in merged:  # the blocks' losses, stage by stage
            merged["loss"] = sum(part["loss_part"] for part in parts if "loss_part" in part)
        return merged

    def _late_tick(self, kept: KeptInputs, own: deque, outgoing: tuple[list, list],
                   carry: dict | None, n: int, sums: dict[str, float],
                   counts: dict[str, int]) -> None:
        """One optimiser step: pass the new batch on (``carry``; ``None`` while draining) and
        apply the update of the oldest kept batch whose signal is due (``outgoing``: the
        signals posted down and the batches posted on, still under way)."""
        posted, sent = outgoing
        self.opt.zero_grad(set_to_none=True)
        top: dict[str, float] = {}
        blocks, total = None, None
        with self.autocast():
            if carry is not None:
                out = kept.forward(self.net, carry, n)
                if self.last:
                    signal, top = self.rule.feedback_signal(self.net, out)
                    own.append(signal)
                    posted.extend(messages.post_object(signal, self.peer(k))
                                  for k in range(self.stages - 1))
                    # every stage below is at this batch or past it, so it has taken the
                    # signals older than D + 1 batches: their sends are done; forget them
                    with self.clock.waiting():
                        messages.settle(posted, keep=(self.stages - 1) * (self.delay + 2))
                else:
                    self.send_forward(sent, (n, out))
                if self.epoch == 0 and len(kept) == 1:
                    self._announce_kept(kept)
            if len(kept) > (self.delay if carry is not None else 0):
                if self.last:
                    signal = own.popleft()
                else:
                    with self.clock.waiting():
                        signal = messages.recv(self.peer(self.stages - 1), self.device)
                blocks, total, n_done = kept.update(self.net, signal)
                n = n if carry is not None else n_done
        loss = top.get("loss", total)
        if loss is not None:
            self._check_stage_loss(loss)
        self.optimizer_step()
        metrics = merge_tick(top, blocks, None)
        if total is not None:
            metrics["loss_part"] = total
        add_metrics(sums, counts, metrics, n)

    def _announce_kept(self, kept: KeptInputs) -> None:
        """Print what the stage's blocks keep for the late signals (once, at the first batch)."""
        mib = kept.peak_mib(self.delay)
        print(f"locallearn: stage {self.stage} (blocks {self.start + 1}-{self.stop}) keeps up "
              f"to {self.delay + 1} batches of its blocks' inputs for "
              f"parallel.feedback_delay={self.delay}: {mib:.2f} MiB", file=sys.stderr,
              flush=True)
