"""``lpl``: latent predictive learning (Nat. Neurosci. 26:1906, 2023), layer by layer.

Every block learns from its own globally pooled output on the two views of a batch: a predictive
term, a Hebbian (variance) term and a decorrelation term, its input detached. The terms, the
erratum's decorrelation expression the code follows and the absence of a stop-gradient:
``docs/local-rules.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, StepsBlockByBlock, TopLossReference, check_range
from locallearn.rules.image_options import check_choice
from locallearn.rules.image_ssl import VIEW_KIND

__all__ = ["LPL", "LPLOptions", "POOLINGS", "lpl_terms"]

#: Values of ``rule.options.pooling``: ``global`` (average-pool each block's map to one value per
#: channel) or ``none`` (the whole map; the reference's ``--no_pooling``).
POOLINGS = ("global", "none")
#: The three terms of a block's loss, in the order of their weights.
TERMS = ("pull", "push", "decorr")


@dataclass
class LPLOptions:
    """``rule.options`` of ``lpl``.

    Attributes:
        pull: weight of the predictive term (the mse between the two views' outputs).
        push: weight of the Hebbian term (minus the log-variance of every unit).
        decorr: weight of the decorrelation term (the mean squared off-diagonal covariance).
        eps: added to every variance inside the logarithm of the Hebbian term.
        pooling: ``global`` (each block's map average-pooled to one value per channel) or
            ``none`` (the whole map; see the module docstring for how each term reads it).
    """

    pull: float = 1.0
    push: float = 1.0
    decorr: float = 10.0
    eps: float = 1e-4
    pooling: Literal["global", "none"] = "global"

    def validate(self) -> None:
        for key in TERMS:
            check_range(f"rule.options.{key}", getattr(self, key), 0)
        check_range("rule.options.eps", self.eps, 0, low_open=True)
        check_choice("rule.options.pooling", self.pooling, POOLINGS)


def _hebbian(a: torch.Tensor, eps: float) -> torch.Tensor:
    """``-mean log(Var + eps)`` with the variance over dim 0 (mean detached, divisor ``n - 1``)
    of every other index of ``a``."""
    centred = a - a.mean(0).detach()
    variance = centred.pow(2).sum(0) / (a.shape[0] - 1)
    return -torch.log(variance + eps).mean()


def _decorrelation(a: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the covariance of the columns of ``a`` (rows are
    samples; mean detached, divisor ``rows - 1``)."""
    rows, cols = a.shape
    centred = a - a.mean(0).detach()
    eye = torch.eye(cols, dtype=torch.bool, device=a.device)
    cov = (centred.t() @ centred).masked_fill(eye, 0.0) / (rows - 1)
    return cov.pow(2).sum() / (cols * cols - cols)


def _stack_positions(h: torch.Tensor) -> torch.Tensor:
    """A map ``(B, C, H, W)`` as ``B * H * W`` rows of ``C`` channels (sample-major)."""
    return h.flatten(2).transpose(1, 2).reshape(-1, h.shape[1])


def lpl_terms(
    h: torch.Tensor, eps: float = 1e-4, pooling: str = "global"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pull, push, decorr)`` of a block's output ``h`` ``(2B, C, H, W)``, both views stacked
    ``[view 1; view 2]`` (unweighted; see the module docstring)."""
    with torch.autocast(h.device.type, enabled=False):  # statistics in at least float32
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        if pooling == "global":
            h = h.mean(dim=(2, 3))
        a, b = h.chunk(2, 0)
        pull = F.mse_loss(a, b)
        push = 0.5 * (_hebbian(a, eps) + _hebbian(b, eps))
        if pooling == "none":
            a, b = _stack_positions(a), _stack_positions(b)
        decorr = 0.5 * (_decorrelation(a) + _decorrelation(b))
    return pull, push, decorr


class LPL(StepsBlockByBlock, Rule):
    """Implements LPL (latent predictive learning; Nat. Neurosci. 26:1906, 2023): every block
    from its own predictive, Hebbian and decorrelation terms. Options: :class:`LPLOptions`;
    ``docs/local-rules.md``.

    Args:
        pull, push, decorr: weights of the predictive, Hebbian and decorrelation terms.
        eps: added to the variances in the Hebbian term.
        pooling: ``global`` or ``none``.
    """

    name = "lpl"
    uses_labels = False
    view_kind = VIEW_KIND
    Options = LPLOptions

    @classmethod
    def from_config(cls, cfg: Any, options: LPLOptions, seed: int, **task_info: Any) -> LPL:
        o = options
        return cls(o.pull, o.push, o.decorr, o.eps, o.pooling)

    def __init__(
        self,
        pull: float = 1.0,
        push: float = 1.0,
        decorr: float = 10.0,
        eps: float = 1e-4,
        pooling: str = "global",
    ) -> None:
        super().__init__()
        LPLOptions(pull, push, decorr, eps, pooling).validate()  # type: ignore[arg-type]
        self.weights = (float(pull), float(push), float(decorr))
        self.eps = float(eps)
        self.pooling = pooling

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        """Refuse a network whose blocks do not output maps ``(N, C, H, W)`` of at least two
        channels (the decorrelation term averages over pairs of channels)."""
        with torch.no_grad():
            feats = net.features(sample_input[:1])
        for level, h in enumerate(feats):
            if h.dim() != 4 or h.shape[1] < 2:
                raise ValueError(
                    f"rule.name=lpl needs blocks that output maps (N, C, H, W) with C >= 2; "
                    f"block {level + 1} outputs {tuple(h.shape[1:])}"
                )

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        """The encoder's parameters (the rule owns none)."""
        return net.encoder_parameters()

    def pipeline_refusal(self) -> str | None:
        return None

    def block_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted loss of a block's output ``z`` (views stacked) and its three terms."""
        pull, push, decorr = lpl_terms(z, self.eps, self.pooling)
        w_pull, w_push, w_decorr = self.weights
        loss = w_pull * pull + w_push * push + w_decorr * decorr
        return loss, torch.stack([pull, push, decorr]).detach()

    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        """Both views of the batch stacked ``[view 1; view 2]``; nothing is drawn at random."""
        if batch.views is None:
            raise ValueError("rule.name=lpl needs two views in the batch (view_kind 'ssl')")
        v1, v2 = batch.views
        if v1.shape[0] < 2:
            raise ValueError("rule.name=lpl needs batches of at least 2 images (its variances "
                             "and covariances divide by the batch size minus one)")
        return {"x": torch.cat([v1, v2], 0), "loss": 0.0,
                **{key: 0.0 for key in TERMS}}

    def blocks_grads(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        h = carry["x"]
        losses: list[torch.Tensor] = []
        terms: list[torch.Tensor] = []
        for level in range(start, stop):
            z = net.blocks[level](h)
            loss, parts = self.block_loss(z)
            loss.backward()  # frees this block's graph before the next block runs
            losses.append(loss.detach())
            terms.append(parts)
            h = z.detach()
        values = torch.cat([torch.stack(losses)[:, None], torch.stack(terms)], 1)
        rows = values.cpu().double().tolist()  # one wait for the device
        metrics: dict[str, float] = {}
        totals = {key: float(carry[key]) for key in ("loss", *TERMS)}
        for i, row in enumerate(rows):
            block = start + i + 1
            for key, value in zip(("loss", *TERMS), row):
                metrics[f"{key}_block{block}"] = value
                totals[key] += value
        metrics.update(totals)
        return metrics, {"x": h, **totals}

    @torch.no_grad()
    def frozen_carry(
        self, net: BlockNet, carry: dict[str, Any], start: int, stop: int
    ) -> dict[str, Any]:
        """Block ``stop``'s input, by a forward pass of blocks ``start..stop-1`` without
        gradients (they do not learn, and add nothing to the losses)."""
        h = carry["x"]
        for level in range(start, stop):
            h = net.blocks[level](h)
        return {**carry, "x": h}


    def reference_rule(self) -> Rule:
        """BP-SSL counterpart: the top block's LPL loss backpropagated through every block."""
        return TopLPLBackprop(self)


class TopLPLBackprop(TopLossReference):
    """The top block's loss of :class:`LPL`, backpropagated through every block."""

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        local = self.local[0]
        x = local.start_carry(net, batch)["x"]
        loss, _ = local.block_loss(net.encode(x))
        loss.backward()
        return {"loss": float(loss.detach())}
