"""``softhebb``: soft winner-take-all Hebbian learning (ICLR 2023, arXiv 2209.11883).

Every block learns from its own input and output, without a loss or a gradient; the update and
its per-neuron rate reach a stock SGD through ``.grad``. What it computes, how the update reaches
the optimiser and the reference code's quirks kept here (the inverse temperature held in
float32): ``docs/local-rules.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, check_range

__all__ = ["SoftHebb", "SoftHebbOptions", "softhebb_update"]


@dataclass
class SoftHebbOptions:
    """``rule.options`` of ``softhebb``.

    Attributes:
        t_invert: inverse temperature of the soft winner-take-all, one per block.
        lr_power: power of the per-neuron rate ``(| ||w_k|| - 1 | + 1e-10) ** lr_power``.
        plastic: ``false`` runs the same pass without changing a weight (the batch norms
            still gather their statistics): the untrained network to compare with.
    """

    t_invert: list[float] = field(default_factory=lambda: [1.0, 0.65, 0.25])
    lr_power: float = 0.5
    plastic: bool = True

    def validate(self) -> None:
        if not self.t_invert or any(not t > 0 for t in self.t_invert):
            raise ValueError(f"rule.options.t_invert={self.t_invert} is invalid: give one "
                             "inverse temperature > 0 per block")
        check_range("rule.options.lr_power", self.lr_power, 0)


def softhebb_update(xp: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                    t_invert: float) -> torch.Tensor:
    """The normalised update ``dW`` (steps 2-5 of the module docstring) of a block with padded
    input ``xp`` ``(N, C, H, W)``, weighted input ``u = conv(xp, weight)`` and weights
    ``weight``."""
    y = torch.softmax(t_invert * u, dim=1)
    winner = u.argmax(1, keepdim=True)
    sign = torch.full_like(y, -1.0).scatter_(1, winner, 1.0)
    y = y * sign
    dw = torch.nn.grad.conv2d_weight(xp, weight.shape, y)
    yu = (y * u).sum(dim=(0, 2, 3))
    dw.addcmul_(yu.view(-1, 1, 1, 1), weight, value=-1.0)
    return dw.div_(torch.linalg.vector_norm(dw, ord=float("inf")) + 1e-30)


class SoftHebb(StepsBlockByBlock, Rule):
    """Implements SoftHebb (soft winner-take-all Hebbian learning; ICLR 2023, arXiv
    2209.11883): every block from its own input and output, no loss. Options:
    :class:`SoftHebbOptions`; what it computes and the reference's quirks:
    ``docs/local-rules.md``."""

    name = "softhebb"
    uses_labels = False
    view_kind = "image"
    Options = SoftHebbOptions

    @classmethod
    def from_config(cls, cfg: Any, options: SoftHebbOptions, seed: int, **task_info: Any):
        return cls(list(options.t_invert), options.lr_power, options.plastic)

    def __init__(self, t_invert: list[float] | None = None, lr_power: float = 0.5,
                 plastic: bool = True) -> None:
        super().__init__()
        # rounded to float32 as the reference code stores it (0.65 is 0.6499999762 there)
        self.t_invert = [float(torch.tensor(t, dtype=torch.float32))
                         for t in (t_invert or [1.0, 0.65, 0.25])]
        self.lr_power = float(lr_power)
        self.plastic = bool(plastic)

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        blocks = list(net.blocks)
        if not all(hasattr(b.pre, "inputs") and hasattr(b.pre, "conv") for b in blocks):
            raise ValueError(f"rule.name={self.name} needs net.kind=softhebb or vgg6-softhebb "
                             "(blocks of batch norm, padding and a convolution without bias)")
        if len(self.t_invert) != len(blocks):
            raise ValueError(
                f"rule.options.t_invert={self.t_invert} gives {len(self.t_invert)} values for a "
                f"network of {len(blocks)} blocks; give one per block"
            )

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters()

    def pipeline_refusal(self) -> str | None:
        return None

    def data_parallel_refusal(self) -> str | None:
        return ("softhebb scales each block's update by its largest value over the whole batch "
                "and normalises each block's input with the batch's statistics, which averaging "
                "the ranks' updates would change; valid: one process, or parallel.stages > 1 "
                "(its blocks on separate processes)")


    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        return {"h": batch.x, "gap_sum": 0.0, "neurons": 0}

    def _block(self, net: BlockNet, level: int, h: torch.Tensor, learn: bool) -> torch.Tensor:
        block = net.blocks[level]
        xp = block.pre.inputs(h)
        u = block.pre.conv(xp)
        if learn:
            w = block.pre.weight
            dw = softhebb_update(xp, u, w, self.t_invert[level])
            step = dw.mul_(self.neuron_rates(w).neg_().view(-1, 1, 1, 1))
            w.grad = step if w.grad is None else w.grad.add_(step)
        return block.post(u)

    def neuron_rates(self, weight: torch.Tensor) -> torch.Tensor:
        """``(| ||w_k|| - 1 | + 1e-10) ** lr_power`` per output channel."""
        gap = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1) - 1
        return (gap.abs() + 1e-10) ** self.lr_power

    @torch.no_grad()
    def blocks_grads(self, net: BlockNet, carry: dict[str, Any], start: int,
                     stop: int) -> tuple[dict[str, float], dict[str, Any]]:
        h = carry["h"]
        metrics: dict[str, float] = {}
        gap_sum, neurons = float(carry["gap_sum"]), int(carry["neurons"])
        for level in range(start, stop):
            w = net.blocks[level].pre.weight
            gaps = (torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) - 1).abs()
            metrics[f"norm_gap_block{level + 1}"] = float(gaps.mean())
            gap_sum += float(gaps.sum())
            neurons += int(gaps.numel())
            h = self._block(net, level, h, learn=self.plastic)
        metrics["loss"] = gap_sum / max(neurons, 1)
        return metrics, {"h": h, "gap_sum": gap_sum, "neurons": neurons}

    @torch.no_grad()
    def frozen_carry(self, net: BlockNet, carry: dict[str, Any], start: int,
                     stop: int) -> dict[str, Any]:
        h = carry["h"]
        for level in range(start, stop):
            h = self._block(net, level, h, learn=False)
        return {**carry, "h": h}
