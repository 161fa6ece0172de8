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
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from locallearn import distributed as ddp
from locallearn.delay import KeptInputs, enable_delay, merge_tick
from locallearn.errors import RunError
from locallearn.optim import block_groups
from locallearn.parallel import messages
from locallearn.parallel.split import (
    balanced_split,
    check_split,
    measure_on_fresh_batch,
    predicted_speedup,
    stage_ranges,
)
from locallearn.schema import RunConfig
from locallearn.task import Task
from locallearn.train import Trainer, add_metrics, build_optimizer, write_json_atomic

PIPELINE_FILE = "pipeline.json"


def check_rule(cfg: RunConfig, rule) -> None:
    """A one-line ValueError when ``rule`` cannot be pipelined (it needs a signal from above
    on the same batch: ``parallel.feedback_delay`` lets it come late)."""
    enable_delay(rule, cfg.parallel.feedback_delay)
    reason = rule.pipeline_refusal()
    if reason is not None:
        raise ValueError(f"parallel.stages={cfg.parallel.stages} cannot pipeline this run: "
                         f"{reason}; valid: parallel.stages=1")


def check_settings(cfg: RunConfig) -> None:
    """One-line ValueErrors for settings a pipeline cannot honour (known before data loads)."""
    if cfg.align_every:
        raise ValueError(f"align_every={cfg.align_every} needs every block in one process; "
                         "valid with parallel.stages > 1: align_every=0")
    if cfg.optim.name == "lars":
        raise ValueError("optim.name=lars (two parameter groups: weights and the rest) does not "
                         "run pipelined; valid with parallel.stages > 1: adam, adamw, sgd")
    if cfg.max_seconds is not None:
        raise ValueError(f"max_seconds={cfg.max_seconds:g} does not run pipelined (each stage "
                         "would spend the budget at its own epoch); valid with "
                         "parallel.stages > 1: max_seconds=null")
    if cfg.layerwise.epochs is not None:
        raise ValueError("layerwise.epochs (a layer-wise schedule) does not run pipelined: a "
                         "greedy schedule trains one block at a time; valid with "
                         "parallel.stages > 1: layerwise.epochs=null")
    streams = getattr(cfg.data, "streams", None)  # image data; the RHM never streams
    if streams is not None and streams():
        raise ValueError("parallel.stages > 1 cannot stream its data (every stage would decode "
                         "a part of each batch that only stage 0 uses); valid with streamed "
                         "data: parallel.stages=1 (data parallel: torchrun without "
                         "parallel.stages)")
    if not float(cfg.probe_every).is_integer():
        raise ValueError(f"probe_every={cfg.probe_every:g} would probe inside an epoch, while "
                         "the stages are at different steps; valid with parallel.stages > 1: "
                         "whole epochs (0, 1, 2, ...)")


def check_pipeline(cfg: RunConfig, rule, n_blocks: int, world: int) -> None:
    """One-line ValueErrors for a pipeline that cannot run (in the order a user meets them)."""
    k = cfg.parallel.stages
    check_rule(cfg, rule)
    if k > n_blocks:
        raise ValueError(f"parallel.stages={k} is more than the network's {n_blocks} blocks; "
                         f"valid: 1 to {n_blocks}")
    if cfg.parallel.split is not None:
        check_split(cfg.parallel.split, n_blocks)
    check_settings(cfg)
    if world % k:
        raise ValueError(
            f"parallel.stages={k} needs {k} processes, one per stage, or a multiple of {k} for "
            f"replicas of every stage (torchrun --nproc_per_node={k} -m locallearn run ...); "
            f"this run has {world}"
        )
    if world > k:
        why = rule.data_parallel_refusal()
        if why is not None:
            raise ValueError(f"{world // k} replicas of each stage do not fit "
                             f"rule.name={rule.name}: {why}")
        if cfg.parallel.feedback_delay:
            raise ValueError(f"parallel.feedback_delay={cfg.parallel.feedback_delay} does not "
                             f"run with replicas of the stages; valid: {k} processes")


class StageOptimizer:
    """The optimiser of one stage, whose state dict is that of the whole run.

    ``load_state_dict`` takes a one-process optimiser state (every trained parameter, in the
    rule's order) and keeps this stage's part; ``state_dict`` returns the whole run's state once
    :meth:`set_gathered` has been given every stage's part (rank 0, at checkpoints).
    """

    def __init__(self, opt: torch.optim.Optimizer, index: list[int], total: int,
                 per_block: bool = False):
        self.opt = opt
        self.index = index  # global position of each of this stage's parameters
        self.total = total
        #: one parameter group per block (per-block optimiser settings), else one group
        self.per_block = per_block
        self._gathered: list[tuple[list[int], dict]] | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.opt.step()

    def local_state_dict(self) -> dict:
        return self.opt.state_dict()

    def set_gathered(self, parts: list[tuple[list[int], dict]]) -> None:
        """Every stage's ``(index, local state dict)``, in stage order."""
        self._gathered = parts

    def state_dict(self) -> dict:
        if self._gathered is None:
            raise RuntimeError("the stages' optimiser states have not been gathered")
        state: dict[int, Any] = {}
        for index, part in self._gathered:
            for i, value in part["state"].items():
                state[index[i]] = value
        if self.per_block:  # the stages' groups, in block order: the one-process layout
            groups = [{**g, "params": [index[i] for i in g["params"]]}
                      for index, part in self._gathered for g in part["param_groups"]]
        else:
            groups = [{**g, "params": list(range(self.total))}
                      for g in self._gathered[0][1]["param_groups"]]
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, full: dict) -> None:
        where = {g: i for i, g in enumerate(self.index)}
        state = {where[g]: v for g, v in full["state"].items() if g in where}
        if self.per_block:  # this stage's blocks' groups
            groups = [{**g, "params": [where[i] for i in g["params"] if i in where]}
                      for g in full["param_groups"]]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{**g, "params": list(range(len(self.index)))}
                      for g in full["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})


class TravellingGenerator:
    """The run's generator when blocks above stage 0 draw from it (a rule whose carry holds
    ``generator``, e.g. a module placing its prototypes): its state travels with the carry.

    Each stage counts the steps at which its copy changed, starting from the count it adopted;
    a carry holds the newest ``(count, state)`` a stage has seen, and a stage adopts a newer one
    when it receives it. When one stage at a time draws, in the order of the batches, every
    draw starts from the state a one-process run has at that point. At each epoch's start
    every stage adopts the newest state (the next permutation is drawn from it)."""

    def __init__(self, generator: torch.Generator, rank: int, world: int):
        self.generator, self.rank, self.world = generator, rank, world
        self.count = 0
        self.seen = generator.get_state()

    def _note(self) -> None:
        state = self.generator.get_state()
        if not torch.equal(state, self.seen):
            self.count, self.seen = self.count + 1, state

    def sync(self) -> None:
        """Every stage takes the newest state (ties: the lowest rank's)."""
        self._note()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (self.count, -self.rank, self.seen))
        count, _, state = max(parts, key=lambda p: (p[0], p[1]))
        self.generator.set_state(state)
        self.count, self.seen = count, state

    def adopt(self, carry: dict[str, Any]) -> dict[str, Any]:
        """The carry as this stage's rule reads it: the generator is this stage's, newest."""
        if "rng" not in carry:
            return carry
        count, state = carry["rng"]
        if count > self.count:
            self.generator.set_state(state)
            self.count, self.seen = count, state
        return {**{k: v for k, v in carry.items() if k != "rng"}, "generator": self.generator}

    def stamp(self, carry: dict[str, Any]) -> dict[str, Any]:
        """The carry as it travels: the generator replaced by its newest count and state."""
        if "generator" not in carry:
            return carry
        self._note()
        out = {k: v for k, v in carry.items() if k != "generator"}
        return {**out, "rng": (self.count, self.seen)}


class PipelineTrainer(Trainer):
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
            self.block_times = measure_on_fresh_batch(
                self.net, self.rule, self.task, self.cfg.batch_size, self.cfg.seed, self.device
            )
            box[0] = self.block_times
        dist.broadcast_object_list(box, 0)
        self.block_times = box[0]
        return balanced_split(self.block_times, self.stages)

    def _announce(self) -> None:
        ranges = stage_ranges(self.split)
        groups = " | ".join(f"{a + 1}" if b - a == 1 else f"{a + 1}-{b}" for a, b in ranges)
        line = f"pipeline: {self.stages} stages, split {self.split} (blocks {groups})"
        info: dict[str, Any] = {"stages": self.stages, "split": self.split}
        if self.block_times is not None:
            ms = ", ".join(f"{1000 * t:.1f}" for t in self.block_times)
            speedup = predicted_speedup(self.block_times, self.split)
            line += f"; measured block step ms: {ms}; predicted speed-up {speedup:.2f}x"
            info.update(block_seconds=self.block_times, predicted_speedup=speedup)
        else:
            line += " (from parallel.split)"
        print(f"locallearn: {line}", file=sys.stderr, flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / PIPELINE_FILE, info)

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
        if self.delay:
            return self._train_epoch_late()
        self.net.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for n, carry in self._incoming():
            carry = self._step(self.rng.adopt(carry), n, sums, counts)
            if not self.last:
                messages.send((n, self.rng.stamp(carry)), self.peer(self.stage + 1))
        if not self.last:
            messages.send(messages.END, self.peer(self.stage + 1))
        mine = {key: value / counts[key] for key, value in sums.items()
                if key != "loss" or self.last}
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        merged: dict[str, float] = {}
        for part in parts[:: self.replicas]:  # blocks in order, the total loss from the last
            merged.update(part)
        return merged

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
        elif not math.isfinite(loss):
            raise RunError(
                f"{self.label} diverged at epoch {self.epoch + 1} (stage {self.stage}, blocks "
                f"{self.start + 1}-{self.stop}): the loss is {loss}; lower optim.lr; "
                f"{self._kept()}"
            )
        self.optimizer_step()  # and the schedule, per step as in one process
        add_metrics(sums, counts, metrics, n)
        return carry


    # ------------------------------------------------------------------ late signals from the top
    def _train_epoch_late(self) -> dict[str, float]:
        """An epoch with the top's signals arriving ``feedback_delay`` batches late."""
        self.net.train()
        kept = KeptInputs(self.rule, self.start, self.stop)
        own: deque[Any] = deque()  # the last stage's own signals
        posted: list[list[Any]] = []
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for n, carry in self._incoming():
            self._late_tick(kept, own, posted, carry, n, sums, counts)
        if not self.last:
            messages.send(messages.END, self.peer(self.stage + 1))
        while len(kept):  # drain the kept batches
            self._late_tick(kept, own, posted, None, 0, sums, counts)
        messages.settle(posted)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, {k: v / counts[k] for k, v in sums.items()})
        merged: dict[str, float] = {}
        for part in parts:
            merged.update({k: v for k, v in part.items() if k != "loss_part"})
        if "loss" not in merged:  # the blocks' losses, stage by stage
            merged["loss"] = sum(part["loss_part"] for part in parts if "loss_part" in part)
        return merged

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
                batch = shard_replica(batch, self.replica, self.replicas)
                carry = {**self.rule.start_carry(self.net, batch), "part": batch.x.shape[0]}
                if n % self.replicas:  # uneven parts may have drawn unevenly
                    ddp.sync_generator(self.generator, 0, self.stage_group)
                yield n, carry
            return
        while (msg := messages.recv(self.peer(self.stage - 1), self.device)) != messages.END:
            yield msg

    def _late_tick(self, kept: KeptInputs, own: deque, posted: list, carry: dict | None,
                   n: int, sums: dict[str, float], counts: dict[str, int]) -> None:
        """One optimiser step: pass the new batch on (``carry``; ``None`` while draining) and
        apply the update of the oldest kept batch whose signal is due."""
        self.opt.zero_grad(set_to_none=True)
        top: dict[str, float] = {}
        blocks, total = None, None
        with self.autocast():
            if carry is not None:
                out = kept.forward(self.net, carry, n)
                if self.last:
                    signal, top = self.rule.feedback_signal(self.net, out)
                    own.append(signal)
                    posted.extend(messages.post(signal, self.peer(k))
                                  for k in range(self.stages - 1))
                else:
                    messages.send((n, out), self.peer(self.stage + 1))
                if self.epoch == 0 and len(kept) == 1:
                    self._announce_kept(kept)
            if len(kept) > (self.delay if carry is not None else 0):
                signal = (own.popleft() if self.last
                          else messages.take(self.peer(self.stages - 1), self.device))
                blocks, total, n_done = kept.update(self.net, signal)
                n = n if carry is not None else n_done
        loss = top.get("loss", total)
        if loss is not None and not math.isfinite(loss):
            raise RunError(
                f"{self.label} diverged at epoch {self.epoch + 1} (stage {self.stage}, blocks "
                f"{self.start + 1}-{self.stop}): the loss is {loss}; lower optim.lr; "
                f"{self._kept()}"
            )
        self.optimizer_step()
        metrics = merge_tick(top, blocks, None)
        if total is not None:
            metrics["loss_part"] = total
        add_metrics(sums, counts, metrics, n)

    def _announce_kept(self, kept: KeptInputs) -> None:
        """Print what the stage's blocks keep for the late signals (once, at the first batch)."""
        mib = kept.batch_bytes * (self.delay + 1) / 2**20
        print(f"locallearn: stage {self.stage} (blocks {self.start + 1}-{self.stop}) keeps up "
              f"to {self.delay + 1} batches of its blocks' inputs for "
              f"parallel.feedback_delay={self.delay}: {mib:.2f} MiB", file=sys.stderr,
              flush=True)


def shard_replica(batch: Any, replica: int, replicas: int) -> Any:
    """A replica's part of a global batch (its views and per-block views too)."""
    part = ddp.shard_batch(batch, replica, replicas)
    if part.block_views is not None:
        part.block_views = [tuple(ddp.shard(v, replica, replicas) for v in pair)
                            for pair in part.block_views]
    return part
