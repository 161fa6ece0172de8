"""The training loop of one stage of a pipeline (see :mod:`locallearn.parallel`).

:class:`PipelineTrainer` is the one training loop (:class:`locallearn.train.Trainer`) with four
parts replaced: the epoch (stage 0 draws the batches and views; every stage trains its blocks on
what it receives and passes their output on), the optimiser (one per stage, over its blocks'
parameters and prediction matrices), the evaluation (the blocks are gathered on rank 0, which
evaluates; the row goes to every rank) and the checkpoint (gathered on rank 0 in the layout of a
one-process run, so a pipelined run resumes with any split, or in one process, and the other
commands read its output directory as any other).

Exactness: each stage does the arithmetic a one-process step does for its blocks, in the same
order, on the same values (a rule's ``compute_grads`` is its ``blocks_grads`` over every block),
and every random number (the permutation, the views, the negatives) is drawn on stage 0 in the
order of a one-process run. On CPU a pipelined run therefore ends bit-identical to a one-process
run. Between epochs the pipeline drains (the evaluation needs every block after the same step),
so each epoch pays ``stages - 1`` batches of filling.

With late signals from the top (``parallel.feedback_delay = D``, :mod:`locallearn.delay`) the
last stage sends each batch's signal to every other stage as soon as it has it; a stage keeps
its blocks' inputs and applies its update for batch ``t`` at its step ``t + D``, waiting for the
signal if it has not come (with ``D >= stages - 1`` it has). The arithmetic is that of the
one-process simulation (``parallel.stages=1`` with the same delay), which it equals bit for bit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from locallearn import distributed as ddp
from locallearn.errors import RunError
from locallearn.optim import block_groups
from locallearn.parallel import messages
from locallearn.parallel.checks import check_pipeline
from locallearn.parallel.late_signals import LateSignalEpochs
from locallearn.parallel.split import (
    balanced_split,
    measure_data_seconds,
    measure_on_fresh_batch,
    predicted_speedup,
    stage_ranges,
    with_data,
)
from locallearn.parallel.stage_clock import StageClock, stage_report
from locallearn.parallel.stage_optimizer import StageOptimizer
from locallearn.parallel.travelling_rng import TravellingGenerator
from locallearn.schema import RunConfig
from locallearn.task import Task
from locallearn.train import Trainer, add_metrics, build_optimizer, write_json_atomic

PIPELINE_FILE = "pipeline.json"


class PipelineTrainer(LateSignalEpochs, Trainer):
    """One stage (this process's rank) of a pipelined run; see the module docstring."""

    def __init__(self, cfg: RunConfig, task: Task, out_dir: str | Path):
        ddp.mark_pipelined()  # the ranks are stages: no rule averages or broadcasts among them
        super().__init__(cfg, task, out_dir)
        n_blocks = len(self.net.blocks)
        check_pipeline(cfg, self.rule, n_blocks, self.world)
        self.stages = cfg.parallel.stages
        #: ``replicas`` copies of each stage split each batch (ranks ``stage * replicas + r``)
        self.replicas = self.world // self.stages
        self.stage, self.replica = divmod(self.rank, self.replicas)
        self.stage_group = self._stage_groups()
        self.block_times: list[float] | None = None
        self.data_seconds = 0.0  # stage 0's time to make a batch (measured with block_times)
        self.split = self._choose_split(n_blocks)
        self.start, self.stop = stage_ranges(self.split)[self.stage]
        everything = self.rule.trained_parameters(self.net)
        self._trained = {id(p) for p in everything}
        # the one-process optimiser's order of its parameters (its groups', one per block with
        # per-block settings)
        groups, owners = block_groups(cfg.optim, everything, self.param_blocks)
        per_block = owners != [None]
        order = [p for g in groups for p in g["params"]] if per_block else everything
        where = {id(p): i for i, p in enumerate(order)}
        owned = [self.stage_parameters(k) for k in range(self.stages)]
        flat = [id(p) for part in owned for p in part]
        if sorted(flat) != sorted(where) or len(set(flat)) != len(flat):
            raise ValueError(f"parallel.stages={self.stages} cannot pipeline rule "
                             f"{self.rule.name}: some of its parameters belong to no one block")
        for k, part in enumerate(owned):
            if not part:
                a, b = stage_ranges(self.split)[k]
                raise ValueError(
                    f"parallel.split={self.split} gives stage {k + 1} (blocks {a + 1}-{b}) "
                    f"nothing to train: rule {self.rule.name} leaves those blocks as they are; "
                    "give them to a stage that trains a block")
        self.params = owned[self.stage]
        # per optimiser step, as in one process
        opt, self.sched = build_optimizer(cfg, self.params, self._steps_per_epoch(),
                                          self.param_blocks)
        self.opt = StageOptimizer(opt, [where[id(p)] for g in opt.param_groups
                                        for p in g["params"]], len(everything), per_block)
        self.first = self.stage == 0
        self.last = self.stage == self.stages - 1
        self.rng = TravellingGenerator(self.generator, self.rank, self.world)
        self.clock = StageClock()
        self.pipeline_info: dict[str, Any] = {}
        if self.main:
            self._announce()

    def _stage_groups(self) -> Any:
        """The process group of this stage's replicas (``None`` without replicas); every rank
        creates every group, in the same order."""
        if self.replicas == 1:
            return None
        mine = None
        for k in range(self.stages):
            group = dist.new_group(list(range(k * self.replicas, (k + 1) * self.replicas)))
            if k == self.stage:
                mine = group
        return mine

    def peer(self, stage: int) -> int:
        """The rank of ``stage`` in this process's replica chain."""
        return stage * self.replicas + self.replica

    @property
    def heads(self) -> list[int]:
        """The first replica of every stage above 0 (they hold every stage's blocks)."""
        return [k * self.replicas for k in range(1, self.stages)]

    # ------------------------------------------------------------------ the split
    def _choose_split(self, n_blocks: int) -> list[int]:
        """The explicit ``parallel.split``, or one balanced from block times measured on rank 0."""
        if self.cfg.parallel.split is not None:
            return list(self.cfg.parallel.split)
        box: list[Any] = [None]
        if self.main:
            args = (self.task, self.cfg.batch_size, self.cfg.seed, self.device)
            box[0] = (measure_on_fresh_batch(self.net, self.rule, *args),
                      measure_data_seconds(self.rule, self.net, *args))
        dist.broadcast_object_list(box, 0)
        self.block_times, self.data_seconds = box[0]
        return balanced_split(with_data(self.block_times, self.data_seconds), self.stages)

    def _announce(self) -> None:
        ranges = stage_ranges(self.split)
        groups = " | ".join(f"{a + 1}" if b - a == 1 else f"{a + 1}-{b}" for a, b in ranges)
        line = f"pipeline: {self.stages} stages, split {self.split} (blocks {groups})"
        info: dict[str, Any] = {"stages": self.stages, "split": self.split}
        if self.block_times is not None:
            ms = ", ".join(f"{1000 * t:.1f}" for t in self.block_times)
            speedup = predicted_speedup(with_data(self.block_times, self.data_seconds),
                                        self.split)
            line += (f"; measured block step ms: {ms}, making a batch on stage 0: "
                     f"{1000 * self.data_seconds:.1f}; predicted speed-up {speedup:.2f}x")
            info.update(block_seconds=self.block_times, data_seconds=self.data_seconds,
                        predicted_speedup=speedup)
        else:
            line += " (from parallel.split)"
        print(f"locallearn: {line}", file=sys.stderr, flush=True)
        self.pipeline_info = {**info, "epochs": []}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / PIPELINE_FILE, self.pipeline_info)

    def _record_stage_times(self) -> None:
        """Gather how long each stage worked this epoch; rank 0 adds it to ``pipeline.json``
        and prints it after the first epoch (with a better split, if the times suggest one)."""
        busy, wall = self.clock.stop()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (busy, wall))
        if not self.main:
            return
        per_stage = [max(b for b, _ in parts[k * self.replicas:(k + 1) * self.replicas])
                     for k in range(self.stages)]
        times = (None if self.block_times is None
                 else with_data(self.block_times, self.data_seconds))
        line, record = stage_report(self.epoch + 1, per_stage, max(w for _, w in parts),
                                    self.split, times)
        self.pipeline_info["epochs"].append(record)
        write_json_atomic(self.out / PIPELINE_FILE, self.pipeline_info)
        if len(self.pipeline_info["epochs"]) == 1:
            print(f"locallearn: {line}", file=sys.stderr, flush=True)

    def stage_parameters(self, k: int) -> list[torch.nn.Parameter]:
        """The parameters stage ``k`` trains: its blocks' and their rule-owned ones."""
        a, b = stage_ranges(self.split)[k]
        out: list[torch.nn.Parameter] = []
        for level in range(a, b):
            out += list(self.net.blocks[level].parameters()) + self.rule.block_parameters(level)
        return [p for p in out if id(p) in self._trained]  # not a block the rule leaves alone

    def _stage_tensors(self, k: int) -> list[torch.Tensor]:
        a, b = stage_ranges(self.split)[k]
        out = list(self.stage_parameters(k))
        for level in range(a, b):
            out += list(self.net.blocks[level].buffers())
        return out

    # ------------------------------------------------------------------ gathering on rank 0
    @torch.no_grad()
    def gather_blocks(self) -> None:
        """Copy every stage's blocks (and prediction matrices) into rank 0's network."""
        mine = [t.detach() for t in self._stage_tensors(self.stage)]
        parts = messages.gather_to_main(mine, self.rank, self.heads, self.device)
        for k, tensors in enumerate(parts[1:], start=1):
            for dst, src in zip(self._stage_tensors(k), tensors):
                dst.copy_(src)

    def evaluate(self, epoch: int, train_metrics: dict[str, float]) -> dict[str, Any]:
        self.gather_blocks()
        box: list[Any] = [super().evaluate(epoch, train_metrics) if self.main else None]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def curve_metrics(self) -> dict[str, Any]:
        """The learning curve's probe of the gathered network, on rank 0; the metrics go to
        every rank (each counts the wait as probe time, not training time)."""
        self.gather_blocks()
        box: list[Any] = [super().curve_metrics() if self.main else None]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def save_checkpoint(self) -> None:
        self.gather_blocks()
        box: list[Any] = [self.first_loss]  # of the whole loss: the last stage's
        dist.broadcast_object_list(box, self.heads[-1])
        self.first_loss = box[0]
        mine = (self.opt.index, self.opt.local_state_dict())
        parts = messages.gather_to_main(mine, self.rank, self.heads, self.device)
        if self.main:
            self.opt.set_gathered(parts)
        super().save_checkpoint()

    def state(self) -> dict[str, Any]:
        return {**super().state(), "pipeline": {"stages": self.stages, "split": self.split}}

    def final_metrics(self) -> dict[str, Any]:
        """Rank 0 (which holds every block) runs the final metrics (the probe); the other
        stages end without waiting for it, so a long probe meets no collective's time-out."""
        return super().final_metrics() if self.main else {}

    def summary(self, stopped_early: bool) -> dict[str, Any]:
        return {**super().summary(stopped_early),
                "parallel": {"stages": self.stages, "split": self.split}}

    # ------------------------------------------------------------------ the epoch
    def train_epoch(self) -> dict[str, float]:
        self.rng.sync()
        self.clock.start()
        if self.delay:
            return self._train_epoch_late()
        self.net.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        sent: list[messages.Posted] = []
        for n, carry in self._incoming():
            carry = self._step(self.rng.adopt(carry), n, sums, counts)
            if not self.last:
                self.send_forward(sent, (n, self.rng.stamp(carry)))
        if not self.last:
            self.send_forward(sent, messages.END)
            with self.clock.waiting():
                messages.settle(sent)
        self._record_stage_times()
        mine = {key: value / counts[key] for key, value in sums.items()
                if key != "loss" or self.last}
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        merged: dict[str, float] = {}
        for part in parts[:: self.replicas]:  # blocks in order, the total loss from the last
            merged.update(part)
        return merged

    def send_forward(self, sent: list[messages.Posted], obj: Any) -> None:
        """Post ``obj`` to the next stage, keeping at most ``messages.IN_FLIGHT`` under way."""
        sent.append(messages.post_object(obj, self.peer(self.stage + 1)))
        with self.clock.waiting():
            messages.settle(sent, keep=messages.IN_FLIGHT)

    def _step(self, carry: dict[str, Any], n: int, sums: dict[str, float],
              counts: dict[str, int]) -> dict[str, Any]:
        """Train this stage's blocks on one batch; return what the next stage receives."""
        self.opt.zero_grad(set_to_none=True)
        part = carry.get("part")  # this replica's share of the batch (with replicas)
        with self.autocast():  # precision=bf16, as in one process
            metrics, carry = self.rule.blocks_grads(self.net, carry, self.start, self.stop)
        if part is not None:  # the stage's replicas: the gradient of the whole batch
            if "generator" in carry:
                raise ValueError(f"rule {self.rule.name} draws random numbers above stage 0; "
                                 f"valid: parallel.stages={self.stages} processes, no replicas")
            carry = {**carry, "part": part}
            ddp.average_grads(self.params, part, self.stage_group)
            metrics = ddp.average_metrics(metrics, part, self.stage_group)
        loss = metrics["loss"]  # the total of every block up to this stage's last
        if self.last:  # the whole loss, as in one process
            self._check_loss(loss)
        else:
            self._check_stage_loss(loss)
        self.optimizer_step()  # and the schedule, per step as in one process
        add_metrics(sums, counts, metrics, n)
        return carry

    def _check_stage_loss(self, loss: float) -> None:
        """Stop the run when this stage's part of the loss is not finite."""
        if not math.isfinite(loss):
            raise RunError(
                f"{self.label} diverged at epoch {self.epoch + 1} (stage {self.stage}, blocks "
                f"{self.start + 1}-{self.stop}): the loss is {loss}; lower optim.lr; "
                f"{self._kept()}"
            )

    def _incoming(self):
        """``(n, carry)`` of every batch of the epoch as this stage receives it (``n``: the
        whole batch's size; with replicas the carry is of this replica's part, ``part``)."""
        if self.first:
            for batch in self.task.batches(self.generator, self.cfg.batch_size,
                                           self.rule.view_kind):
                n = batch.x.shape[0]
                if self.replicas == 1:
                    yield n, self.rule.start_carry(self.net, batch)
                    continue
                batch = ddp.shard_batch(batch, self.replica, self.replicas)
                carry = {**self.rule.start_carry(self.net, batch), "part": batch.x.shape[0]}
                if n % self.replicas:  # uneven parts may have drawn unevenly
                    ddp.sync_generator(self.generator, 0, self.stage_group)
                yield n, carry
            return
        while True:
            with self.clock.waiting():
                msg = messages.recv(self.peer(self.stage - 1), self.device)
            if msg == messages.END:
                return
            yield msg
