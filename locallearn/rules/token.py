"""Token-level self-supervision trained by backprop: predict hidden input tokens.

The baseline of the token side of *Learn from your own latents and not from tokens* (arXiv
2605.27734): the network never sees a label; it is trained end to end to predict masked tokens of
its one-hot input, then read out linearly like the label-free layer-wise rules.

- ``task: last``: the last token is hidden, a head on the flattened top block predicts it
  (``v`` outputs).
- ``task: random``: every position is hidden with probability ``p``; the head predicts the token
  of every position (``v x positions`` outputs), the loss counts the hidden ones only.

Hidden positions get the constant ``v**-0.5`` in every channel, as :meth:`RHM.one_hot` masks;
the targets are read off the input itself (its channel argmax), so the rule needs nothing from
the generator. The head belongs to the rule; the class read-out is not trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, check_range


@dataclass
class TokenOptions:
    """Options of ``rule.name=token-prediction`` (``rule.options.*``).

    Attributes:
        task: ``last`` (hide the last token) or ``random`` (hide each with probability ``p``).
        p: masking probability of ``task: random``.
    """

    task: Literal["last", "random"] = "last"
    p: float = 0.15

    def validate(self) -> None:
        check_range("rule.options.p", self.p, 0, 1, low_open=True, high_open=True)


def hide_tokens(
    x: torch.Tensor, task: str, p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masked input, mask (N, T), token targets (N, T))`` of one-hot input ``x`` (N, v, T)."""
    n, v, t = x.shape
    tokens = x.argmax(1)
    if task == "last":
        mask = torch.zeros(n, t, dtype=torch.bool, device=x.device)
        mask[:, -1] = True
    else:
        if generator is None:
            raise ValueError("random token masking needs the run's generator in the batch")
        r = torch.rand((n, t), generator=generator, device=generator.device).to(x.device)
        mask = r < p
    return x.masked_fill(mask.unsqueeze(1), v**-0.5), mask, tokens


class TokenPrediction(Rule):
    """Masked-token prediction backpropagated through every block (module docstring)."""

    name = "token-prediction"
    uses_labels = False
    view_kind = None
    Options: ClassVar[type] = TokenOptions

    @classmethod
    def from_config(cls, cfg: Any, options: Any, seed: int, **task_info: Any) -> TokenPrediction:
        """The rule of config section ``cfg`` with its typed ``options``."""
        return cls(options, seed=seed)

    def __init__(self, options: TokenOptions | None = None, seed: int = 0):
        super().__init__()
        self.options = options or TokenOptions()
        self.options.validate()
        self.seed = seed
        self.head: nn.Linear | None = None

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        with torch.no_grad():
            d = net.encode(sample_input[:1]).flatten(1).shape[1]
        v, t = sample_input.shape[1], sample_input.shape[2]
        out = v if self.options.task == "last" else v * t
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = nn.Linear(d, out).to(sample_input.device)

    def trained_parameters(self, net: BlockNet) -> list[nn.Parameter]:
        return net.encoder_parameters() + list(self.parameters())

    def reference_rule(self) -> Rule:
        """End-to-end backprop already: its own reference."""
        return self

    def loss(self, net: BlockNet, batch: Batch) -> torch.Tensor:
        if self.head is None:
            raise ValueError("token-prediction: setup() must run before training")
        o = self.options
        x, mask, tokens = hide_tokens(batch.x, o.task, o.p, batch.generator)
        logits = self.head(net.encode(x).flatten(1))
        if o.task == "last":
            return F.cross_entropy(logits, tokens[:, -1])
        n, v, t = x.shape
        logits = logits.reshape(n, v, t)
        target = torch.where(mask, tokens, torch.full_like(tokens, -100))
        if not bool(mask.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, ignore_index=-100)

    def pipeline_refusal(self) -> str | None:
        return (f"rule {self.name} backpropagates its token loss through every block (a signal "
                "from above)")

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        loss = self.loss(net, batch)
        loss.backward()
        return {"loss": float(loss.detach())}
