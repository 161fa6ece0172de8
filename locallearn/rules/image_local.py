"""The layer-wise image rules: ``clapp-image`` (CLAPP, CLAPP++ with grid pooling and context from
the top), ``ff`` (``B`` fixed to the identity) and their BP-SSL reference (the top block's loss
backpropagated through every block). The loss and its three-factor form are described in
:mod:`locallearn.rules.image_ssl`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, TopLossReference
from locallearn.rules.image_grid import pool_flat
from locallearn.rules.image_options import STEPS, FFOptions, LocalOptions, check_choice
from locallearn.rules.image_ssl import ImageSSLRule
from locallearn.rules.ssl_pairs import (
    PairTerms,
    PredictionGrads,
    image_parts,
)

__all__ = ["FFRule", "LocalImageRule", "TopLossBackprop"]


class LocalImageRule(StepsBlockByBlock, ImageSSLRule):
    """Implements CLAPP and CLAPP++ (arXiv 2601.21683): every block learns from its own unified
    loss, with context from itself, from the top block (DFB) or both. Options:
    :class:`~locallearn.rules.image_options.LocalOptions`; what it computes:
    ``docs/image-rules.md``.

    Args:
        context: ``same``, ``top`` or ``both``.
        pool: ``auto``, ``global`` or pool sizes per block.
        f: the function of the unified loss (``hinge`` for CLAPP).
        negatives: ``next`` or ``random``.
        step: ``block`` or ``summed``.
        score_norm: ``dims`` or ``none``.
        identity_b: ``B`` fixed to the identity (Forward-Forward); needs ``context=same``.
        micro_batches: parts of the batch taken through the encoder one after the other, each
            block's graph freed after its backward (exact: the context is detached, so the loss
            is a sum of terms on one row's graph each; see :mod:`locallearn.rules.ssl_pairs`).
    """

    name = "clapp-image"
    Options = LocalOptions

    @classmethod
    def from_config(cls, cfg, options: LocalOptions, seed: int, **task_info) -> LocalImageRule:
        o = options
        return cls(o.context, o.pool, o.f, o.negative_image, o.step, o.score_norm,
                   micro_batches=o.micro_batches, pairing=o.negative_view)

    def __init__(
        self,
        context: str = "same",
        pool: list[int] | str = "auto",
        f: str = "hinge",
        negatives: str = "next",
        step: str = "block",
        score_norm: str = "none",
        identity_b: bool = False,
        micro_batches: int = 1,
        pairing: str | None = None,
    ) -> None:
        super().__init__(pool, f, negatives, score_norm, micro_batches, pairing)
        check_choice("rule.options.context", context, ("same", "top", "both"))
        check_choice("rule.options.step", step, STEPS)
        if identity_b and context != "same":
            raise ValueError("B fixed to the identity needs rule.options.context=same")
        self.context = context
        self.step = step
        self.identity_b = identity_b
        self.B_same = nn.ParameterList()
        self.B_top = nn.ParameterList()

    @property
    def uses_same(self) -> bool:
        return self.context in ("same", "both")

    @property
    def uses_top(self) -> bool:
        return self.context in ("top", "both")

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        self.resolve(net, sample_input)
        if self.identity_b:
            return
        device = sample_input.device
        for d in self.dims:
            if self.uses_same:
                self.B_same.append(nn.Parameter(torch.zeros(d, d, device=device)))
            if self.uses_top:
                self.B_top.append(nn.Parameter(torch.zeros(d, self.dims[-1], device=device)))

    def prediction_matrices(self) -> list[tuple[nn.Parameter, int, int]]:
        top = len(self.dims) - 1
        return [(B, level, level) for level, B in enumerate(self.B_same)] + [
            (B, level, top) for level, B in enumerate(self.B_top)
        ]

    def block_loss(
        self,
        level: int,
        p: torch.Tensor,
        same: torch.Tensor | None,
        top: torch.Tensor | None,
        terms: PairTerms,
        n: int,
        b_grads: PredictionGrads | None = None,
    ) -> torch.Tensor:
        """Loss of block ``level`` owned by a part of the batch (``terms``; ``p``: its pooled
        outputs). ``same`` and ``top`` hold the contexts of all ``2N`` rows; ``b_grads``: see
        :meth:`pair_loss`."""
        loss = p.new_zeros(())
        if self.uses_same:
            B = None if self.identity_b else self.B_same[level]
            loss = loss + self.pair_loss(p, same, B, terms, n, b_grads)
        if self.uses_top:
            loss = loss + self.pair_loss(p, top, self.B_top[level], terms, n, b_grads)
        return loss

    def top_context(self, net: BlockNet, x: torch.Tensor) -> torch.Tensor | None:
        """Pooled top block of both views, without gradients (``None`` without DFB), computed
        in ``micro_batches`` parts (so that it never holds a whole batch's maps)."""
        if not self.uses_top:
            return None
        with torch.no_grad():
            parts = x.tensor_split(min(self.micro_batches, x.shape[0]))
            return torch.cat([pool_flat(net.encode(part), self.pools[-1]) for part in parts])

    def reference_rule(self) -> Rule:
        """BP-SSL counterpart: this rule's top-block loss backpropagated through every block."""
        return TopLossBackprop(self)

    def block_parameters(self, level: int) -> list[nn.Parameter]:
        own = [self.B_same[level]] if len(self.B_same) else []
        return own + ([self.B_top[level]] if len(self.B_top) else [])

    def pipeline_refusal(self) -> str | None:
        if self.uses_top and not self.late_feedback:
            return (f"rule {self.name} with rule.options.context={self.context} learns from the "
                    "top block's output on the same batch (a signal from above; context=same, "
                    "or parallel.feedback_delay >= 1 to let it arrive late, would pipeline)")
        return None

    def delay_refusal(self) -> str | None:
        if not self.uses_top:
            return (f"rule {self.name} with rule.options.context={self.context} takes no "
                    "context from the top block")
        return None

    def feedback_signal(self, net: BlockNet, carry: dict[str, Any]) -> tuple[Any, dict]:
        """The top block's pooled outputs of all ``2N`` rows, in the order of the views."""
        n = carry["n"]
        with torch.no_grad():
            pooled = [pool_flat(h, self.pools[-1]) for h in carry["parts"]]
        if len(pooled) == 1:
            return pooled[0], {}
        top = pooled[0].new_empty(2 * n, pooled[0].shape[1])
        for (a, b), p in zip(image_parts(n, self.micro_batches), pooled):
            top[a:b], top[n + a : n + b] = p[: b - a], p[b - a :]
        return top, {}

    def frozen_carry(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> dict[str, Any]:
        """The parts (and the early rows) passed through blocks ``start..stop-1``, no
        gradients."""
        parts, early = list(carry["parts"]), carry["early"]
        with torch.no_grad():
            for level in range(start, stop):
                parts = [net.blocks[level](h) for h in parts]
                if early is not None:
                    early = net.blocks[level](early)
        return {**carry, "parts": parts, "early": early}

    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """Both views of every part of the batch (block 0's inputs), the rows whose contexts a
        part needs before its own part runs (:func:`early_images`), the negatives, and (with
        context from the top) the top block's pooled outputs."""
        x, n = self.views(batch)
        neg = self.negative_index(n, batch, x.device)
        top = None if self.late_feedback else self.top_context(net, x)
        ranges = image_parts(n, self.micro_batches)
        early = self.pair_plan(n, neg, ranges).early
        rows = torch.cat([early, early + n])
        return {
            "n": n,
            "neg": neg,
            "feedback": top,
            "parts": [self.part_views(x, n, a, b) for a, b in ranges],
            "early_rows": rows,
            "early": x[rows] if self.uses_same and early.numel() else None,
            "loss": 0.0,
        }

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        n, neg, top = carry["n"], carry["neg"], carry["feedback"]
        ranges = image_parts(n, self.micro_batches)
        parts = list(carry["parts"])
        early = carry["early"]
        stores: dict[int, torch.Tensor] = {}
        if self.uses_same:  # room for the pooled outputs of all 2N rows, early rows filled in
            for level in range(start, stop):
                stores[level] = parts[0].new_empty(2 * n, self.dims[level])
            if early is not None:
                with torch.no_grad():
                    for level in range(start, stop):
                        early = net.blocks[level](early)
                        pooled = pool_flat(early, self.pools[level])
                        stores[level][carry["early_rows"]] = pooled.to(stores[level].dtype)
        b_grads = PredictionGrads()  # B's three-factor updates, one product per B per batch
        values: list[torch.Tensor] = []  # per part and block, read once at the end
        for k, terms in enumerate(self.pair_plan(n, neg, ranges).terms):
            h = parts[k]
            pending: list[torch.Tensor] = []
            for level in range(start, stop):
                z = net.blocks[level](h)
                p = pool_flat(z, self.pools[level])
                ctx = stores.get(level)
                if ctx is not None:
                    ctx[terms.rows] = p.detach().to(ctx.dtype)
                loss = self.block_loss(level, p, ctx, top, terms, n, b_grads)
                if self.step == "block":
                    loss.backward()  # frees this block's graph before the next block runs
                else:
                    pending.append(loss)
                values.append(loss.detach())
                h = z.detach()
            if pending:
                torch.stack(pending).sum().backward()
            parts[k] = h
        b_grads.apply()
        per_block = torch.stack(values).cpu().double().reshape(len(ranges), -1).sum(0).tolist()
        metrics = {f"loss_block{start + i + 1}": v for i, v in enumerate(per_block)}
        metrics["loss"] = sum(per_block, carry["loss"])
        out = {**carry, "parts": parts, "early": early, "loss": metrics["loss"]}
        return metrics, out



class TopLossBackprop(TopLossReference):
    """A layer-wise image rule's top-block loss, backpropagated through every block (BP-SSL).

    The reference of :class:`LocalImageRule` for gradient alignment: the same views, negatives,
    context and prediction matrices (shared with the local rule), but the loss of the top block
    only and gradients through all blocks. Its top-block update equals the local rule's.
    """

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local = self.local[0]
        top = len(net.blocks) - 1

        def loss(p: torch.Tensor, ctx: torch.Tensor, terms: PairTerms, n: int) -> torch.Tensor:
            return local.block_loss(top, p, ctx, ctx, terms, n)  # B through autograd

        return {"loss": local.top_loss_backprop(net, batch, loss)}


class FFRule(LocalImageRule):
    """Implements the Forward-Forward-style member of the CLAPP family (arXiv 2601.21683):
    :class:`LocalImageRule` with ``B`` fixed to the identity and context ``same``. Options:
    :class:`~locallearn.rules.image_options.FFOptions`."""

    name = "ff"
    Options = FFOptions

    @classmethod
    def from_config(cls, cfg, options: FFOptions, seed: int, **task_info) -> FFRule:
        o = options
        return cls(o.pool, o.f, o.negative_image, o.step, o.score_norm, o.micro_batches,
                   pairing=o.negative_view)

    def __init__(
        self,
        pool: list[int] | str = "auto",
        f: str = "softplus",
        negatives: str = "next",
        step: str = "block",
        score_norm: str = "none",
        micro_batches: int = 1,
        pairing: str | None = None,
    ) -> None:
        super().__init__(
            "same", pool, f, negatives, step, score_norm, identity_b=True,
            micro_batches=micro_batches, pairing=pairing,
        )

