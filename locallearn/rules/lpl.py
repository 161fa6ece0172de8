"""``lpl``: latent predictive learning (Nat. Neurosci. 26:1906, 2023), layer by layer.

Every block learns from its own output on the two views of a batch, with its input detached (no
signal crosses blocks). With ``z`` the block's output average-pooled globally, ``B x C`` per view
(``rule.options.pooling=global``, the default; the block's output is the map after its max-pool,
see :func:`locallearn.nets.vgg.vgg11`), the block's loss is::

    L = pull * mse(z1, z2) + push * (H(z1) + H(z2)) / 2 + decorr * (D(z1) + D(z2)) / 2

    H(z) = -mean_c log(Var_b(z_c) + eps)                  Var_b = sum_b (z_bc - m_c)^2 / (B - 1)
    D(z) = sum_{j != k} Cov_jk^2 / (C^2 - C)              Cov = (z - m)^T (z - m) / (B - 1)

with ``m`` the batch mean of ``z`` (detached), ``mse`` the mean of the squared difference over
the ``B x C`` values, weights ``pull = 1``, ``push = 1``, ``decorr = 10`` and ``eps = 1e-4``
(``rule.options``). The run's loss is the sum of the blocks' losses; each block's loss is
backpropagated as soon as it is computed (its graph freed before the next block runs), which gives
the gradients of the reference's one backward of the sum, since the blocks' inputs are detached.
The blocks can train on separate processes (``parallel.stages``, the same arithmetic). Under data
parallelism each rank's part of the batch gives its own Hebbian and decorrelation statistics (as
VICReg's under this project's convention, and as the reference's multi-GPU runs take each GPU's
batch on its own): ``N`` ranks equal one process taking the parts one after the other.

Facts of the reference code (its public repository at commit 0210f55; ``module.py`` is
``models/module.py``, ``encoders.py`` is ``models/encoders.py``), kept here:

- What the loss reads (``encoders.py`` L28-53, L72-73, L105-117): a block is convolution, ReLU
  and, after layers 1, 2, 4, 6 and 8, a 2x2 max-pool; ``z`` is the adaptive average pool to 1x1 of
  that block's output, so of the map *after* the max-pool (at 32 px the last map is 1x1). The
  projector is the identity unless ``--use_projector_mlp`` (default off: ``module.py`` L39,
  ``encoders.py`` L97-103). The block output is detached before the next block (L117).
- The predictive term is ``F.mse_loss(z1, z2)`` (``module.py`` L72, L126-133) with no
  stop-gradient: both views receive its gradient, each pulled towards the other (the paper's
  learning rule, in the erratum's form at ``erratum/erratum.md`` L28, moves only the present
  output towards the earlier one).
- The Hebbian term (``module.py`` L93-101): the batch mean is detached and the sum of squares is
  divided by ``B - 1``; it is applied as the average over the two views (L142-147). Detaching the
  mean changes no gradient in exact arithmetic (the centred values sum to zero over the batch).
- The decorrelation term (``module.py`` L103-108): the centred covariance (mean detached) with
  its diagonal set to zero, divided by ``B - 1``, squared and summed, divided by ``C^2 - C``;
  averaged over the two views (L160-165). The repository's erratum (``erratum/erratum.md``
  L11-36) corrects the published formula, which summed squared products sample by sample, to
  this expression of the code.
- The total (``module.py`` L190-192) is ``pull_coeff * sum_l pull_l + push_coeff * sum_l push_l
  + decorr_coeff * sum_l decorr_l`` with defaults 1, 1, 10 (L50-52, and the command-line defaults
  L261-263), one backward.
- The per-layer terms are written into ``torch.zeros(n_layers)`` (L118-120), a tensor of the
  default dtype: a float64 run of that code keeps float64 only with the default dtype set to
  float64 (otherwise each term is rounded to float32 before the sum).
- ``torch.randperm`` is drawn at every step (L122) even when ``--shuffle_positives`` (an
  ablation that pairs each image with another image's view, L130-131) is off; the option
  ``--stale_estimates`` (L79-83, L100, L135-158) replaces the batch statistics of the Hebbian
  term by the previous batch's. Neither is part of this rule.
- ``--no_pooling`` (``module.py`` L15-18, L127-128, L143-144, L161-163), here
  ``rule.options.pooling=none``: the predictive term is the mse of the whole maps; the Hebbian
  term is that of the 4-D map, one variance over the batch per (channel, position), averaged over
  channels and positions; only the decorrelation term stacks the positions as samples
  (``B * H * W`` rows of ``C`` channels, divisor ``B * H * W - 1``).

Its update is a three-factor rule: for a unit ``c`` of block ``l`` and sample ``b`` of view ``v``
the factor is ``dL/dz_bc = pull * 2 (z_bc - z'_bc) / (B C)`` (``z'``: the same image's other
view) ``- push * (z_bc - m_c) / ((B - 1) (Var_c + eps) C)`` (away from the batch mean, scaled by the
inverse variance) ``+ decorr * 2 sum_{k != c} Cov_ck (z_bk - m_k) / ((B - 1) (C^2 - C))``, spread
evenly over the block's output positions, routed through the max-pool and gated by the ReLU's
derivative, times the block's input patch (the Hebbian term of the weight's gradient).
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
    """Latent predictive learning, every block from its own loss (see the module docstring).

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
