"""Which scores of the two-view contrastive loss a part of the batch owns (micro-batches).

The image SSL rules stack both views of ``N`` images into ``2N`` rows (view 1, then view 2). Row
``r`` is an *anchor*: its context is the other view of the same image (row ``(r + N) mod 2N``),
and it has two scores against the prediction ``B c`` made from that context, a positive one with
its own pooled output and a negative one with the pooled output of its negative row: the same
view of another image (``neg[r mod N]``, given per image), or any row given per row (the paper
code's pairing takes row ``r + 1 mod 2N`` of the views stacked ``[view 2; view 1]``; see
:func:`paper_negative_rows`).

Because the context is detached, the loss is a sum of terms each of which depends on the graph
of one row only: the positive score of row ``r`` on ``r``, the negative score of anchor ``a`` on
its negative row. A part of the batch (a contiguous range of images, both views) therefore owns
the positive scores of its rows and the negative scores whose negative row it holds; summing the
parts gives the whole loss and its gradient exactly. A part needs the contexts of the anchors
whose negatives it holds: for the ``next`` negatives only the image before its first, so parts
are processed in order and the contexts of :func:`early_images` computed beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["PairPlan", "PairTerms", "PredictionGrads", "early_images", "image_parts",
           "negative_rows", "pair_terms", "paper_negative_rows"]


@dataclass(frozen=True)
class PairTerms:
    """The scores owned by a part of the batch, as index tensors.

    The part's anchors are its own rows (in the same order: anchor ``i < len(rows)`` scores its
    positive on row ``i`` of the part), followed by the anchors outside the part whose negative
    row it holds.

    Attributes:
        rows: the global rows the part holds, in the order of its sub-batch (images
            ``start..stop-1`` of view 1, then the same images of view 2).
        anchors: the global rows of the anchors.
        context_rows: for each anchor, the global row of its context.
        neg_anchor: for each negative score, the index of its anchor.
        neg_row: for each negative score, the index (into ``rows``) of its negative row.
    """

    rows: torch.Tensor
    anchors: torch.Tensor
    context_rows: torch.Tensor
    neg_anchor: torch.Tensor
    neg_row: torch.Tensor


def negative_rows(neg: torch.Tensor, n: int) -> torch.Tensor:
    """The negative row of every one of the ``2n`` rows: ``neg`` itself when it is given per
    row (``2n`` values), else the same view of the negative image ``neg[r mod n]``."""
    if neg.numel() == 2 * n:
        return neg
    if neg.numel() != n:
        raise ValueError(f"negatives: expected {n} images or {2 * n} rows, got {neg.numel()}")
    return torch.cat([neg, neg + n])


def paper_negative_rows(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The paper code's negatives as rows of ``[view 1; view 2]`` (``2n`` values).

    That code stacks ``[view 1; view 2]``, swaps the halves to form the positives and takes as
    the negative of each row the next row of the swapped batch, wrapping over all ``2n`` rows. In
    anchor terms here (anchor ``a``'s positive is row ``a``, its context row ``a + n mod 2n``)
    the negative of anchor ``a`` is row ``a + 1 mod 2n``: the same view of the next image, except
    for the last image of each view, whose negative is the other view of image 0.
    """
    return torch.roll(torch.arange(2 * n, device=device), -1)


def pair_terms(n: int, neg: torch.Tensor, start: int = 0, stop: int | None = None) -> PairTerms:
    """Scores owned by images ``start..stop-1`` (both views) of a batch of ``n`` images.

    ``neg`` is the negative image of every image (``n`` values: the same view) or the negative
    row of every row (``2n`` values, e.g. :func:`paper_negative_rows`). For the whole batch (the
    default) the negative scores are in anchor order, so that score ``i`` of the positives and
    of the negatives belong to the same anchor.
    """
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"images [{start}, {stop}) are not a non-empty part of a batch of {n}")
    device = neg.device
    images = torch.arange(start, stop, device=device)
    rows = torch.cat([images, images + n])
    negrow = negative_rows(neg, n)
    local = torch.full((2 * n,), -1, dtype=torch.long, device=device)
    local[rows] = torch.arange(rows.numel(), device=device)
    neg_anchors = (local[negrow] >= 0).nonzero().squeeze(1)  # anchors whose negative is here
    outside = neg_anchors[local[neg_anchors] < 0]
    anchors = torch.cat([rows, outside])
    index = torch.full((2 * n,), -1, dtype=torch.long, device=device)
    index[anchors] = torch.arange(anchors.numel(), device=device)
    return PairTerms(
        rows=rows,
        anchors=anchors,
        context_rows=(anchors + n) % (2 * n),
        neg_anchor=index[neg_anchors],
        neg_row=local[negrow[neg_anchors]],
    )


def image_parts(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges ``(start, stop)`` of ``n`` images, sizes differing by <= 1."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def early_images(neg: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Images whose contexts a part needs before their own part runs.

    Image ``i`` (both views) is an anchor of the negative scores on its negative rows (``neg``:
    per image or per row, as for :func:`pair_terms`), owned by the parts holding them; when such
    a part comes first, ``i``'s context must be computed in advance.
    """
    n = ranges[-1][1]
    part = torch.empty(n, dtype=torch.long, device=neg.device)
    for k, (start, stop) in enumerate(ranges):
        part[start:stop] = k
    rows = torch.arange(2 * n, device=neg.device)
    early = part[rows % n] > part[negative_rows(neg, n) % n]
    return (early[:n] | early[n:]).nonzero().squeeze(1)


class PredictionGrads:
    """Gradients of prediction matrices ``B``, gathered over the parts of a batch.

    The score ``s * p^T B c`` of an anchor gives ``B`` the outer product of a post-synaptic term
    (the anchor's neuromodulated pooled outputs, ``g_pos p_pos + g_neg p_neg``) and its
    pre-synaptic context ``c``. Parts add their anchors' post-synaptic rows with :meth:`add`;
    :meth:`apply` forms ``sum_anchors post c^T`` for each ``B`` with one matrix product over the
    whole batch and adds it to ``B.grad``: the same gradient as autograd's, without one product
    (and one temporary of the size of ``B``) per part.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(
        self, B: torch.Tensor, anchors: torch.Tensor, post: torch.Tensor, contexts: torch.Tensor
    ) -> None:
        """Add ``post`` (one row per anchor; ``anchors``: their global rows) for ``B``.

        ``contexts`` holds the context source of every global row (``2N`` rows); the context of
        anchor ``a`` is row ``(a + N) mod 2N`` of it, read when :meth:`apply` runs.
        """
        item = self._items.get(id(B))
        if item is None:
            total = post.new_zeros(contexts.shape[0], post.shape[1])
            item = self._items[id(B)] = (B, total, contexts)
        item[1].index_add_(0, anchors, post)

    def apply(self) -> None:
        """Add each gathered gradient to its ``B.grad``; forget them."""
        for B, post, contexts in self._items.values():
            n2 = contexts.shape[0]
            partner = (torch.arange(n2, device=contexts.device) + n2 // 2) % n2
            # in B's precision even under autocast (a bf16 product cannot be B's gradient)
            pre = contexts.detach()[partner].to(B.dtype)
            post = post.to(B.dtype)
            with torch.autocast(B.device.type, enabled=False):
                if B.grad is None:
                    B.grad = post.t() @ pre
                else:  # in place: no temporary of the size of B
                    B.grad.addmm_(post.t(), pre)
        self._items.clear()


class PairPlan:
    """The index tensors of a batch of ``n`` images with negatives ``neg`` (as for
    :func:`pair_terms`) split into ``ranges``: each part's :class:`PairTerms` (``terms``) and the
    :func:`early_images` (``early``), each made when it is first read."""

    def __init__(self, n: int, neg: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        self.n, self.neg, self.ranges = n, neg, list(ranges)

    @cached_property
    def terms(self) -> list[PairTerms]:
        return [pair_terms(self.n, self.neg, a, b) for a, b in self.ranges]

    @cached_property
    def early(self) -> torch.Tensor:
        return early_images(self.neg, self.ranges)
