"""Data-parallel training with ``torch.distributed``: helpers for the training loop.

Every rule fills ``.grad`` before the optimiser steps, so data parallelism needs no wrapper
around the network: each process (rank) computes the gradients of its part of the global batch,
:func:`average_grads` all-reduces them, and every rank takes the same optimiser step, so the
parameters stay identical on every rank.

Launch: ``torchrun --nproc_per_node=N -m locallearn run CONFIG ...`` (torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). Without torchrun
(``WORLD_SIZE`` unset or 1) every helper is a no-op and training is single-process.

How ``train.py`` should call them (``batch_size`` stays the *global* batch size):

1. ``rank, world = init_from_env(cfg.device)`` first thing in ``run()``. On CUDA it selects the
   device ``cuda:LOCAL_RANK``, so the task and the network must be built on
   :func:`local_device` ``(cfg.device)`` instead of ``cfg.device``.
2. Build the task, the network, the rule and the optimiser exactly as now, on every rank: the
   seeds are the same, so the initial weights, the rule's fixed matrices and the run's shuffling
   generator are the same on every rank (call :func:`broadcast_params` on the trained parameters
   and the rule's buffers to be safe against any rank-dependent initialisation).
3. In ``train_epoch``, every rank iterates over the same global batches (same generator, same
   permutation, same random views); before ``compute_grads``, take this rank's contiguous part:
   ``batch = shard_batch(batch, rank, world)`` (it applies :func:`shard` to ``x``, ``y``, the
   views and the per-block view pairs). After ``compute_grads`` and before ``opt.step()``:
   ``average_grads(self.params, batch.x.shape[0])``. Report the metrics of the global batch with
   ``metrics = average_metrics(metrics, batch.x.shape[0])``; use the global batch size (not the
   shard's) for the per-epoch averages. Check the loss for divergence after averaging, so every
   rank stops together.
4. Evaluate on every rank (cheap, deterministic, and label-free rules refit their read-out there,
   which keeps the read-out identical across ranks); only rank 0 writes: ``is_main()`` guards
   ``prepare_output`` (mkdir, ``config.yaml``), ``_write_metrics``, ``save_checkpoint`` and
   ``summary.json``, and the progress bar. After rank 0 saves a checkpoint, ``barrier()``.
   On resume every rank loads the same ``checkpoint.pt`` (the folder must be shared); call
   ``barrier()`` after ``prepare_output`` so no rank reads before rank 0 has written.
5. ``cleanup()`` at the end of ``run()`` (in a ``finally``).

With equal shards, the averaged gradient is the gradient of the global batch exactly for losses
that are means over samples (cross-entropy of backprop, the errors of direct feedback), so
``world`` processes reproduce a single process with the same global batch up to floating-point
summation order. ``average_grads`` weights each rank by its share of the batch, so uneven last
batches are exact too. Rules whose loss couples the samples of a batch (contrastive negatives
drawn from the batch, batch statistics of VICReg-style terms, the batch-averaged gates of
backprop without masking) see only their shard's samples, as with any data-parallel training.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def rank_from_env() -> int:
    """``RANK`` from the environment (0 when unset): this process's rank under ``torchrun``,
    also after the process group is torn down."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK={os.environ['RANK']!r} is not an integer") from None


def init_from_env(device: str = "cpu", timeout: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes; returns ``(rank, world_size)``.

    ``timeout``: seconds a collective operation waits for the other ranks before it fails
    (``None``: torch's default, 30 minutes).

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and ``(0, 1)`` is returned. The
    backend is ``nccl`` when ``device`` is CUDA (``cuda``, ``cuda:N``, or ``auto`` with CUDA
    present), ``gloo`` otherwise; on CUDA the current device becomes ``cuda:LOCAL_RANK``.
    """
    world = world_size_from_env()
    if world <= 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun")
    rank = rank_from_env()
    cuda = _uses_cuda(device)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, **wait)
    exit_with_parent()
    return rank, world


def peer_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective operation that waited longer than the group's timeout."""
    text = str(err).lower()
    return is_initialized() and ("timed out" in text or "timeout" in text)


def exit_with_parent(interval: float = 1.0) -> None:
    """End this process (one line, exit 143) when the process that started it is gone: a rank
    whose launcher (torchrun's agent) was killed must not train on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                print(f"locallearn: rank {os.environ.get('RANK', '?')}: its launcher (process "
                      f"{parent}) is gone; stopping", file=sys.stderr, flush=True)
                os._exit(143)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def _uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def local_device(device: str = "cpu") -> str:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` under torchrun on CUDA."""
    if _uses_cuda(device) and world_size_from_env() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def is_initialized() -> bool:
    """Whether a process group is running (more than one rank)."""
    return dist.is_available() and dist.is_initialized()


_PIPELINE_GROUP: Any = None  # the process group marked as a pipeline's


def mark_pipelined() -> None:
    """Say that the current process group is a pipeline (stages, not replicas): nothing is
    averaged or broadcast among its ranks (:func:`data_parallel` is False while it lives; a
    process group made later, by another run in the same process, is not marked)."""
    global _PIPELINE_GROUP
    _PIPELINE_GROUP = dist.group.WORLD if is_initialized() else None


def data_parallel() -> bool:
    """Whether the ranks are replicas that split each batch (a process group that is not a
    pipeline)."""
    return is_initialized() and dist.group.WORLD is not _PIPELINE_GROUP


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the rank that writes files, shows progress and prints)."""
    return rank() == 0


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rank's contiguous part of a global batch (along dim 0).

    Parts differ in size by at most one (the first ``len % world`` ranks get one more); every
    rank gets a part, possibly empty, and the parts in rank order concatenate to ``indices``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world} is invalid: need 0 <= rank < world")
    n = indices.shape[0]
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return indices[start:stop]


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """A rules ``Batch`` with ``x``, ``y``, both views and the per-block view pairs cut to the
    rank's part."""
    if world == 1:
        return batch
    views = batch.views
    if views is not None:
        views = tuple(shard(v, rank, world) for v in views)
    block_views = batch.block_views
    if block_views is not None:
        block_views = [tuple(shard(v, rank, world) for v in pair) for pair in block_views]
    y = None if batch.y is None else shard(batch.y, rank, world)
    return dataclasses.replace(batch, x=shard(batch.x, rank, world), y=y, views=views,
                               block_views=block_views)


def average_grads(params: Iterable[torch.nn.Parameter], count: int | None = None,
                  group: Any = None) -> None:
    """All-reduce ``.grad`` of ``params`` so every rank holds the global-batch gradient.

    ``count``: the number of samples this rank's gradient averages over; each rank's gradient is
    then weighted by its share of the global batch (exact with uneven shards). Without it, the
    gradients are averaged with equal weights (``sum / world``). Parameters without a gradient on
    every rank are skipped; a parameter with a gradient on some ranks only is an error of the
    rule (the reduce would hang), so keep ``.grad`` set alike on every rank. No-op on one rank.
    ``group``: the ranks that average (default: all; the replicas of a pipeline's stage).
    """
    if not is_initialized():
        return
    world = dist.get_world_size(group)
    grads = [p.grad for p in params if p.grad is not None]
    # one flat buffer per dtype/device, the sample count riding along: one collective per group
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    if not groups:  # still take part, so ranks with gradients do not wait forever
        groups[(torch.float32, torch.device("cpu"))] = []
    for (dtype, device), tensors in groups.items():
        weight = 1.0 if count is None else float(count)
        flat = torch.cat([t.reshape(-1) for t in tensors]
                         + [torch.ones(1, dtype=dtype, device=device)])
        # a rank with no samples (a last batch smaller than the world) adds nothing, not NaN
        flat = flat.mul_(weight) if weight else flat.zero_()
        dist.all_reduce(flat, group=group)
        total = float(flat[-1]) if count is not None else float(world)
        if total <= 0:
            continue
        flat /= total
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def average_metrics(metrics: dict[str, float], count: int | None = None,
                    group: Any = None) -> dict[str, float]:
    """Metrics of the global batch from each rank's (weighted by ``count`` when given), over
    the ranks of ``group`` (default: all)."""
    if not is_initialized() or not metrics:
        return metrics
    keys = sorted(metrics)
    w = 1.0 if count is None else float(count)
    # a rank with no samples adds nothing (its metrics of an empty part are NaN)
    t = torch.tensor([metrics[k] * w if w else 0.0 for k in keys] + [w], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    total = float(t[-1])
    return {k: float(t[i]) / total for i, k in enumerate(keys)}


def sync_generator(generator: torch.Generator, src: int = 0, group: Any = None) -> None:
    """Give every rank rank ``src``'s state of ``generator`` (no-op on one rank).

    Ranks whose parts of a batch differ in size draw different amounts of random numbers (random
    negatives, masks); without this their copies of the run's generator drift apart, and with
    them every later permutation of the data."""
    if not is_initialized():
        return
    box = [generator.get_state()]
    dist.broadcast_object_list(box, src, group=group)
    generator.set_state(box[0])


def decide(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s ``flag`` on every rank (a decision every rank must take together, such as
    a spent time budget, whose clocks differ); ``flag`` itself on one rank."""
    if not is_initialized():
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src)
    return bool(box[0])


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (``counts[r]``: rank ``r``'s row count).

    The inverse of :func:`shard`: ranks that each decoded their part of a global batch rebuild
    the whole batch. Identity without a process group.
    """
    if not is_initialized():
        return local
    most = max(counts)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def broadcast_params(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy ``tensors`` (parameters, buffers) from rank ``src`` to every rank."""
    if not is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.data, src)


def barrier() -> None:
    """Wait for every rank (no-op on one rank)."""
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()
