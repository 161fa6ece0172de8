"""``infonce-image``: BP-InfoNCE's loss trained layer-wise, each block on its own.

Every block ``l`` average-pools its output (globally by default, as BP-InfoNCE pools its top
block; ``rule.options.pool`` as for the other image rules), projects it with its own linear map
``W_l`` (``D_l -> D_l`` by default, no bias; ``rule.options.projection_dim`` sets the output
size) and minimises the symmetric InfoNCE of :func:`locallearn.losses.info_nce` between the two
views: cosine similarity divided by ``rule.temperature`` (0.1), each image's other view as the
positive, the batch's other images (of the other view) as its negatives. Block inputs are
detached, so a block learns from its own output and the other images of the batch only; the loss
of the top block is BP-InfoNCE's with the lower blocks frozen.

This is the rule that separates the loss from locality: the same steps and encoder as
``clapp-image`` (a hinge on one negative, layer-wise) and ``bp-ssl`` with ``rule.loss=infonce``
(a softmax over the batch, end to end). Its update of a block is not a three-factor product with
one scalar factor per sample: the factor of a sample is a vector, its embedding's error against
the softmax-weighted embeddings of the other images.

The batch cannot be split into micro-batches (the negatives are the other images, inside each
block's graph); ``rule.options.step`` is ``block`` (a backward per block, its graph freed) or
``summed`` (one backward, the same gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from locallearn import losses
from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, TopLossReference, check_range
from locallearn.rules.image_grid import pool_flat
from locallearn.rules.image_options import STEPS, check_choice, check_pool
from locallearn.rules.image_ssl import ImageRule

__all__ = ["InfoNCEOptions", "LayerwiseInfoNCE"]


@dataclass
class InfoNCEOptions:
    """``rule.options`` of ``infonce-image``.

    Attributes:
        pool: ``global`` (default, as BP-InfoNCE pools its top block), ``auto`` (the paper's
            grids 8-4-4-4-2-2) or pool sizes per block.
        projection_dim: output size of every block's projection (default: the block's pooled
            size, i.e. its channels with global pooling).
        step: ``block`` (backward per block, graph freed) or ``summed`` (one backward).
        temperature: the InfoNCE temperature.
    """

    pool: list[int] | str = "global"
    temperature: float = 0.1
    projection_dim: int | None = None
    step: Literal["block", "summed"] = "block"

    def validate(self) -> None:
        check_pool(self.pool)
        if self.projection_dim is not None:
            check_range("rule.options.projection_dim", self.projection_dim, 1)


class LayerwiseInfoNCE(StepsBlockByBlock, ImageRule):
    """Implements the layer-wise InfoNCE (BP-InfoNCE's loss of arXiv 2601.21683 on every block,
    each block from its own loss). Options: :class:`InfoNCEOptions`; ``docs/image-rules.md``.

    Args:
        pool: ``global``, ``auto`` or pool sizes per block.
        temperature: the InfoNCE temperature.
        projection_dim: output size of the projections (default: each block's pooled size).
        step: ``block`` or ``summed``.
        seed: seed of the projections' initial weights (the run's seed).
    """

    name = "infonce-image"
    Options = InfoNCEOptions

    @classmethod
    def from_config(cls, cfg, options: InfoNCEOptions, seed: int, **task_info) -> LayerwiseInfoNCE:
        o = options
        return cls(o.pool, o.temperature, o.projection_dim, o.step, seed)

    def __init__(
        self,
        pool: list[int] | str = "global",
        temperature: float = 0.1,
        projection_dim: int | None = None,
        step: str = "block",
        seed: int = 0,
    ) -> None:
        super().__init__(pool)
        check_range("rule.options.temperature", temperature, 0, low_open=True)
        check_choice("rule.options.step", step, STEPS)
        self.temperature = temperature
        self.projection_dim = projection_dim
        self.step = step
        self.seed = seed
        self.projections = nn.ModuleList()

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        self.resolve(net, sample_input)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for d in self.dims:
                out = self.projection_dim or d
                self.projections.append(
                    nn.Linear(d, out, bias=False).to(sample_input.device)
                )

    def block_parameters(self, level: int) -> list[nn.Parameter]:
        return list(self.projections[level].parameters())

    def pipeline_refusal(self) -> str | None:
        return None

    def block_loss(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """InfoNCE of block ``level``'s output ``z`` (both views stacked ``[view 1; view 2]``)."""
        e1, e2 = self.projections[level](pool_flat(z, self.pools[level])).chunk(2, 0)
        return losses.info_nce(e1, e2, self.temperature)

    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """Both views of the batch (block 0's input); nothing is drawn at random."""
        x, _ = self.views(batch)
        return {"x": x, "loss": 0.0}

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        h = carry["x"]
        values: list[torch.Tensor] = []
        for level in range(start, stop):
            z = net.blocks[level](h)
            loss = self.block_loss(level, z)
            if self.step == "block":
                loss.backward()  # frees this block's graph before the next block runs
            values.append(loss)
            h = z.detach()
        if self.step == "summed":
            torch.stack(values).sum().backward()
        per_block = torch.stack([v.detach() for v in values]).cpu().double().tolist()
        metrics = {f"loss_block{start + i + 1}": v for i, v in enumerate(per_block)}
        metrics["loss"] = sum(per_block, carry["loss"])
        return metrics, {"x": h, "loss": metrics["loss"]}


    def reference_rule(self) -> Rule:
        """BP-SSL counterpart: the top block's InfoNCE (with this rule's top projection)
        backpropagated through every block, i.e. BP-InfoNCE."""
        return TopInfoNCEBackprop(self)


class TopInfoNCEBackprop(TopLossReference):
    """The top block's loss of :class:`LayerwiseInfoNCE`, backpropagated through every block."""

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local = self.local[0]
        x, _ = local.views(batch)
        loss = local.block_loss(len(net.blocks) - 1, net.encode(x))
        loss.backward()
        return {"loss": float(loss.detach())}
