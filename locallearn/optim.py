"""Optimisers and learning-rate schedules of a run (``optim.*`` in the config).

``optim.name``: ``adam``, ``adamw``, ``sgd`` (with ``optim.momentum``) or ``lars``.

LARS (layer-wise adaptive rate scaling, arXiv 1708.03888) is SGD with momentum whose gradient is
rescaled, parameter tensor by parameter tensor, by a trust ratio before the momentum update. For
a weight ``w`` with gradient ``g``, weight decay ``wd``, trust coefficient ``eta`` and learning
rate ``lr``:

    d = g + wd * w
    r = eta * ||w|| / ||d||          (r = 1 when ||w|| = 0 or ||d|| = 0)
    v <- momentum * v + r * d
    w <- w - lr * v

Biases and normalisation parameters (every tensor with fewer than two dimensions) are left out of
the trust ratio and of the weight decay: they take plain SGD-momentum steps on ``g``. Norms are
Frobenius norms over the whole tensor. :class:`LARS` is a :class:`torch.optim.SGD` whose ``step``
first rescales the gradients in place (``.grad`` holds ``r * d`` after a step), so momentum
buffers, ``fused`` kernels, ``state_dict`` and resume are SGD's.

``optim.schedule=cosine``: the learning rate follows, per optimiser step ``t`` (0, 1, ...),
a linear warm-up over the first ``W = warmup_epochs * steps_per_epoch`` steps and then a cosine
decay to zero over the remaining ``T - W`` steps (``T = epochs * steps_per_epoch``):

    factor(t) = (t + 1) / W                              for t < W
    factor(t) = 0.5 * (1 + cos(pi * (t - W) / (T - W)))  for t >= W

``optim.schedule=exponential`` (per block, with ``optim.gamma`` and ``optim.period``): block
``k``'s rate is multiplied by ``gamma_k ** floor((t_k + 1) / period_k)``, with ``t_k`` the steps
since the block started training (step 0 of its window in a layer-wise schedule, else of the
run). The ``+ 1`` is how the SCFF paper's public code counts its batches: its first decay comes
after ``period - 1`` steps.

Per-block settings (``optim.block_lr``, ``optim.block_weight_decay``): one parameter group per
block of the network (its parameters and the rule's own parameters of that block), each with its
own rate and decay. With Adam or AdamW, whose state is per parameter, one optimiser with a group
per block is exactly one optimiser per block.

The schedule is stepped after every optimiser step (per step, not per epoch) and saved in the
checkpoint with its step count, so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["LARS", "OPTIMIZERS", "block_groups", "build_optimizer", "lars_param_groups",
           "restore_schedule", "warmup_cosine"]

OPTIMIZERS = ("adam", "adamw", "sgd", "lars")


class LARS(torch.optim.SGD):
    """SGD with momentum wrapped in LARS (see the module docstring for the update).

    Args:
        params: parameter groups; a group with ``lars=False`` takes plain SGD steps (use
            :func:`lars_param_groups` to split weights from biases and norm parameters).
        lr, momentum: SGD's.
        weight_decay: the LARS weight decay ``wd`` (added to the gradient before the trust
            ratio, in groups with ``lars=True`` only).
        trust_coefficient: ``eta``.
        eps: added to the denominator of the trust ratio.
        fused: SGD's fused kernel (``None``: torch's default).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        if not trust_coefficient > 0:
            raise ValueError(f"optim.trust_coefficient={trust_coefficient} is invalid: must be > 0")
        if weight_decay < 0:
            raise ValueError(f"optim.weight_decay={weight_decay} is invalid: must be >= 0")
        self.lars_defaults = {"lars": True, "lars_weight_decay": float(weight_decay),
                              "trust_coefficient": float(trust_coefficient), "eps": float(eps)}
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0, fused=fused)
        for group in self.param_groups:
            for key, value in self.lars_defaults.items():
                group.setdefault(key, value)
            group["weight_decay"] = 0.0  # SGD's own decay is never used: LARS adds it above

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["lars"]:
                continue
            wd, eta, eps = group["lars_weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd:
                    d.add_(p, alpha=wd)
                w_norm = torch.linalg.vector_norm(p)
                d_norm = torch.linalg.vector_norm(d)
                ratio = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / (d_norm + eps),
                                    torch.ones_like(w_norm))
                d.mul_(ratio)
        super().step()
        return loss


def lars_param_groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """Weights (tensors of two or more dimensions) with LARS, the rest (biases, norm scales)
    without; empty groups are left out."""
    weights = [p for p in params if p.dim() >= 2]
    others = [p for p in params if p.dim() < 2]
    groups: list[dict[str, Any]] = []
    if weights:
        groups.append({"params": weights, "lars": True})
    if others:
        groups.append({"params": others, "lars": False})
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int):
    """The learning-rate factor of step ``t`` (see the module docstring)."""
    total = max(int(total_steps), 1)
    warm = min(max(int(warmup_steps), 0), total)

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if total == warm:
            return 1.0
        progress = min((t - warm) / (total - warm), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def block_groups(
    o: Any, params: list[torch.nn.Parameter], blocks: list[list[torch.nn.Parameter]] | None
) -> tuple[list[Any], list[int | None]]:
    """The parameter groups of ``params``: one per block with ``optim.block_lr`` /
    ``optim.block_weight_decay`` (then the parameters of no block in a last group), else
    ``params`` itself; and the block of every group (``None``: no block)."""
    if o.block_lr is None and o.block_weight_decay is None and o.schedule != "exponential":
        return params, [None]
    if blocks is None:
        raise ValueError("optim.block_lr, optim.block_weight_decay and optim.schedule="
                         "exponential need a network of blocks")
    for key in ("block_lr", "block_weight_decay", "gamma", "period"):
        value = getattr(o, key)
        if value is not None and len(value) != len(blocks):
            raise ValueError(f"optim.{key}={value} gives {len(value)} values for a network of "
                             f"{len(blocks)} blocks; give one per block")
    wanted = {id(p) for p in params}
    groups: list[Any] = []
    owners: list[int | None] = []
    seen: set[int] = set()
    for k, block in enumerate(blocks):
        mine = [p for p in block if id(p) in wanted and id(p) not in seen]
        seen.update(id(p) for p in mine)
        if not mine:
            continue
        group: dict[str, Any] = {"params": mine}
        if o.block_lr is not None:
            group["lr"] = o.block_lr[k]
        if o.block_weight_decay is not None:
            group["weight_decay"] = o.block_weight_decay[k]
        groups.append(group)
        owners.append(k)
    rest = [p for p in params if id(p) not in seen]
    if rest:
        groups.append({"params": rest})
        owners.append(None)
    return groups, owners


def exponential_factor(gamma: float, period: int, start: int):
    """The rate factor of step ``t`` of a block that starts training at step ``start`` (see the
    module docstring)."""

    def factor(t: int) -> float:
        return gamma ** ((max(t - start, 0) + 1) // period)

    return factor


def build_optimizer(
    cfg: Any,
    params: list[torch.nn.Parameter],
    steps_per_epoch: int = 1,
    blocks: list[list[torch.nn.Parameter]] | None = None,
    block_starts: list[int] | None = None,
):
    """The optimiser of ``cfg.optim`` and its schedule (``None`` or a per-step
    :class:`torch.optim.lr_scheduler.LambdaLR`; call its ``step()`` after every optimiser step).

    ``steps_per_epoch``: optimiser steps in one epoch (the task's batches per epoch).
    ``blocks``: the parameters of each block of the network (per-block settings);
    ``block_starts``: the epoch at which each block starts training (a layer-wise schedule;
    default 0).
    """
    o = cfg.optim
    fused: dict[str, Any] = {"fused": True} if o.fused else {}  # else torch's default
    params, owners = block_groups(o, list(params), blocks)
    if o.name == "lars" and owners != [None]:
        raise ValueError("optim.name=lars does not take per-block settings; valid: adam, adamw, "
                         "sgd")
    if o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **fused)
    elif o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **fused)
    elif o.name == "lars":
        opt = LARS(lars_param_groups(list(params)), lr=o.lr, momentum=o.momentum,
                   weight_decay=o.weight_decay,
                   trust_coefficient=0.001 if o.trust_coefficient is None else o.trust_coefficient,
                   **fused)
    elif o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                              **fused)
    else:
        raise ValueError(f"optim.name={o.name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    sched = None
    if o.schedule == "cosine":
        steps = max(int(steps_per_epoch), 1)
        total = max(cfg.epochs, 1) * steps
        warm = int(round(o.warmup_epochs * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warm))
    elif o.schedule == "exponential":
        steps = max(int(steps_per_epoch), 1)
        starts = block_starts or [0] * len(blocks or [])
        gammas, periods = o.gamma or [1.0] * len(starts), o.period or [1] * len(starts)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [
            (lambda t: 1.0) if k is None
            else exponential_factor(gammas[k], periods[k], starts[k] * steps)
            for k in owners])
    elif o.warmup_epochs:
        raise ValueError(
            f"optim.warmup_epochs={o.warmup_epochs} needs optim.schedule=cosine "
            f"(got {o.schedule!r})"
        )
    return opt, sched


def restore_schedule(sched: Any, state: dict[str, Any]) -> None:
    """Load a saved per-step schedule: its step count, with the base rates of this run's own
    parameter groups (a checkpoint written by one stage of a pipeline holds that stage's groups
    only; the base rates come from the config all the same), and the groups' rates at that
    step."""
    base = list(sched.base_lrs)
    sched.load_state_dict(state)
    sched.base_lrs = base
    t = sched.last_epoch
    for group, rate, factor in zip(sched.optimizer.param_groups, base, sched.lr_lambdas):
        group["lr"] = rate * factor(t)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
