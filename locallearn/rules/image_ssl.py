"""What the self-supervised image rules of arXiv 2601.21683 share (views, negatives, pooling,
the pair loss); the rules are in ``image_local`` (``clapp-image``, ``ff``), ``image_bp``
(``bp-ssl``) and ``image_infonce`` (``infonce-image``). What each computes, with the three-factor
form of its update: ``docs/image-rules.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from locallearn import losses
from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule
from locallearn.rules.image_grid import pool_flat, resolve_pools
from locallearn.rules.image_options import check_choice, check_micro_batches
from locallearn.rules.image_upgrade import reorder_channel_major_b
from locallearn.rules.layerwise import NEGATIVES, pick_negatives
from locallearn.rules.ssl_pairs import (
    PairPlan,
    PairTerms,
    PredictionGrads,
    image_parts,
    negative_rows,
    paper_negative_rows,
)

__all__ = ["ImageRule", "ImageSSLRule", "VIEW_KIND"]

#: The value of ``Rule.view_kind`` of these rules: the task supplies two SSL views.
VIEW_KIND = "ssl"
#: Values of ``rule.options.negatives`` (see :class:`~locallearn.rules.image_options.SSLOptions`).
PAIRINGS = ("paper", "same-view")


class ImageRule(Rule):
    """Common part of every image SSL rule: two views of each image, label-free, each block's
    output pooled on a grid (``rule.options.pool``, resolved by :meth:`resolve`)."""

    name = "image-rule"
    uses_labels = False
    view_kind = VIEW_KIND

    def __init__(self, pool: list[int] | str) -> None:
        super().__init__()
        self.pool_spec = pool
        self.pools: list[int] = []
        self.dims: list[int] = []

    def resolve(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        """Find each block's pool size and pooled size ``D_l`` for inputs like ``sample_input``."""
        if sample_input.dim() != 4 or sample_input.shape[2] != sample_input.shape[3]:
            raise ValueError(
                f"image rules need square image batches (N, C, S, S), got "
                f"{tuple(sample_input.shape)}"
            )
        with torch.no_grad():
            feats = net.features(sample_input[:1])
        # the maps' sides as the blocks make them (not only VGG's max-pools halving them)
        self.pools = resolve_pools(self.pool_spec, [int(h.shape[-1]) for h in feats])
        self.dims = [pool_flat(h, p).shape[1] for h, p in zip(feats, self.pools)]

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        """The encoder's parameters and the rule's own (prediction matrices, projections)."""
        return net.encoder_parameters() + list(self.parameters())

    def prediction_matrices(self) -> list[tuple[nn.Parameter, int, int]]:
        """``(B, row block, column block)`` of every prediction matrix (none by default)."""
        return []

    @staticmethod
    def views(batch: Batch) -> tuple[torch.Tensor, int]:
        """Both views stacked ``(2N, C, H, W)`` and ``N`` (at least 2: each image needs another
        image of the batch as its negative)."""
        if batch.views is None:
            raise ValueError("image SSL rules need two views in the batch (view_kind 'ssl')")
        v1, v2 = batch.views
        if v1.shape[0] < 2:
            raise ValueError("image SSL rules need batches of at least 2 images (negatives)")
        return torch.cat([v1, v2], 0), v1.shape[0]


class ImageSSLRule(ImageRule):
    """Common part of the image rules of the unified score loss (``clapp-image``, ``ff``,
    ``bp-ssl``): negatives, pair terms, prediction matrices."""

    name = "image-ssl"

    def __init__(
        self,
        pool: list[int] | str,
        f: str,
        negatives: str,
        score_norm: str,
        micro_batches: int = 1,
        pairing: str | None = None,
    ) -> None:
        super().__init__(pool)
        if pairing is None:  # the paper code's pairing where it is defined
            pairing = "paper" if negatives == "next" else "same-view"
        check_choice("rule.options.f", f, losses.F_KINDS)
        check_choice("rule.options.negative_image", negatives, NEGATIVES)
        check_choice("rule.options.negative_view", pairing, PAIRINGS)
        if pairing == "paper" and negatives != "next":
            raise ValueError(
                "rule.options.negative_view=paper (the paper code's pairing) needs "
                f"rule.options.negative_image=next, not {negatives!r}; for random negatives use "
                "rule.options.negative_view=same-view"
            )
        check_micro_batches(micro_batches)
        if micro_batches > 1 and f == "softplus-diff":
            raise ValueError(
                "rule.options.micro_batches > 1 does not fit rule.options.f=softplus-diff (it "
                "couples each positive score with its negative); valid f: hinge, softplus, linear"
            )
        self.micro_batches = micro_batches
        self.f = f
        self.negatives = negatives
        self.pairing = pairing
        self.score_norm = score_norm
        self._plans: dict[tuple, PairPlan] = {}

    def pair_plan(self, n: int, neg: torch.Tensor, ranges: list[tuple[int, int]]) -> PairPlan:
        """The index tensors of a batch of ``n`` images with negatives ``neg``, split into
        ``ranges`` (:class:`PairPlan`: each part's terms, the early images).

        With ``next`` negatives (the paper's pairing or the same view) they are the same for
        every batch of ``n`` images: made once and kept on the device, so that a step does not
        wait for the device to find them (their sizes depend on the values of ``neg``). Random
        negatives get a new plan per batch; on a GPU each of its parts costs one wait.
        """
        if self.negatives != "next":
            return PairPlan(n, neg, ranges)
        key = (n, tuple(ranges), str(neg.device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = PairPlan(n, neg, ranges)
        return plan

    def scale(self, d_z: int, d_c: int) -> float:
        """The score scale ``s``."""
        return losses.score_scale(self.score_norm, d_z, d_c)

    def negative_index(self, n: int, batch: Batch, device: torch.device) -> torch.Tensor:
        """The negative row of each of the ``2N`` rows ``[view 1; view 2]`` (another image;
        ``n >= 2``, as :meth:`views` checks)."""
        if self.pairing == "paper":
            return paper_negative_rows(n, device)
        return negative_rows(pick_negatives(n, self.negatives, batch.generator, device), n)

    def pair_loss(
        self,
        p: torch.Tensor,
        c: torch.Tensor,
        B: torch.Tensor | None,
        terms: PairTerms,
        n: int,
        b_grads: PredictionGrads | None = None,
    ) -> torch.Tensor:
        """The scores a part of the batch owns, both directions, summed and divided by ``2n``
        (the loss is the mean over the ``2n`` anchors, as in the paper's public code).

        ``p`` (R, D_z) are the pooled outputs of the part's rows (``terms.rows``), ``c`` the
        contexts of all ``2N`` rows (detached here), ``B`` is ``(D_z, D_c)`` or ``None`` for the
        identity. View 1 is predicted from view 2 and back with the same ``B``, in one product
        with ``B``; see :mod:`locallearn.rules.ssl_pairs`. ``B``'s gradient comes from autograd,
        or, with ``b_grads``, from its explicit outer-product form gathered there (``B`` then
        enters the returned loss as a constant).
        """
        ctx = c.detach()
        c = ctx[terms.context_rows]
        rows = p.shape[0]
        if B is None:
            pred = c
        else:
            pred = c @ (B.t() if b_grads is None else B.detach().t())
        s = self.scale(p.shape[1], c.shape[1])
        u_pos = (p * pred[:rows]).sum(1) * s
        u_neg = (p[terms.neg_row] * pred[terms.neg_anchor]).sum(1) * s
        if B is not None and b_grads is not None and B.requires_grad:
            g_pos, g_neg = losses.score_loss_grads(u_pos.detach(), u_neg.detach(), self.f)
            # at least fp32 whatever autocast made of the scores (on CUDA its sums are fp32,
            # its products bf16): B's gradient is never gathered in bf16
            dtype = torch.promote_types(torch.promote_types(p.dtype, pred.dtype), torch.float32)
            q = p.detach().to(dtype) * (s / (2 * n))
            post = torch.zeros(pred.shape, dtype=dtype, device=pred.device)
            post[:rows] = g_pos[:, None] * q
            post.index_add_(0, terms.neg_anchor, g_neg[:, None] * q[terms.neg_row])
            b_grads.add(B, terms.anchors, post, ctx)
        return losses.score_loss(u_pos, u_neg, self.f) / (2 * n)

    def pooled_stores(
        self, net: BlockNet, x: torch.Tensor, neg: torch.Tensor, ranges: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Per block, room for the pooled outputs of all ``2N`` rows (the contexts from the
        same block), with the rows of :func:`early_images` filled in by a forward pass without
        gradients; the parts fill in their own rows as they run."""
        store = [x.new_empty(x.shape[0], d) for d in self.dims]
        early = self.pair_plan(x.shape[0] // 2, neg, ranges).early
        if early.numel():
            n = x.shape[0] // 2
            rows = torch.cat([early, early + n])
            with torch.no_grad():
                for level, h in enumerate(net.features(x[rows])):
                    store[level][rows] = pool_flat(h, self.pools[level]).to(x.dtype)
        return store

    def top_loss_backprop(
        self,
        net: BlockNet,
        batch: Batch,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, PairTerms, int], torch.Tensor],
    ) -> float:
        """Backpropagate a loss of the pooled top block through every block, part by part.

        ``loss_fn(p, contexts, terms, n)`` gives the loss a part owns from its pooled top block
        ``p`` and the contexts of all ``2N`` rows (the top block's pooled outputs). Returns the
        summed loss.
        """
        x, n = self.views(batch)
        neg = self.negative_index(n, batch, x.device)
        ranges = image_parts(n, self.micro_batches)
        contexts = self.pooled_stores(net, x, neg, ranges)[-1]
        values: list[torch.Tensor] = []
        for (start, stop), terms in zip(ranges, self.pair_plan(n, neg, ranges).terms):
            p = pool_flat(net.encode(self.part_views(x, n, start, stop)), self.pools[-1])
            contexts[terms.rows] = p.detach().to(contexts.dtype)
            loss = loss_fn(p, contexts, terms, n)
            loss.backward()  # through every block; frees this part's graph
            values.append(loss.detach())
        return float(torch.stack(values).cpu().double().sum())

    def upgrade_state(self, net: BlockNet, checkpoint_format: int) -> None:
        """Before format 2, pooled features were flattened channel-major: reorder ``B``."""
        if checkpoint_format < 2:
            reorder_channel_major_b(self.prediction_matrices(), self.dims, net)

    @staticmethod
    def part_views(x: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
        """Both views of images ``start..stop-1`` (``x`` itself for the whole batch)."""
        if start == 0 and stop == n:
            return x
        return torch.cat([x[start:stop], x[n + start : n + stop]])
