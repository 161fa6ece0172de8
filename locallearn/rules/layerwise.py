"""Layer-wise self-supervised rules ("type 2"): every block learns from its own loss.

Each block's input is detached, its loss computed on its own output, backpropagated inside the
block only, and its graph freed before the next block runs: the activation memory of training is
that of one block. No label reaches the encoder.

For the hierarchical CNN of the RHM a block's output is ``z`` of shape ``(N, C, P)`` (``P``
positions). The context ``c`` (same shape) and the pairs come from the view:

- ``synonyms`` / ``mask``: two views of every sample (from the data side); ``z`` of view 1 is
  predicted from ``c``, the same block's output on view 2 at the same position, and back.
- ``synonyms-per-block``: block ``l`` gets its own pair of views, sharing the latent of the node
  its positions cover (the pair is passed through the blocks below without gradients).
- ``siblings``: one view; the context of position ``j`` is the mean of the outputs at the
  positions that share its parent in the RHM tree (``j // s``). The top block has a single
  position and no siblings, so under this view it keeps its initial weights (random features).

Losses (per position, summed over positions, averaged over the batch):

- ``clapp``: ``f(u_pos) + f(-u_neg)`` with ``u = s z^T B c``; ``B`` is a trainable ``C x C``
  prediction matrix shared by the positions, ``c`` detached, the negative ``z`` another sample of
  the batch; ``f`` the hinge by default (CLAPP). The scale ``s`` is the one convention of every
  CLAPP-style rule, :func:`locallearn.losses.score_scale` (``rule.options.score_norm``): here
  ``dims`` by default, ``s = 1 / sqrt(C C) = 1 / C``, which keeps the score of order one at any
  width (it is a fixed rescaling of ``B``; the RHM presets are tuned with it); ``none`` sums
  (``s = 1``), the default of the image rules, as in their paper's code.
- ``infonce``: cross-entropy of the bilinear scores ``s z_i^T B c_j / tau`` over the batch, the
  positive on the diagonal.
- ``vicreg``: invariance + variance + covariance between the two views' outputs (no ``B``).

Three-factor form of ``clapp`` (checked against autograd in the tests): for a block with
pre-activation ``a`` and input patch ``x``, ``dW = sum gamma * (B c / C) * relu'(a) x^T`` with
``gamma = f'(u_pos)`` for the positive and ``-f'(-u_neg)`` for the negative sample (``s = 1/C``).

Settings: ``rule.loss``, ``rule.view``; ``rule.f`` and ``rule.negatives`` for ``clapp``,
``rule.temperature`` for ``infonce``. Options: :class:`LayerwiseOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from locallearn import losses
from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, TopLossReference, check_range

LOSSES = ("clapp", "infonce", "vicreg")
VIEWS = ("synonyms", "synonyms-per-block", "mask", "siblings")
NEGATIVES = ("next", "random")


@dataclass
class LayerwiseOptions:
    """``rule.options`` of ``layerwise``.

    Attributes:
        loss: the block loss: ``clapp``, ``infonce`` or ``vicreg``.
        view: the second view of a sample: ``synonyms`` (from the generator),
            ``synonyms-per-block``, ``mask`` or ``siblings`` (the module docstring).
        f: the function of the ``clapp`` score loss (:mod:`locallearn.losses`).
        negative_image: the ``clapp`` negative of each sample: ``next`` or ``random``.
        temperature: the ``infonce`` temperature.
        score_norm: scale of the bilinear scores (:func:`locallearn.losses.score_scale`):
            ``dims`` (default here: ``1 / C``) or ``none`` (the sum).
    """

    loss: str = "clapp"
    view: str = "synonyms"
    f: str = "hinge"
    negative_image: Literal["next", "random"] = "next"
    temperature: float = 0.1
    score_norm: Literal["none", "dims"] = "dims"

    def validate(self) -> None:
        applies = {"f": "clapp", "negative_image": "clapp", "temperature": "infonce"}
        defaults = LayerwiseOptions.__dataclass_fields__
        for key, loss in applies.items():
            if self.loss != loss and getattr(self, key) != defaults[key].default:
                raise ValueError(f"rule.options.{key}={getattr(self, key)!r} applies to "
                                 f"loss={loss} only, not loss={self.loss}; remove it")


def pick_negatives(n: int, how: str, generator: torch.Generator | None, device) -> torch.Tensor:
    """Index of another sample of the batch for every sample (never itself when ``n > 1``)."""
    if how == "next":
        return torch.roll(torch.arange(n, device=device), -1)
    if generator is None:
        raise ValueError("random negatives need the run's generator in the batch")
    shift = torch.randint(1, max(n, 2), (n,), generator=generator, device=generator.device)
    return (torch.arange(n) + shift.cpu()).remainder(n).to(device)


def sibling_context(z: torch.Tensor, s: int) -> torch.Tensor:
    """Mean over the other positions that share the parent (``j // s``), ``(N, C, P)``."""
    n, c, p = z.shape
    groups = z.reshape(n, c, p // s, s)
    total = groups.sum(-1, keepdim=True)
    return ((total - groups) / (s - 1)).reshape(n, c, p)


class Layerwise(StepsBlockByBlock, Rule):
    """Block-by-block self-supervised learning (see the module docstring)."""

    name = "layerwise"
    uses_labels = False
    Options = LayerwiseOptions

    @classmethod
    def from_config(cls, cfg, options: LayerwiseOptions, seed: int, **task_info) -> Layerwise:
        o = options
        return cls(loss=o.loss, view=o.view, f=o.f, negatives=o.negative_image,
                   temperature=o.temperature, s=task_info.get("s", 2), score_norm=o.score_norm)

    def __init__(
        self,
        loss: str = "clapp",
        view: str = "synonyms",
        f: str = "hinge",
        negatives: str = "next",
        temperature: float = 0.1,
        s: int = 2,
        score_norm: str = "dims",
    ):
        super().__init__()
        for key, value, valid in (
            ("rule.options.loss", loss, LOSSES),
            ("rule.options.view", view, VIEWS),
            ("rule.options.f", f, losses.F_KINDS),
            ("rule.options.negative_image", negatives, NEGATIVES),
        ):
            if value not in valid:
                raise ValueError(f"{key}={value!r} is unknown; valid: {', '.join(valid)}")
        check_range("rule.options.temperature", temperature, 0, low_open=True)
        losses.score_scale(score_norm, 1, 1)  # checks the name
        self.score_norm = score_norm
        self.loss_kind = loss
        self.view = view
        self.f = f
        self.negatives = negatives
        self.temperature = temperature
        self.s = s
        self.view_kind = None if view == "siblings" else view
        self.B = nn.ParameterList()

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        with torch.no_grad():
            feats = net.features(sample_input[:1])
        self.positions = [h.shape[-1] for h in feats]
        if self.loss_kind != "vicreg":
            for h in feats:
                c = h.shape[1]
                self.B.append(nn.Parameter(torch.zeros(c, c, device=sample_input.device)))

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters() + list(self.B.parameters())

    def block_parameters(self, level: int) -> list[nn.Parameter]:
        return [self.B[level]] if len(self.B) else []

    def pipeline_refusal(self) -> str | None:
        return None  # every block learns from its own outputs (same-block context)

    # ------------------------------------------------------------------ losses
    def predict(self, level: int, c: torch.Tensor) -> torch.Tensor:
        """``s B c`` (``s = 1/C`` by default): the dendritic prediction, same shape as ``c``."""
        scale = losses.score_scale(self.score_norm, c.shape[1], c.shape[1])
        return torch.einsum("dc,nc...->nd...", self.B[level], c) * scale

    def pair_loss(
        self, level: int, z: torch.Tensor, c: torch.Tensor, neg: torch.Tensor | None
    ) -> torch.Tensor:
        """Loss of block ``level`` for outputs ``z`` predicted from context ``c`` (detached);
        ``neg``: the negative of every sample (``clapp`` only)."""
        n = z.shape[0]
        if self.loss_kind == "vicreg":
            return losses.vicreg(_positions_as_batch(z), _positions_as_batch(c))
        pred = self.predict(level, c.detach())
        if self.loss_kind == "clapp":
            u_pos = (z * pred).sum(1)
            u_neg = (z[neg] * pred).sum(1)
            return losses.score_loss(u_pos, u_neg, self.f) / n
        # infonce: scores of every z against every prediction, at each position
        zp = _positions_as_batch(z, keep_positions=True)  # (P, N, C)
        pp = _positions_as_batch(pred, keep_positions=True)
        logits = zp @ pp.transpose(1, 2) / self.temperature  # (P, N, N)
        target = torch.arange(n, device=z.device).expand(logits.shape[0], n)
        return F.cross_entropy(logits.reshape(-1, n), target.reshape(-1)) * logits.shape[0]

    def _draws(self, positions: int) -> int:
        """How many negative index vectors a block with ``positions`` output positions uses."""
        if self.loss_kind != "clapp":
            return 0
        if self.view == "siblings":
            return 0 if positions < self.s else 1
        return 2

    def draw_negatives(
        self, n: int, positions: list[int], generator: torch.Generator | None, device
    ) -> list[list[torch.Tensor]]:
        """Per block, the negatives of each of its pair losses, drawn block after block."""
        return [[pick_negatives(n, self.negatives, generator, device)
                 for _ in range(self._draws(p))] for p in positions]

    def block_loss(
        self, level: int, z1: torch.Tensor, z2: torch.Tensor | None, batch: Batch
    ) -> torch.Tensor | None:
        """Loss of one block from its output on one or two views (``None``: nothing to learn);
        its negatives are drawn from ``batch.generator``."""
        (negs,) = self.draw_negatives(z1.shape[0], [z1.shape[-1]], batch.generator, z1.device)
        return self._block_loss(level, z1, z2, negs)

    def _block_loss(
        self, level: int, z1: torch.Tensor, z2: torch.Tensor | None, negs: list[torch.Tensor]
    ) -> torch.Tensor | None:
        if z2 is None:  # siblings
            if z1.shape[-1] < self.s:
                return None
            return self.pair_loss(level, z1, sibling_context(z1, self.s), _first(negs))
        if self.loss_kind == "vicreg":
            return self.pair_loss(level, z1, z2, None)
        return (self.pair_loss(level, z1, z2, _first(negs))
                + self.pair_loss(level, z2, z1, negs[1] if negs else None))

    # ------------------------------------------------------------------ the step
    def _input(self, batch: Batch, level: int = 0) -> torch.Tensor:
        """The input of block 0 (for ``synonyms-per-block``: block ``level``'s own pair)."""
        if self.view == "siblings":
            return batch.x
        if self.view == "synonyms-per-block":
            if batch.block_views is None:
                raise ValueError("rule view 'synonyms-per-block' needs one pair of views per block")
            return torch.cat(batch.block_views[level], 0)
        if batch.views is None:
            raise ValueError(f"rule view {self.view!r} needs two views in the batch")
        return torch.cat(batch.views, 0)

    def _pair_below(self, net: BlockNet, batch: Batch, level: int) -> torch.Tensor:
        """Block ``level``'s own pair of views passed through the blocks below it."""
        h = self._input(batch, level)
        for below in net.blocks[:level]:
            h = below(h)
        return h

    def _loss_of(self, level: int, z: torch.Tensor, negs: list[torch.Tensor]):
        if self.view == "siblings":
            return self._block_loss(level, z, None, negs)
        z1, z2 = z.chunk(2, 0)
        return self._block_loss(level, z1, z2, negs)

    def _batch_negatives(self, net: BlockNet, batch: Batch, h: torch.Tensor):
        """Every block's negatives for a batch whose block-0 input is ``h``."""
        positions = getattr(self, "positions", None)
        if positions is None:  # not set up: find the blocks' output positions
            with torch.no_grad():
                positions = [f.shape[-1] for f in net.features(h[:1])]
        n = h.shape[0] if self.view == "siblings" else h.shape[0] // 2
        return self.draw_negatives(n, positions, batch.generator, h.device)

    def reference_rule(self) -> Rule:
        return TopLossBackprop(self)

    def start_carry(self, net: BlockNet, batch: Batch) -> dict:
        """Block 0's input (for ``synonyms-per-block``: every block's own pair, passed through no
        block yet) and every block's negatives."""
        h = self._input(batch)
        carry: dict = {"negatives": self._batch_negatives(net, batch, h), "loss": 0.0}
        if self.view == "synonyms-per-block":
            carry["pairs"] = [h] + [self._input(batch, level)
                                    for level in range(1, len(net.blocks))]
        else:
            carry["h"] = h
        return carry

    def blocks_grads(
        self, net: BlockNet, carry: dict, start: int, stop: int
    ) -> tuple[dict[str, float], dict]:
        per_block = self.view == "synonyms-per-block"
        total = carry["loss"]
        metrics: dict[str, float] = {}
        h = None if per_block else carry["h"]
        pairs = carry.get("pairs")
        for level in range(start, stop):
            if per_block:  # block level's own pair, through the blocks below it on this stage
                h = pairs[level]
                if level > start:
                    with torch.no_grad():
                        for below in net.blocks[start:level]:
                            h = below(h)
            z = net.blocks[level](h.detach())
            loss = self._loss_of(level, z, carry["negatives"][level])
            if loss is not None:
                loss.backward()  # frees this block's graph before the next block runs
                metrics[f"loss_block{level + 1}"] = float(loss.detach())
                total += float(loss.detach())
            h = z.detach()
        metrics["loss"] = total
        out = {"negatives": carry["negatives"], "loss": total}
        if per_block:  # the pairs of the blocks above, through this stage's blocks
            with torch.no_grad():
                above = []
                for level in range(stop, len(pairs)):
                    h = pairs[level]
                    for block in net.blocks[start:stop]:
                        h = block(h)
                    above.append(h)
            out["pairs"] = [None] * stop + above
        else:
            out["h"] = h
        return metrics, out



class TopLossBackprop(TopLossReference):
    """BP-SSL: a layer-wise rule's loss on its top block, backpropagated through every block.

    The top block is the highest one that has a loss (with the ``siblings`` view, the block below
    the single-position top). Shares the layer-wise rule's prediction matrices.
    """

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local = self.local[0]
        per_block = local.view == "synonyms-per-block"
        # every block's loss in the local rule's order, so that random negatives are drawn
        # exactly as the local rule draws them; the highest loss is backpropagated
        top_loss = None
        h = local._input(batch)
        negatives = local._batch_negatives(net, batch, h)
        for level, block in enumerate(net.blocks):
            if per_block and level > 0:
                h = local._pair_below(net, batch, level)
            h = block(h)
            loss = local._loss_of(level, h, negatives[level])
            if loss is not None:
                top_loss = loss
        if top_loss is None:
            raise ValueError("no block of this network has a loss under this rule")
        top_loss.backward()
        return {"loss": float(top_loss.detach())}


def _first(negs: list[torch.Tensor]) -> torch.Tensor | None:
    return negs[0] if negs else None


def _positions_as_batch(z: torch.Tensor, keep_positions: bool = False) -> torch.Tensor:
    """``(N, C, *pos)`` to ``(N * P, C)``, or to ``(P, N, C)`` with ``keep_positions``."""
    n, c = z.shape[:2]
    zp = z.reshape(n, c, -1).permute(2, 0, 1)
    return zp if keep_positions else zp.reshape(-1, c)
