"""Self-supervised rules for image encoders (*Can Local Learning Match Self-Supervised
Backpropagation?*, arXiv 2601.21683): layer-wise CLAPP/CLAPP++, Forward-Forward-style, and the
end-to-end BP-SSL baselines, all on the same VGG encoder and the same two augmented views.

Registered rule names (``rule.name``):

``clapp-image``
    The unified local loss on every block (CLAPP, and CLAPP++ with grid pooling and context from
    the top). Block ``l`` with output ``z_l`` (after ReLU and max-pool) pools it on a grid
    (average pool, kernel = stride = the block's pool size; pooling onto one cell is global
    pooling) and flattens it to ``p_l`` (``D_l`` values). Its loss, for view 1 predicted from
    view 2 and view 2 from view 1 with the same ``B_l``, averaged over the batch::

        f(u_pos) + f(-u_neg),  u_pos = s * p_l(x)^T B_l c,  u_neg = s * p_l(x_neg)^T B_l c

    with ``c`` the context (detached), ``x_neg`` another image of the batch (the next one by
    default, ``rule.negatives=random`` for a random other one), ``B_l`` a trainable ``D_l x D_c``
    matrix without bias (so it couples grid positions), initialised to zero, and ``s = 1``: the
    score is summed over channels and grid positions, as in the paper (``score_norm: dims``
    sets ``s = 1 / sqrt(D_l D_c)``, a fixed rescaling of ``B``; with Adam it slows ``B``'s
    learning relative to the encoder's, and in short runs the encoder then meets the margin by
    inflating its activations). ``f`` is ``rule.f`` (hinge for CLAPP; see
    :mod:`locallearn.losses`). Context (``rule.options.context``):

    - ``same``: the same block's pooled output on the other view (CLAPP / CLAPP++);
    - ``top``: the pooled top block on the other view (direct feedback, DFB), from a forward pass
      of the whole encoder without gradients before the blocks are trained;
    - ``both``: the sum of the two losses, each with its own ``B``.

    Block inputs are detached. ``step: block`` (default) backpropagates each block's loss as soon
    as it is computed, so its graph is freed before the next block runs (activation memory of one
    block); ``step: summed`` sums the losses of all blocks and calls one backward (the same
    gradients, the activation memory of the whole network). ``micro_batches: k`` takes ``k``
    parts of the batch through the encoder one after the other (activation memory of one block
    of one part): the same gradients, because the context is detached and every term of the loss
    depends on the graph of one row (:mod:`locallearn.rules.ssl_pairs`).

``ff``
    The same loss with ``B`` fixed to the identity (no prediction matrix; context ``same``),
    with the softplus ``f`` (``rule.f=softplus``, as in ``configs/images/ff.yaml``): a
    Forward-Forward-style rule in the unified family.

``bp-ssl``
    End-to-end backpropagation of a self-supervised loss on the top block. ``rule.loss=clapp``
    (BP-CLAPP++): the loss above on the grid-pooled top block with its own trainable ``B``.
    ``rule.loss=infonce`` (BP-InfoNCE): the top block average-pooled globally, a linear projection
    (``C -> C`` for a top block of ``C`` channels, i.e. 1024 -> 1024 at full width; no bias),
    cosine similarity divided by ``rule.temperature`` (0.1), the other images of the batch as
    negatives, symmetric in the two views (:func:`locallearn.losses.info_nce`; no stop-gradient).
    With ``rule.loss=clapp``, ``rule.options.micro_batches`` splits the batch as for
    ``clapp-image`` (each part backpropagated through every block in turn); InfoNCE cannot be
    split (its negatives are inside the graph).

Pooling (``rule.options.pool``): ``auto`` (default) pools every block onto the paper's grid of
8, 4, 4, 4, 2, 2 cells per side, which gives pool sizes 4-4-4-2-2-1 on CIFAR-10 (32 px),
12-12-12-6-6-3 on STL-10 (96 px) and 8-8-8-4-4-2 on Tiny ImageNet (64 px); ``global`` pools every
block onto one cell (no spatial dependence); or a list of pool sizes, one per block.

Three-factor form (checked against autograd in the tests, see
:func:`locallearn.rules.image_explicit.explicit_grads`): with
neuromodulators ``g_pos = f'(u_pos)`` and ``g_neg = -f'(-u_neg)`` (``score_loss_grads``), the
dendritic prediction ``B_l c`` pooled back to the map (each grid cell's value spread over its
window and divided by the window area), the gate ``relu'(a)`` routed through the max-pool, and
the input patch ``x`` of every position (the Hebbian term)::

    dW_l = s / N * sum_samples sum_positions gamma * (P^T B_l c)[j] * relu'(a_j) * x_i

where ``gamma = g_pos`` for the positive sample and ``g_neg`` for the negative one (whose own gate
and input enter; the prediction is that of the positive's context). The prediction matrix learns
from the product of the neuromodulated pooled outputs and the context::

    dB_l = s / N * sum_anchors (g_pos p_pos + g_neg p_neg) c^T

which the rules (the layer-wise ones and BP-CLAPP++) compute in this form, gathered over the
batch (and its micro-batches) into one matrix product per ``B``
(:class:`~locallearn.rules.ssl_pairs.PredictionGrads`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from locallearn import losses
from locallearn.experiments.config import from_dict
from locallearn.nets.base import BlockNet
from locallearn.rules import register
from locallearn.rules.base import Batch, Rule
from locallearn.rules.image_grid import channel_major_order, pool_flat, resolve_pools
from locallearn.rules.layerwise import NEGATIVES, pick_negatives
from locallearn.rules.ssl_pairs import (
    PairTerms,
    PredictionGrads,
    early_images,
    image_parts,
    pair_terms,
)

__all__ = [
    "BPOptions",
    "BPSSL",
    "FFOptions",
    "FFRule",
    "ImageSSLRule",
    "LocalImageRule",
    "LocalOptions",
    "SSLOptions",
    "TopLossBackprop",
    "reorder_channel_major_b",
]

#: The value of ``Rule.view_kind`` of these rules: the task supplies two SSL views.
VIEW_KIND = "ssl"


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class SSLOptions:
    """``rule.options`` shared by the image rules.

    Attributes:
        pool: ``auto`` (the paper's grids 8-4-4-4-2-2), ``global``, or pool sizes per block.
        score_norm: ``none`` sums scores over channels and grid positions (the paper);
            ``dims`` scales them by ``1/sqrt(D_z D_c)``.
        micro_batches: parts of the batch taken through the encoder one after the other (the
            same gradients; activation memory of one part).
    """

    pool: list[int] | str = "auto"
    score_norm: Literal["none", "dims"] = "none"
    micro_batches: int = 1

    def validate(self) -> None:
        _check_pool(self.pool)
        _check_micro_batches(self.micro_batches)


@dataclass
class FFOptions(SSLOptions):
    """``rule.options`` of ``ff`` (``B`` is the identity, the context is the same block).

    Attributes:
        step: ``block`` (backward per block, graph freed) or ``summed`` (one backward).
    """

    step: Literal["block", "summed"] = "block"


@dataclass
class LocalOptions(FFOptions):
    """``rule.options`` of ``clapp-image``.

    Attributes:
        context: ``same`` (CLAPP), ``top`` (direct feedback from the top block) or ``both``.
    """

    context: Literal["same", "top", "both"] = "same"


@dataclass
class BPOptions(SSLOptions):
    """``rule.options`` of ``bp-ssl`` (``pool`` and ``micro_batches``: ``rule.loss=clapp``
    only; of the pool sizes per block, the last is used).

    Attributes:
        projection_dim: output size of the InfoNCE projection (default: the top block's
            channels, 1024 at full width).
    """

    projection_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(
                f"rule.options.projection_dim={self.projection_dim} is invalid: must be >= 1"
            )


def _check_pool(pool: list[int] | str) -> None:
    if isinstance(pool, str):
        if pool not in ("auto", "global"):
            raise ValueError(
                f"rule.options.pool={pool!r} is invalid; valid: auto, global, or a list of "
                "pool sizes (one per block)"
            )
    elif not pool or any(p < 1 for p in pool):
        raise ValueError(f"rule.options.pool={pool!r} is invalid: pool sizes must be >= 1")


def _check_micro_batches(parts: int) -> None:
    if parts < 1:
        raise ValueError(f"rule.options.micro_batches={parts} is invalid: must be >= 1")


def _check_choice(key: str, value: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{key}={value!r} is invalid for image rules; valid: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------
# the rules


class ImageSSLRule(Rule):
    """Common part of the image SSL rules: two views, pooling, the unified score loss."""

    name = "image-ssl"
    uses_labels = False
    view_kind = VIEW_KIND

    def __init__(
        self,
        pool: list[int] | str,
        f: str,
        negatives: str,
        score_norm: str,
        micro_batches: int = 1,
    ) -> None:
        super().__init__()
        _check_choice("rule.f", f, losses.F_KINDS)
        _check_choice("rule.negatives", negatives, NEGATIVES)
        _check_micro_batches(micro_batches)
        if micro_batches > 1 and f == "softplus-diff":
            raise ValueError(
                "rule.options.micro_batches > 1 does not fit rule.f=softplus-diff (it couples "
                "each positive score with its negative); valid f: hinge, softplus, linear"
            )
        self.micro_batches = micro_batches
        self.pool_spec = pool
        self.f = f
        self.negatives = negatives
        self.score_norm = score_norm
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

    def scale(self, d_z: int, d_c: int) -> float:
        """The score scale ``s``."""
        return 1.0 / math.sqrt(d_z * d_c) if self.score_norm == "dims" else 1.0

    def negative_index(self, n: int, batch: Batch, device: torch.device) -> torch.Tensor:
        """Index of the negative of every sample (another image of the batch)."""
        if n < 2:
            raise ValueError("image SSL rules need batches of at least 2 images (negatives)")
        return pick_negatives(n, self.negatives, batch.generator, device)

    def pair_loss(
        self,
        p: torch.Tensor,
        c: torch.Tensor,
        B: torch.Tensor | None,
        terms: PairTerms,
        n: int,
        b_grads: PredictionGrads | None = None,
    ) -> torch.Tensor:
        """The scores a part of the batch owns, both directions, summed and divided by ``n``.

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
            q = p.detach() * (s / n)
            post = torch.zeros_like(pred)
            post[:rows] = g_pos[:, None] * q
            post.index_add_(0, terms.neg_anchor, g_neg[:, None] * q[terms.neg_row])
            b_grads.add(B, terms.anchors, post, ctx)
        return losses.score_loss(u_pos, u_neg, self.f) / n

    def pooled_stores(
        self, net: BlockNet, x: torch.Tensor, neg: torch.Tensor, ranges: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Per block, room for the pooled outputs of all ``2N`` rows (the contexts from the
        same block), with the rows of :func:`early_images` filled in by a forward pass without
        gradients; the parts fill in their own rows as they run."""
        store = [x.new_empty(x.shape[0], d) for d in self.dims]
        early = early_images(neg, ranges)
        if early.numel():
            n = x.shape[0] // 2
            rows = torch.cat([early, early + n])
            with torch.no_grad():
                for level, h in enumerate(net.features(x[rows])):
                    store[level][rows] = pool_flat(h, self.pools[level])
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
        for start, stop in ranges:
            terms = pair_terms(n, neg, start, stop)
            p = pool_flat(net.encode(self.part_views(x, n, start, stop)), self.pools[-1])
            contexts[terms.rows] = p.detach()
            loss = loss_fn(p, contexts, terms, n)
            loss.backward()  # through every block; frees this part's graph
            values.append(loss.detach())
        return float(torch.stack(values).cpu().double().sum())

    def upgrade_state(self, net: BlockNet, checkpoint_format: int) -> None:
        """Before format 2, pooled features were flattened channel-major: reorder ``B``."""
        if checkpoint_format < 2:
            reorder_channel_major_b(self, net)

    @staticmethod
    def part_views(x: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
        """Both views of images ``start..stop-1`` (``x`` itself for the whole batch)."""
        if start == 0 and stop == n:
            return x
        return torch.cat([x[start:stop], x[n + start : n + stop]])

    @staticmethod
    def views(batch: Batch) -> tuple[torch.Tensor, int]:
        """Both views stacked ``(2N, C, H, W)`` and ``N``."""
        if batch.views is None:
            raise ValueError("image SSL rules need two views in the batch (view_kind 'ssl')")
        v1, v2 = batch.views
        return torch.cat([v1, v2], 0), v1.shape[0]


class LocalImageRule(ImageSSLRule):
    """Layer-wise rule: each block learns from its own unified loss (see the module docstring).

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
    ) -> None:
        super().__init__(pool, f, negatives, score_norm, micro_batches)
        _check_choice("rule.options.context", context, ("same", "top", "both"))
        _check_choice("rule.options.step", step, ("block", "summed"))
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

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters() + list(self.parameters())

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

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        x, n = self.views(batch)
        neg = self.negative_index(n, batch, x.device)
        top = self.top_context(net, x)
        ranges = image_parts(n, self.micro_batches)
        same = self.pooled_stores(net, x, neg, ranges) if self.uses_same else None
        b_grads = PredictionGrads()  # B's three-factor updates, one product per B per batch
        values: list[torch.Tensor] = []  # per part and block, read once at the end
        for start, stop in ranges:
            terms = pair_terms(n, neg, start, stop)
            h = self.part_views(x, n, start, stop)
            pending: list[torch.Tensor] = []
            for level, block in enumerate(net.blocks):
                z = block(h)
                p = pool_flat(z, self.pools[level])
                ctx = None
                if same is not None:
                    ctx = same[level]
                    ctx[terms.rows] = p.detach()
                loss = self.block_loss(level, p, ctx, top, terms, n, b_grads)
                if self.step == "block":
                    loss.backward()  # frees this block's graph before the next block runs
                else:
                    pending.append(loss)
                values.append(loss.detach())
                h = z.detach()
            if pending:
                torch.stack(pending).sum().backward()
        b_grads.apply()
        per_block = torch.stack(values).cpu().double().reshape(len(ranges), -1).sum(0).tolist()
        metrics = {f"loss_block{level + 1}": v for level, v in enumerate(per_block)}
        metrics["loss"] = sum(per_block)
        return metrics


class TopLossBackprop(Rule):
    """A layer-wise image rule's top-block loss, backpropagated through every block (BP-SSL).

    The reference of :class:`LocalImageRule` for gradient alignment: the same views, negatives,
    context and prediction matrices (shared with the local rule), but the loss of the top block
    only and gradients through all blocks. Its top-block update equals the local rule's.
    """

    name = "bp-ssl"
    uses_labels = False
    view_kind = VIEW_KIND

    def __init__(self, local: LocalImageRule) -> None:
        super().__init__()
        self.local = [local]  # a list: the local rule's parameters are not registered twice

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return self.local[0].trained_parameters(net)

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local = self.local[0]
        top = len(net.blocks) - 1

        def loss(p: torch.Tensor, ctx: torch.Tensor, terms: PairTerms, n: int) -> torch.Tensor:
            return local.block_loss(top, p, ctx, ctx, terms, n)  # B through autograd

        return {"loss": local.top_loss_backprop(net, batch, loss)}


class FFRule(LocalImageRule):
    """``ff``: :class:`LocalImageRule` with ``B`` fixed to the identity and context ``same``."""

    name = "ff"

    def __init__(
        self,
        pool: list[int] | str = "auto",
        f: str = "softplus",
        negatives: str = "next",
        step: str = "block",
        score_norm: str = "none",
        micro_batches: int = 1,
    ) -> None:
        super().__init__(
            "same", pool, f, negatives, step, score_norm, identity_b=True,
            micro_batches=micro_batches,
        )


class BPSSL(ImageSSLRule):
    """End-to-end backprop of a self-supervised loss on the top block (BP-CLAPP++, BP-InfoNCE).

    Args:
        loss: ``clapp`` (the unified loss on the grid-pooled top block) or ``infonce``.
        pool: pooling of the top block for ``clapp``.
        f, negatives, score_norm: as for :class:`LocalImageRule` (``clapp`` only).
        temperature: InfoNCE temperature.
        projection_dim: InfoNCE projection size (default: the top block's channels).
        seed: seed of the projection's initial weights (the run's seed).
        micro_batches: ``clapp`` only: parts of the batch backpropagated one after the other
            (the same gradients, since the context is detached; the activation memory of one
            part). InfoNCE's negatives are the batch's other images inside the graph: it
            cannot be split without recomputation.
    """

    name = "bp-ssl"

    def __init__(
        self,
        loss: str = "clapp",
        pool: list[int] | str = "auto",
        f: str = "hinge",
        negatives: str = "next",
        score_norm: str = "none",
        temperature: float = 0.1,
        projection_dim: int | None = None,
        seed: int = 0,
        micro_batches: int = 1,
    ) -> None:
        super().__init__(pool, f, negatives, score_norm, micro_batches)
        self.seed = seed
        _check_choice("rule.loss", loss, ("clapp", "infonce"))
        if micro_batches > 1 and loss != "clapp":
            raise ValueError(
                "rule.options.micro_batches > 1 needs rule.loss=clapp (InfoNCE's negatives "
                "are the batch's other images, inside the graph)"
            )
        if not temperature > 0:
            raise ValueError(f"rule.temperature={temperature} is invalid: must be > 0")
        self.loss_kind = loss
        self.temperature = temperature
        self.projection_dim = projection_dim
        self.B = nn.ParameterList()
        self.projection: nn.Module | None = None

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        self.resolve(net, sample_input)
        device = sample_input.device
        if self.loss_kind == "clapp":
            d = self.dims[-1]
            self.B.append(nn.Parameter(torch.zeros(d, d, device=device)))
        else:
            with torch.no_grad():
                channels = net.encode(sample_input[:1]).shape[1]
            out = self.projection_dim or channels
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.projection = nn.Linear(channels, out, bias=False).to(device)

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters() + list(self.parameters())

    def reference_rule(self) -> Rule:
        """End-to-end backprop already: its own reference."""
        return self

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        if self.loss_kind == "infonce":
            x, _ = self.views(batch)
            e1, e2 = self.projection(net.encode(x).mean((2, 3))).chunk(2, 0)
            loss = losses.info_nce(e1, e2, self.temperature)
            loss.backward()
            return {"loss": float(loss.detach())}
        b_grads = PredictionGrads()

        def loss(p: torch.Tensor, ctx: torch.Tensor, terms: PairTerms, n: int) -> torch.Tensor:
            return self.pair_loss(p, ctx, self.B[0], terms, n, b_grads)

        value = self.top_loss_backprop(net, batch, loss)
        b_grads.apply()
        return {"loss": value}


# ---------------------------------------------------------------------------------------------
# builders (rule.name -> rule)


def _build_local(cfg: Any, seed: int, **task: Any) -> LocalImageRule:
    o = from_dict(LocalOptions, cfg.options, "rule.options.")
    return LocalImageRule(o.context, o.pool, cfg.f, cfg.negatives, o.step, o.score_norm,
                          micro_batches=o.micro_batches)


def _build_ff(cfg: Any, seed: int, **task: Any) -> FFRule:
    o = from_dict(FFOptions, cfg.options, "rule.options.")
    return FFRule(o.pool, cfg.f, cfg.negatives, o.step, o.score_norm, o.micro_batches)


def _build_bp(cfg: Any, seed: int, **task: Any) -> BPSSL:
    o = from_dict(BPOptions, cfg.options, "rule.options.")
    return BPSSL(cfg.loss, o.pool, cfg.f, cfg.negatives, o.score_norm, cfg.temperature,
                 o.projection_dim, seed, o.micro_batches)


register("clapp-image", _build_local)
register("ff", _build_ff)
register("bp-ssl", _build_bp)

#: Rule names this module registers.
RULES = ("clapp-image", "ff", "bp-ssl")


# ---------------------------------------------------------------------------------------------
# runs saved with the earlier feature order


@torch.no_grad()
def reorder_channel_major_b(rule: nn.Module, net: BlockNet) -> None:
    """Reorder the prediction matrices of a rule loaded from a channel-major run, in place."""
    channels = [block.pre.out_channels for block in net.blocks]
    dims = getattr(rule, "dims", [])
    if not dims:
        return
    orders = [channel_major_order(d, c) for d, c in zip(dims, channels)]

    def reorder(B: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        B.copy_(B[rows.to(B.device)][:, cols.to(B.device)])

    if isinstance(rule, LocalImageRule):
        for level, B in enumerate(rule.B_same):
            reorder(B, orders[level], orders[level])
        for level, B in enumerate(rule.B_top):
            reorder(B, orders[level], orders[-1])
    elif isinstance(rule, BPSSL) and rule.loss_kind == "clapp":
        reorder(rule.B[0], orders[-1], orders[-1])
