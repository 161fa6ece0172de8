"""``scff``: self-contrastive forward-forward (Nat. Commun. 2025, arXiv 2409.11593).

Every block learns from its goodness on an image paired with itself (positive) and with another
image of the batch (negative), through the pairing convolution of
:class:`~locallearn.nets.scff_cnn.SCFFConv`. What it computes and the reference code's quirks
kept here (the bias counted twice, the standardisation after the padding, ``log(1+exp)``
written literally, the frozen stages' pairing): ``docs/local-rules.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, TopLossReference

__all__ = ["SCFF", "SCFFOptions", "SCFFTopLoss", "draw_shift", "goodness", "scff_loss"]


@dataclass
class SCFFOptions:
    """``rule.options`` of ``scff`` (defaults: the published CIFAR-10 greedy run).

    Attributes:
        threshold_pos: ``theta+`` of each block (the positive goodness is pushed above it).
        threshold_neg: ``theta-`` of each block (the negative goodness is pushed below it).
        lam: weight of each block's penalty on the norm of the positive goodness map.
        concat: per block, whether it pairs its input again (true) or reads the positive and
            negative streams of the block below (false); block 1 must pair.
        frozen_concat: whether blocks frozen below the trained ones (greedy schedules) pair,
            whatever their ``concat`` flag (the published stages; see the module docstring).
    """

    threshold_pos: list[float] = field(default_factory=lambda: [0.0, 5.0, 6.0])
    threshold_neg: list[float] = field(default_factory=lambda: [1.0, 9.0, 10.0])
    lam: list[float] = field(default_factory=lambda: [1.2e-3, 7e-4, 5e-4])
    concat: list[bool] = field(default_factory=lambda: [True, False, True])
    frozen_concat: bool = True

    def validate(self) -> None:
        lists = {"threshold_pos": self.threshold_pos, "threshold_neg": self.threshold_neg,
                 "lam": self.lam, "concat": self.concat}
        for key, values in lists.items():
            if not values:
                raise ValueError(f"rule.options.{key}=[] is invalid: give one value per block")
        for key in ("threshold_pos", "threshold_neg", "lam"):
            values = lists[key]
            if any(not math.isfinite(v) for v in values):
                raise ValueError(f"rule.options.{key}={values} is invalid: values must be finite")
        if any(v < 0 for v in self.lam):
            raise ValueError(f"rule.options.lam={self.lam} is invalid: values must be >= 0")
        sizes = {key: len(values) for key, values in lists.items()}
        if len(set(sizes.values())) > 1:
            got = ", ".join(f"{key}: {n}" for key, n in sizes.items())
            raise ValueError(f"rule.options lists have different lengths ({got}); give one "
                             "value per block in each")
        if not self.concat[0]:
            raise ValueError(f"rule.options.concat={self.concat} is invalid: block 1 has no "
                             "stream of negatives below it, so concat[0] must be true")


def draw_shift(n: int, generator: torch.Generator | None) -> int:
    """The negative pairs' shift of a batch of ``n`` images: the first entry of
    ``randperm(n - 1) + 1`` (a number in ``1 .. n-1``)."""
    if n < 2:
        raise ValueError(f"a batch of {n} image has no negative pair; give batches of >= 2")
    return int(torch.randperm(n - 1, generator=generator)[0]) + 1


def goodness(out: torch.Tensor) -> torch.Tensor:
    """``mean_c relu(out)^2``: one value per image and location, shape ``(B, H, W)``."""
    return F.relu(out).pow(2).mean(1)


def scff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold_pos: float,
              threshold_neg: float, lam: float) -> torch.Tensor:
    """The block loss of goodness maps ``g_pos`` and ``g_neg`` (step 3 of the module
    docstring), with the logistic terms written ``log(1 + exp(.))`` as in the reference."""
    pos = torch.log(1 + torch.exp(-g_pos + threshold_pos)).mean((1, 2)).mean()
    neg = torch.log(1 + torch.exp(g_neg - threshold_neg)).mean((1, 2)).mean()
    norm = torch.linalg.vector_norm(g_pos, ord=2, dim=(1, 2)).mean()
    return pos + neg + lam * norm


class SCFF(StepsBlockByBlock, Rule):
    """Implements SCFF (self-contrastive forward-forward; Nat. Commun. 2025, arXiv
    2409.11593): every block from its goodness on positive and negative pairs. Options:
    :class:`SCFFOptions`; what it computes and the reference's quirks: ``docs/local-rules.md``.

    Metrics of each block ``k`` it trains: ``loss_block{k}`` and the mean goodness of its
    positive and negative pairs, ``goodness_pos_block{k}`` and ``goodness_neg_block{k}``;
    ``loss`` is the sum of the block losses.
    """

    name = "scff"
    uses_labels = False
    view_kind = "image"
    Options = SCFFOptions

    @classmethod
    def from_config(cls, cfg: Any, options: SCFFOptions, seed: int, **task_info: Any) -> SCFF:
        return cls(options)

    def __init__(self, options: SCFFOptions | None = None) -> None:
        super().__init__()
        o = options if options is not None else SCFFOptions()
        o.validate()
        self.threshold_pos = [float(v) for v in o.threshold_pos]
        self.threshold_neg = [float(v) for v in o.threshold_neg]
        self.lam = [float(v) for v in o.lam]
        self.concat = [bool(v) for v in o.concat]
        self.frozen_concat = bool(o.frozen_concat)

    # ------------------------------------------------------------------ setup
    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        blocks = list(net.blocks)
        if not all(hasattr(getattr(b, "pre", None), "contrast") for b in blocks):
            raise ValueError(f"rule.name={self.name} needs net.kind=scff or vgg6-scff (blocks "
                             "that pair images through a shared convolution)")
        if len(self.concat) != len(blocks):
            raise ValueError(
                f"rule.options lists give {len(self.concat)} values for a network of "
                f"{len(blocks)} blocks; give one per block (threshold_pos, threshold_neg, lam, "
                "concat)"
            )

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters()

    def pipeline_refusal(self) -> str | None:
        return None

    def reference_rule(self) -> Rule:
        """Backprop of the top block's SCFF loss through every block."""
        return SCFFTopLoss(self)

    # ------------------------------------------------------------------ pieces
    def _needs_negatives(self, level: int, n_blocks: int) -> bool:
        """Whether block ``level`` reads the negative stream of the block below."""
        return level < n_blocks and not self.concat[level]

    def outputs(
        self, net: BlockNet, level: int, h: torch.Tensor, h_neg: torch.Tensor | None,
        shift: int, pair: bool, negatives: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-activations of block ``level`` for the positive and negative pairs.

        ``pair``: pair ``h`` again (positive: ``(h_i, h_i)``, negative: ``(h_i, h_{i+shift})``);
        otherwise convolve ``h`` and the negative stream ``h_neg`` once each. ``negatives=False``
        skips the negative pairs of a paired block (``None`` in their place)."""
        pre = net.blocks[level].pre
        if pair:
            return pre.contrast(h, shift if negatives else None)
        if h_neg is None:
            raise ValueError(f"block {level + 1} reads the negative stream of the block below "
                             "(rule.options.concat false) but none was passed on")
        both = pre.single(torch.cat([h, h_neg]))
        return both[: h.shape[0]], both[h.shape[0]:]

    # ------------------------------------------------------------------ block by block
    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """The image batch and the shift of every block's negative pairs, drawn in block order
        from the run's generator."""
        n = batch.x.shape[0]
        shifts = [draw_shift(n, batch.generator) for _ in net.blocks]
        return {"h": batch.x, "h_neg": None, "shifts": shifts, "loss": 0.0}

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        h, h_neg, shifts = carry["h"], carry["h_neg"], carry["shifts"]
        n_blocks = len(net.blocks)
        values: list[torch.Tensor] = []
        for level in range(start, stop):
            with torch.enable_grad():
                out, out_neg = self.outputs(net, level, h, h_neg, shifts[level],
                                            self.concat[level])
                assert out_neg is not None
                g_pos, g_neg = goodness(out), goodness(out_neg)
                loss = scff_loss(g_pos, g_neg, self.threshold_pos[level],
                                 self.threshold_neg[level], self.lam[level])
                loss.backward()
            values.append(torch.stack([loss.detach(), g_pos.detach().mean(),
                                       g_neg.detach().mean()]).double())
            post = net.blocks[level].post
            with torch.no_grad():
                h = post(out.detach())
                h_neg = (post(out_neg.detach())
                         if self._needs_negatives(level + 1, n_blocks) else None)
        rows = torch.stack(values).cpu().tolist() if values else []
        metrics: dict[str, float] = {}
        for i, (loss_k, g_pos_k, g_neg_k) in enumerate(rows):
            k = start + i + 1
            metrics[f"loss_block{k}"] = loss_k
            metrics[f"goodness_pos_block{k}"] = g_pos_k
            metrics[f"goodness_neg_block{k}"] = g_neg_k
        metrics["loss"] = sum((r[0] for r in rows), float(carry["loss"]))
        return metrics, {**carry, "h": h, "h_neg": h_neg, "loss": metrics["loss"]}

    @torch.no_grad()
    def frozen_carry(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> dict[str, Any]:
        """Blocks ``start..stop-1`` forward without gradients. With ``frozen_concat`` they pair
        (whatever their flag) and only the last one forms negative pairs, when block ``stop``
        reads them; without it they follow their flags."""
        h, h_neg, shifts = carry["h"], carry["h_neg"], carry["shifts"]
        n_blocks = len(net.blocks)
        for level in range(start, stop):
            pair = self.frozen_concat or self.concat[level]
            nxt = level + 1
            needed = self._needs_negatives(nxt, n_blocks) and (
                nxt >= stop or not self.frozen_concat)
            out, out_neg = self.outputs(net, level, h, h_neg, shifts[level], pair,
                                        negatives=needed)
            post = net.blocks[level].post
            h = post(out)
            h_neg = post(out_neg) if needed and out_neg is not None else None
        return {**carry, "h": h, "h_neg": h_neg}



class SCFFTopLoss(TopLossReference):
    """The top block's SCFF loss backpropagated through every block (the BP counterpart of
    :class:`SCFF` for gradient alignment): the same shifts and pairing flags, nothing detached
    between blocks. Its top-block update equals the local rule's. The triangle activation of
    blocks 1-2 takes its channel mean as a constant (:class:`~locallearn.nets.hebb_cnn.Triangle`),
    so the gradient through it does too."""

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local: SCFF = self.local[0]
        carry = local.start_carry(net, batch)
        h, h_neg, shifts = carry["h"], None, carry["shifts"]
        n_blocks = len(net.blocks)
        top = n_blocks - 1
        for level in range(n_blocks):
            needs = level == top or local._needs_negatives(level + 1, n_blocks)
            out, out_neg = local.outputs(net, level, h, h_neg, shifts[level],
                                         local.concat[level], negatives=needs)
            if level == top:
                assert out_neg is not None
                loss = scff_loss(goodness(out), goodness(out_neg), local.threshold_pos[top],
                                 local.threshold_neg[top], local.lam[top])
                loss.backward()
                return {"loss": float(loss.detach())}
            post = net.blocks[level].post
            h = post(out)
            h_neg = post(out_neg) if local._needs_negatives(level + 1, n_blocks) else None
        raise ValueError("the network has no blocks")
