"""Stacked latent prediction: each module predicts its sibling's codes and clusters what it
predicts, level by level (``rule.name=latent-stacked``, on ``net.kind=predictor-clusterer``).

After *Learn from your own latents and not from tokens: a sample-complexity theory* (arXiv
2605.27734). Module ``l`` of :mod:`locallearn.nets.clusterer` sees the codes of level ``l - 1``
(the tokens for module 1) and learns two things from them alone, with no label and no view
from the generator:

- **prediction**: the cross-entropy of its own side's logits ``T[r] h_j`` against the joint value
  of the codes under the sibling patch ``j'`` (``j`` and ``j'`` share a parent, ``j // s``).
  This trains the module's hidden layer and its predictor.
- **clustering**: balanced k-means of the (detached) prediction points. The batch's points are
  assigned to the prototypes by Sinkhorn iterations that give every prototype the same share
  (the collapse guard: in the RHM every symbol of a level is equally frequent, so a balanced
  code is the right prior, and no prototype can take every point), then each prototype moves
  towards its points: the gradient of ``sum_i,c A_ic |p_i - C_c|^2 / (2 n)`` is
  ``sum_i A_ic (C_c - p_i) / n``, the k-means step. On the first step of its level the
  prototypes are placed on batch points by k-means++ seeding (the run's generator), and a
  prototype that is nearest to none of a batch's points is moved onto a far point the same way
  (online k-means otherwise leaves it stranded while two symbols share one code).

The module's output is the one-hot code of its nearest prototype; level ``l``'s codes are module
``l + 1``'s input and targets: the stacking of the paper. With ``schedule=levelwise`` (default)
the modules learn one after the other, each for an equal share of the run's steps (or
``level_epochs`` epochs), so that a module learns from codes that no longer change; ``joint``
trains every module at every step. The top module keeps its random weights; the class is read
out linearly from it, fitted on the same labelled samples.

Three-factor form (checked against an explicit formula in the tests): with pre-activation ``a``
and input patch ``x`` of a position, ``dW = sum [d_h * relu'(a)] x^T / n`` with the dendritic
signal ``d_h = T[r]^T (softmax(T[r] h) - onehot(target))``, the prediction error sent back
through the module's own predictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from locallearn import distributed as ddp
from locallearn.nets.base import BlockNet
from locallearn.nets.clusterer import ClusterBlock
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, check_range
from locallearn.rules.latent import balanced_codes


@dataclass
class StackedOptions:
    """Options of ``rule.name=latent-stacked`` (``rule.options.*``).

    Attributes:
        schedule: ``levelwise`` (one module after the other) or ``joint`` (all at every step).
        level_epochs: epochs of each module under ``levelwise``; 0: the run's epochs shared
            equally among the modules.
        sinkhorn_eps: temperature of the balanced assignment, relative to the batch's mean
            squared distance (lower: harder).
        sinkhorn_iters: Sinkhorn iterations of the balanced assignment.
        cluster_weight: weight of the k-means term (it reaches only the prototypes).
        cluster_start: fraction of a module's steps (of the run's, under ``joint``) that its
            predictor learns alone before the prototypes are placed and clustering starts
            (predictions of an untrained predictor are all alike).
        reseed: move a prototype that no point of a batch is nearest to onto a far point
            (:meth:`LatentStacked.reseed_dead`).
    """

    schedule: Literal["levelwise", "joint"] = "levelwise"
    level_epochs: float = 0.0
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 20
    cluster_weight: float = 1.0
    cluster_start: float = 0.5
    reseed: bool = True

    def validate(self) -> None:
        check_range("rule.options.level_epochs", self.level_epochs, 0,
                    note="0: the run's epochs shared equally among the modules")
        check_range("rule.options.sinkhorn_eps", self.sinkhorn_eps, 0, low_open=True)
        check_range("rule.options.sinkhorn_iters", self.sinkhorn_iters, 1)
        check_range("rule.options.cluster_start", self.cluster_start, 0, 1, high_open=True)
        check_range("rule.options.cluster_weight", self.cluster_weight, 0)


def sibling_targets(codes: torch.Tensor, s: int, k_in: int) -> torch.Tensor:
    """``(N, P)`` joint value of the ``s`` codes under every position's sibling patch, from the
    module's input codes ``(N, k_in, s P)`` (one-hot). ``s > 2``: the next patch in the parent
    (``r -> r + 1 mod s``), so that every side has one target."""
    idx = codes.argmax(1)  # (N, s P)
    n, t = idx.shape
    p = t // s
    patch = idx.reshape(n, p, s)
    weights = k_in ** torch.arange(s, device=idx.device)
    value = (patch * weights).sum(-1)  # (N, P)
    j = torch.arange(p, device=idx.device)
    sib = j - j % s + (j % s + 1) % s
    return value[:, sib]


class LatentStacked(StepsBlockByBlock, Rule):
    """Level-by-level predictor-clusterer training (module docstring)."""

    name = "latent-stacked"
    uses_labels = False
    view_kind = None
    trains_codes = True
    Options: ClassVar[type] = StackedOptions

    @classmethod
    def from_config(cls, cfg: Any, options: Any, seed: int, **task_info: Any) -> LatentStacked:
        return cls(options, steps_per_epoch=task_info.get("steps_per_epoch", 1),
                   epochs=task_info.get("epochs", 1))

    def __init__(self, options: StackedOptions | None = None, steps_per_epoch: int = 1,
                 epochs: float = 1):
        super().__init__()
        self.options = options or StackedOptions()
        self.options.validate()
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.epochs = epochs
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("placed", torch.zeros(0, dtype=torch.bool))

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        modules = [b for b in net.blocks if isinstance(b, ClusterBlock)]
        if not modules:
            raise ValueError(
                f"rule.name={self.name} trains predictor-clusterer modules; "
                "use net.kind=predictor-clusterer"
            )
        self.placed = torch.zeros(len(modules), dtype=torch.bool, device=sample_input.device)

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return [p for b in net.blocks if isinstance(b, ClusterBlock) for p in b.parameters()]

    def level_steps(self, n_modules: int) -> int:
        """Steps of each module under ``levelwise``."""
        epochs = self.options.level_epochs or self.epochs / max(1, n_modules)
        return max(1, round(epochs * self.steps_per_epoch))

    def active(self, level: int, n_modules: int) -> bool:
        """Whether module ``level`` learns at this step."""
        if self.options.schedule == "joint":
            return True
        current = min(int(self.step) // self.level_steps(n_modules), n_modules - 1)
        return level == current

    def clustering(self, level: int, n_modules: int) -> bool:
        """Whether module ``level``'s prototypes learn at this step (``cluster_start``)."""
        if self.options.schedule == "joint":
            span, done = self.epochs * self.steps_per_epoch, int(self.step)
        else:
            span = self.level_steps(n_modules)
            done = int(self.step) - level * span
        return done >= self.options.cluster_start * span

    def module_loss(
        self, level: int, block: ClusterBlock, x: torch.Tensor, gen: torch.Generator | None,
        cluster: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prediction loss (hidden layer, predictor) and, when ``cluster``, the k-means loss
        (prototypes) of module ``level`` on its input codes ``x``."""
        h = block.hidden(x)
        logits = block.predictions(h)
        n, p = logits.shape[:2]
        side = torch.arange(p, device=x.device) % block.s
        own = logits[:, torch.arange(p, device=x.device), side]  # (N, P, K)
        target = sibling_targets(x, block.s, block.k_in)
        pred = F.cross_entropy(own.reshape(n * p, -1), target.reshape(-1))
        if not cluster:
            return pred, None
        points = block.points(logits.detach()).reshape(n * p, -1)
        o = self.options
        if not bool(self.placed[level]):
            self.init_prototypes(block, points, gen)
            self.placed[level] = True
        if o.reseed:
            self.reseed_dead(block, points, gen)
        dist = block.distances(points)  # (n p, k)
        with torch.no_grad():
            scores = -dist / (dist.mean() + 1e-12)
            assign = balanced_codes(scores, o.sinkhorn_eps, o.sinkhorn_iters)
        kmeans = (assign * dist).sum(1).mean() / 2
        return pred, kmeans

    @torch.no_grad()
    def init_prototypes(
        self, block: ClusterBlock, points: torch.Tensor, gen: torch.Generator | None
    ) -> None:
        """k-means++ seeding of the prototypes on the batch's points (under data parallel, rank
        0's part of the batch, broadcast to every rank)."""
        gen = _on_device(gen, points)
        first = torch.randint(len(points), (1,), generator=gen, device=points.device)
        chosen = [points[first[0]]]
        d2 = (points - chosen[0]).pow(2).sum(-1)
        for _ in range(1, block.k):
            chosen.append(points[_far_point(d2, gen)])
            d2 = torch.minimum(d2, (points - chosen[-1]).pow(2).sum(-1))
        block.prototypes.copy_(torch.stack(chosen))
        if ddp.data_parallel():  # every rank starts from rank 0's seeding
            ddp.broadcast_params([block.prototypes])

    @torch.no_grad()
    def reseed_dead(
        self, block: ClusterBlock, points: torch.Tensor, gen: torch.Generator | None
    ) -> None:
        """Move every prototype that is nearest to none of the batch's points onto a point drawn
        with probability proportional to its squared distance to the nearest prototype (as
        k-means++ seeds): a prototype stranded between clusters, while two symbols share another
        one, would otherwise stay unused (the balanced assignment keeps it fed with the points
        nearest to its neighbours)."""
        dist = block.distances(points)
        counts = torch.bincount(dist.argmin(1), minlength=block.k)
        gen = _on_device(gen, points)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            near = dist.min(1).values
            if float(near.sum()) <= 0:
                break
            idx = _far_point(near, gen)
            block.prototypes[c] = points[idx]
            dist[:, c] = (points - points[idx]).pow(2).sum(-1)
        if ddp.data_parallel():  # every rank keeps rank 0's prototypes
            ddp.broadcast_params([block.prototypes])

    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """The tokens, and the run's generator (the modules draw from it when they place or
        reseed prototypes: a pipeline passes its state along with the carry)."""
        return {"x": batch.x, "generator": batch.generator, "loss": 0.0}

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        modules = [b for b in net.blocks if isinstance(b, ClusterBlock)]
        n = len(modules)
        learning = [level for level in range(n) if self.active(level, n)]
        x, gen = carry["x"], carry.get("generator")
        metrics: dict[str, float] = {}
        total = carry["loss"]
        for level in range(start, min(stop, learning[-1] + 1)):  # no module above learns
            block = modules[level]
            if level in learning:
                cluster = self.clustering(level, n)
                pred, kmeans = self.module_loss(level, block, x.detach(), gen, cluster)
                loss = pred if kmeans is None else pred + self.options.cluster_weight * kmeans
                loss.backward()
                metrics[f"loss_block{level + 1}"] = float(pred.detach())
                if kmeans is not None:
                    metrics[f"kmeans_block{level + 1}"] = float(kmeans.detach())
                total += float(pred.detach())
            if level < learning[-1]:  # the codes the next module reads
                with torch.no_grad():
                    x = block(x)
        self.advance(n)
        metrics["loss"] = total
        return metrics, {**carry, "x": x, "loss": total}

    @torch.no_grad()
    def advance(self, n_modules: int) -> None:
        """End of a step, on every stage alike: the modules that clustered have placed their
        prototypes (whichever process trained them), and the step count moves on."""
        for level in range(n_modules):
            if self.active(level, n_modules) and self.clustering(level, n_modules):
                self.placed[level] = True
        self.step += 1

    def length_refusal(self) -> str | None:
        o = self.options
        if o.schedule == "levelwise" and o.level_epochs == 0:
            return (f"rule {self.name} shares the run's epochs among its modules "
                    "(rule.options.level_epochs=0)")
        if o.schedule == "joint" and o.cluster_start > 0:
            return (f"rule {self.name} starts clustering at a share of the run's steps "
                    f"(rule.options.cluster_start={o.cluster_start})")
        return None

    def layerwise_refusal(self) -> str | None:
        return (f"rule {self.name} trains its modules one after the other on its own schedule "
                "(rule.options.schedule, level_epochs); valid: layerwise.epochs=null")

    def pipeline_refusal(self) -> str | None:
        if self.options.schedule == "joint":
            return (f"rule {self.name} with rule.options.schedule=joint trains every module at "
                    "every step, each drawing from the run's random numbers in turn; valid: "
                    "schedule=levelwise")
        return None


def _on_device(gen: torch.Generator | None, points: torch.Tensor) -> torch.Generator | None:
    """The run's generator where it lives on the points' device, else the default one."""
    return gen if gen is not None and gen.device == points.device else None


def _far_point(d2: torch.Tensor, gen: torch.Generator | None) -> int:
    """A point index drawn with probability proportional to ``d2`` (k-means++), or uniformly
    when every ``d2`` is zero."""
    if float(d2.sum()) <= 0:
        return int(torch.randint(len(d2), (1,), generator=gen, device=d2.device)[0])
    return int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)[0])
