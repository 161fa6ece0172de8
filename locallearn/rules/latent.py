"""Layer-wise latent prediction: every block predicts its *own* latent codes of its sibling.

After *Learn from your own latents and not from tokens: a sample-complexity theory* (arXiv
2605.27734): on data built by a hierarchy of production rules, a learner that predicts its own
latent representation of a neighbouring part of the input (rather than the tokens themselves)
needs a number of samples that does not grow with the depth; the paper shows it with stacked
predictor-clusterer modules. Here each block of the hierarchical CNN is one such module,
trained only from its own activity (positions ``j``, ``j'`` are siblings when they share a
parent in the tree, ``j // s``; ``r = j mod s``):

- **clusterer** (every objective): a prototype matrix ``Q`` (``k x C``) gives each position of
  the block's output ``z`` (``(N, C, P)``) a code over ``k`` clusters. The *target* code
  ``t_j`` is the balanced assignment of the detached scores ``Q z_j / sqrt(C)``: Sinkhorn
  iterations at temperature ``sinkhorn_eps`` give every cluster the same share of the batch's
  positions (the collapse guard, below). ``Q`` learns to agree with them (self-labelling):
  ``cluster_weight * CE(t_j, softmax(Q z_j / (sqrt(C) tau)))``.
- **predictor**, ``objective``:

  - ``stacked`` (default; the paper's stacking): block ``l`` predicts the codes of the *level
    below* at its sibling's children, ``softmax(T[r, r', q] z_j / (sqrt(C) tau))`` against
    the code of child ``q`` of sibling ``j'`` (block ``l - 1``'s balanced code; under block 0,
    the one-hot token). Level ``l``'s own codes become the targets of level ``l + 1``.
  - ``balanced-code``: block ``l`` predicts its sibling's own code ``t_j'`` with ``R[r, r']``.
  - ``mutual-information``: maximise the mutual information of the soft codes of siblings
    (no predictor matrix; the batch's joint code distribution).

A block's loss reaches only that block's weights and its own ``Q``, ``R``, ``T`` (its input is
detached, as in :mod:`locallearn.rules.layerwise`). The top block has a single position and no
sibling, so it keeps its random initial weights. No label and no view from the generator is
used: the batch's one-hot input is all the rule sees.

Collapse guard: a balanced clustering code. In the RHM every symbol of a level is equally
likely, so a code that uses its ``k`` clusters equally is the right prior, and a constant
representation gives uniform targets (the prediction loss at its maximum ``log k``), so
collapse is not a minimum. A variance term would keep units alive without making the code
discrete (the next level predicts discrete codes); a slowly-updated teacher needs a second copy
of every block, and the targets are already detached within the step.

Three-factor form (checked against autograd in the tests). With pre-activation ``a`` and input
patch ``x`` of a position, ``dW = sum [d_z * relu'(a)] x^T`` with the dendritic signal (for
``stacked``; ``balanced-code`` has ``R[r, r']`` and the sibling's own code instead)

    d_z(j) = sum_{r', q} T[r, r', q]^T (p_{j -> j'q} - code_{j'q}) / (sqrt(C) tau n_terms)
             + cluster_weight * Q^T (softmax(Q z_j / (sqrt(C) tau)) - t_j) / (sqrt(C) tau n_pos)

a prediction error (the third factor, one vector per position) sent back through the block's
own prediction matrices; ``n_terms`` counts the (sibling, child) terms times the positions that
predict, ``n_pos`` the positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, check_range


@dataclass
class LatentOptions:
    """Options of ``rule.name=latent-prediction`` (``rule.options.*``).

    Attributes:
        objective: what the block predicts (module docstring).
        clusters: ``k``, the number of clusters of every block's code; 0 takes the number of
            input channels (the size of the token alphabet, visible in the data).
        tau: temperature of the predicted and clustered distributions.
        sinkhorn_eps: temperature of the balanced target codes (lower: harder codes).
        sinkhorn_iters: Sinkhorn iterations (each balances clusters, then samples).
        cluster_weight: weight of the clusterer's self-labelling term.
    """

    objective: Literal["stacked", "balanced-code", "mutual-information"] = "stacked"
    clusters: int = 0
    tau: float = 0.5
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 10
    cluster_weight: float = 1.0

    def validate(self) -> None:
        if self.clusters < 0 or self.clusters == 1:
            raise ValueError(
                f"rule.options.clusters={self.clusters} is invalid: 0 (the input alphabet) or >= 2"
            )
        for key in ("tau", "sinkhorn_eps"):
            check_range(f"rule.options.{key}", getattr(self, key), 0, low_open=True)
        check_range("rule.options.sinkhorn_iters", self.sinkhorn_iters, 1)
        check_range("rule.options.cluster_weight", self.cluster_weight, 0)


def balanced_codes(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Sinkhorn-balanced soft assignment of ``(n, k)`` scores: rows sum to one, and every
    cluster receives about ``n / k`` of the mass (exactly after the column step)."""
    logq = scores / eps
    for _ in range(iters):
        logq = logq - torch.logsumexp(logq, 0, keepdim=True)  # every cluster: equal mass
        logq = logq - torch.logsumexp(logq, 1, keepdim=True)  # every sample: a distribution
    return logq.exp()


class LatentPrediction(StepsBlockByBlock, Rule):
    """Block-by-block prediction of the block's own balanced code of a sibling (module doc)."""

    name = "latent-prediction"
    uses_labels = False
    view_kind = None
    Options: ClassVar[type] = LatentOptions

    @classmethod
    def from_config(cls, cfg: Any, options: Any, seed: int, **task_info: Any) -> LatentPrediction:
        """The rule of config section ``cfg`` with its typed ``options``."""
        return cls(options, s=task_info.get("s", 2), seed=seed)

    def __init__(self, options: LatentOptions | None = None, s: int = 2, seed: int = 0):
        super().__init__()
        self.options = options or LatentOptions()
        self.options.validate()
        self.s = s
        self.seed = seed
        self.Q = nn.ParameterList()  # per block: (k, C) prototypes
        self.R = nn.ParameterList()  # per block: (s, s, k, C) sibling predictors

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        with torch.no_grad():
            feats = net.features(sample_input[:1])
        k = self.options.clusters or sample_input.shape[1]
        gen = torch.Generator().manual_seed(self.seed)
        dev = sample_input.device
        for h in feats:
            c = h.shape[1]
            self.Q.append(nn.Parameter(torch.randn(k, c, generator=gen).to(dev)))
            self.R.append(nn.Parameter(torch.zeros(self.s, self.s, k, c, device=dev)))
        s = self.s
        self.T = nn.ParameterList()  # per block: (s, s, s, k_below, C) predictors of children
        if self.options.objective == "stacked":
            for level, h in enumerate(feats):
                kb = sample_input.shape[1] if level == 0 else k
                self.T.append(nn.Parameter(torch.zeros(s, s, s, kb, h.shape[1], device=dev)))

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters() + list(self.parameters())

    def reference_rule(self) -> Rule:
        return _TopLatentBackprop(self)

    def has_loss(self, z: torch.Tensor) -> bool:
        """Blocks with siblings (at least ``s`` positions) learn; the single-position top not."""
        return z.shape[-1] >= self.s and z.shape[-1] % self.s == 0

    def targets(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """Balanced target codes ``(N, P, k)`` of block ``level``'s (detached) output."""
        o = self.options
        zf = z.detach().transpose(1, 2)
        scores = zf @ self.Q[level].detach().t() / math.sqrt(z.shape[1])
        k = scores.shape[-1]
        t = balanced_codes(scores.reshape(-1, k), o.sinkhorn_eps, o.sinkhorn_iters)
        return t.reshape(scores.shape)

    def block_loss(
        self, level: int, z: torch.Tensor, below: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of one block's output ``z`` (``(N, C, P)``); ``below``: the codes of the
        level below (``(N, s P, k')``, the one-hot tokens under block 0), for ``stacked``."""
        if self.options.objective == "mutual-information":
            return self.mi_loss(level, z)
        if self.options.objective == "stacked":
            if below is None:
                raise ValueError("objective 'stacked' needs the codes of the level below")
            return self.stacked_loss(level, z, below)
        return self.code_loss(level, z)

    def stacked_loss(self, level: int, z: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        """Prediction of the sibling's children's codes (one level down) + clustering loss."""
        o = self.options
        s = self.s
        zf = z.transpose(1, 2)
        norm = math.sqrt(z.shape[1]) * o.tau
        pred = z.new_zeros(())
        terms = 0
        for r in range(s):
            for r2 in range(s):
                if r2 == r:
                    continue
                for q in range(s):
                    logits = zf[:, r::s] @ self.T[level][r, r2, q].t() / norm
                    pred = pred + _soft_ce(logits, below[:, r2 * s + q :: s * s])
                    terms += 1
        loss = pred / terms
        if o.cluster_weight > 0:
            t = self.targets(level, z)
            loss = loss + o.cluster_weight * _soft_ce(zf @ self.Q[level].t() / norm, t)
        return loss

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens as codes of the level below block 0: one-hot ``(N, T, v)``."""
        return F.one_hot(x.argmax(1), x.shape[1]).to(x.dtype)

    def codes(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """Soft codes ``softmax(Q z_j / (sqrt(C) tau))`` of every position, ``(N, P, k)``."""
        norm = math.sqrt(z.shape[1]) * self.options.tau
        return torch.softmax(z.transpose(1, 2) @ self.Q[level].t() / norm, -1)

    def mi_loss(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """Minus the mutual information of the codes of siblings, averaged over sibling pairs."""
        s = self.s
        c = self.codes(level, z)
        loss = z.new_zeros(())
        pairs = 0
        for r in range(s):
            for r2 in range(r + 1, s):
                loss = loss - code_mutual_information(c[:, r::s], c[:, r2::s])
                pairs += 1
        return loss / pairs

    def code_loss(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """Prediction of the sibling's balanced code + clustering loss (``balanced-code``)."""
        o = self.options
        s = self.s
        c = z.shape[1]
        t = self.targets(level, z)
        zf = z.transpose(1, 2)  # (N, P, C)
        norm = math.sqrt(c) * o.tau
        pred = z.new_zeros(())
        pairs = 0
        for r in range(s):
            for r2 in range(s):
                if r2 == r:
                    continue
                logits = zf[:, r::s] @ self.R[level][r, r2].t() / norm
                pred = pred + _soft_ce(logits, t[:, r2::s])
                pairs += 1
        loss = pred / pairs
        if o.cluster_weight > 0:
            own = zf @ self.Q[level].t() / norm
            loss = loss + o.cluster_weight * _soft_ce(own, t)
        return loss

    def pipeline_refusal(self) -> str | None:
        return None

    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """The tokens and their one-hot codes (the level below block 0)."""
        return {"x": batch.x, "below": self.input_codes(batch.x), "loss": 0.0}

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        h, below = carry["x"], carry["below"]
        total = carry["loss"]
        metrics: dict[str, float] = {}
        for level in range(start, stop):
            z = net.blocks[level](h.detach())
            if self.has_loss(z):
                loss = self.block_loss(level, z, below)
                loss.backward()  # this block's weights and its Q, R (T) only
                metrics[f"loss_block{level + 1}"] = float(loss.detach())
                total += float(loss.detach())
                below = self.targets(level, z)
            h = z.detach()
        metrics["loss"] = total
        return metrics, {**carry, "x": h, "below": below, "loss": total}

    def block_parameters(self, level: int) -> list[nn.Parameter]:
        """Block ``level``'s prototypes and predictors."""
        own = [self.Q[level], self.R[level]]
        return own + ([self.T[level]] if len(self.T) else [])


class _TopLatentBackprop(Rule):
    """The latent rule's highest block loss backpropagated through every block (BP-SSL)."""

    name = "bp-latent"
    uses_labels = False

    def __init__(self, local: LatentPrediction):
        super().__init__()
        self.local = [local]  # a list, so that the local rule is not a submodule

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return self.local[0].trained_parameters(net)

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local = self.local[0]
        top = None
        h = batch.x
        below = local.input_codes(h)
        for level, block in enumerate(net.blocks):
            h = block(h)
            if local.has_loss(h):
                top = (level, h, below)
                below = local.targets(level, h)
        if top is None:
            raise ValueError("no block of this network has siblings to predict")
        loss = local.block_loss(*top)
        loss.backward()
        return {"loss": float(loss.detach())}


def code_mutual_information(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """Mutual information of two soft codes ``(..., k)`` paired row by row: the joint is
    ``mean_i c1_i c2_i^T``; the marginals are its row and column sums."""
    k = c1.shape[-1]
    joint = c1.reshape(-1, k).t() @ c2.reshape(-1, k) / (c1.numel() // k)
    joint = joint.clamp_min(1e-12)
    p1 = joint.sum(1, keepdim=True)
    p2 = joint.sum(0, keepdim=True)
    return (joint * (joint.log() - p1.log() - p2.log())).sum()


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, mean over every leading index."""
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()
