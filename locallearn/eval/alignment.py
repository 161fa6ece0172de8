"""Gradient alignment: how close a rule's update is to the backprop update, block by block.

For every block, the cosine similarity between the flattened weight update that the rule
computes and the gradient of its backprop reference on the same batch (same views, same
negatives: the run's generator is rewound between the two). The reference of a rule is
:meth:`Rule.reference_rule`: for label-driven rules, backprop of the cross-entropy; for layer-wise
self-supervised rules, the same loss on the top block only, backpropagated through every block
(BP-SSL), as in *Can Local Learning Match Self-Supervised Backpropagation?* (arXiv 2601.21683).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule


def block_grads(rule: Rule, net: BlockNet, batch: Batch) -> list[torch.Tensor | None]:
    """The rule's update of every block's parameters, flattened (``None``: block not updated)."""
    params = rule.trained_parameters(net) + list(net.parameters())
    for p in params:
        p.grad = None
    rule.compute_grads(net, batch)
    out: list[torch.Tensor | None] = []
    for block in net.blocks:
        gs = [p.grad.reshape(-1) for p in block.parameters() if p.grad is not None]
        out.append(torch.cat(gs).detach().clone() if gs else None)
    for p in params:
        p.grad = None
    return out


def cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Cosine similarity of two flat tensors, in float64 (a float32 dot product over millions
    of weights strays by about 1e-4); NaN when either is missing or zero."""
    if a is None or b is None:
        return math.nan
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return float((a @ b) / (na * nb))


def batch_alignment(rule: Rule, reference: Rule, net: BlockNet, batch: Batch) -> list[float]:
    """Per-block cosine between ``rule``'s update and ``reference``'s on one batch."""
    gen = batch.generator
    state = gen.get_state() if gen is not None else None
    g_rule = block_grads(rule, net, batch)
    if gen is not None:
        gen.set_state(state)
    g_ref = block_grads(reference, net, batch)
    return [cosine(a, b) for a, b in zip(g_rule, g_ref)]


def alignment(
    rule: Rule, net: BlockNet, batches: Iterable[Batch], reference: Rule | None = None
) -> list[dict[str, float]]:
    """Mean and standard deviation over batches of the per-block cosine.

    Returns rows ``{"block": l (1-based), "cosine_mean": ..., "cosine_std": ..., "batches": n}``;
    a block the rule does not update has NaN.
    """
    ref = rule.reference_rule() if reference is None else reference
    per_batch = [batch_alignment(rule, ref, net, b) for b in batches]
    if not per_batch:
        raise ValueError("alignment needs at least one batch")
    t = torch.tensor(per_batch, dtype=torch.float64)
    rows = []
    for level in range(t.shape[1]):
        col = t[:, level]
        ok = col[~torch.isnan(col)]
        mean = float(ok.mean()) if len(ok) else math.nan
        std = float(ok.std(unbiased=False)) if len(ok) else math.nan
        rows.append({"block": level + 1, "cosine_mean": mean, "cosine_std": std,
                     "batches": int(len(ok))})
    return rows
