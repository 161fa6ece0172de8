"""``bp-ssl``: end-to-end backpropagation of a self-supervised loss on the top block of an image
encoder (BP-CLAPP++, BP-InfoNCE); see :mod:`locallearn.rules.image_ssl` for the loss."""

from __future__ import annotations

import torch
from torch import nn

from locallearn import losses
from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, check_range
from locallearn.rules.image_options import BPOptions, check_choice
from locallearn.rules.image_ssl import ImageSSLRule
from locallearn.rules.ssl_pairs import PairTerms, PredictionGrads

__all__ = ["BPSSL"]


class BPSSL(ImageSSLRule):
    """Implements BP-CLAPP++ and BP-InfoNCE (arXiv 2601.21683): end-to-end backprop of a
    self-supervised loss on the top block. Options:
    :class:`~locallearn.rules.image_options.BPOptions`; ``docs/image-rules.md``.

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
    Options = BPOptions

    @classmethod
    def from_config(cls, cfg, options: BPOptions, seed: int, **task_info) -> BPSSL:
        o = options
        return cls(o.loss, o.pool, o.f, o.negative_image, o.score_norm, o.temperature,
                   o.projection_dim, seed, o.micro_batches, pairing=o.negative_view)

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
        pairing: str | None = None,
    ) -> None:
        super().__init__(pool, f, negatives, score_norm, micro_batches, pairing)
        self.seed = seed
        check_choice("rule.options.loss", loss, ("clapp", "infonce"))
        if micro_batches > 1 and loss != "clapp":
            raise ValueError(
                "rule.options.micro_batches > 1 needs rule.options.loss=clapp (InfoNCE's negatives "
                "are the batch's other images, inside the graph)"
            )
        check_range("rule.options.temperature", temperature, 0, low_open=True)
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

    def prediction_matrices(self) -> list[tuple[nn.Parameter, int, int]]:
        top = len(self.dims) - 1
        return [(B, top, top) for B in self.B]

    def pipeline_refusal(self) -> str | None:
        return (f"rule {self.name} backpropagates its top-block loss through every block (a "
                "signal from above)")

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

