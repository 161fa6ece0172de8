"""Direct feedback rules ("type 1"): the output error reaches every block through a fixed matrix.

Block ``l`` receives ``delta_l = (B_l s) * relu'(a_l)`` with a fixed random ``B_l`` and

- ``dfa``: ``s = e``, the error of the batch-mean cross-entropy, ``softmax(y) - onehot``;
- ``drtp``: ``s = -onehot``, the target alone (the input-independent part of ``e``);
- ``sign-dfa``: ``s = sign(e)``.

Its weights get ``dW_l = delta_l h_{l-1}^T`` summed over positions: a three-factor rule
(neuromodulator ``s`` x dendritic feedback ``B_l`` x Hebbian ``relu'(a_l) h_{l-1}``). The
feedback is gated only by the block's own derivative, never by the blocks above. The read-out
learns from the error directly (its true gradient). With ``parallel.feedback_delay`` the signal
reaches the blocks late (:mod:`locallearn.delay`); the read-out, at the top, learns at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from locallearn.nets.base import BlockNet
from locallearn.rules.backprop import SupervisedRule
from locallearn.rules.base import Batch, ce_error, relu_grad

FEEDBACK_KINDS = ("dfa", "drtp", "sign-dfa")


class DirectFeedback(SupervisedRule):
    """DFA and its relatives; ``kind`` in :data:`FEEDBACK_KINDS`."""

    name = "dfa"

    def __init__(self, kind: str = "dfa", seed: int = 0):
        super().__init__()
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"rule kind {kind!r} is unknown; valid: {', '.join(FEEDBACK_KINDS)}")
        self.kind = kind
        self.seed = seed
        self.name = kind  # type: ignore[misc]
        self.n_blocks = 0

    @classmethod
    def from_config(cls, cfg, options, seed: int, **task_info) -> DirectFeedback:
        return cls(cfg.name, seed)

    def setup(self, net: BlockNet, sample_input: torch.Tensor) -> None:
        if net.readout is None:
            raise ValueError(f"rule {self.kind} needs a network with a read-out")
        gen = torch.Generator().manual_seed(self.seed + 7919)
        with torch.no_grad():
            feats = net.features(sample_input[:1])
            n_out = net(sample_input[:1]).shape[1]
        self.n_blocks = len(feats)
        self.readout_params = list(net.readout.parameters())  # a plain list: not a submodule
        for level, h in enumerate(feats):
            shape = tuple(h.shape[1:])
            b = torch.randn(*shape, n_out, generator=gen) / math.sqrt(n_out)
            self.register_buffer(f"B{level}", b.to(sample_input.device))

    def pipeline_refusal(self) -> str | None:
        if self.late_feedback:
            return None
        return (f"rule {self.kind} sends the output error of the top block to every block (a "
                "signal from above; parallel.feedback_delay >= 1 lets it arrive late)")

    def delay_refusal(self) -> str | None:
        return None

    # ------------------------------------------------------------------ block by block (late)
    def start_carry(self, net: BlockNet, batch: Batch) -> dict[str, Any]:
        return {"h": batch.x, "y": batch.y, "loss": 0.0}

    def frozen_carry(self, net: BlockNet, carry: dict[str, Any], start: int,
                     stop: int) -> dict[str, Any]:
        h = carry["h"]
        with torch.no_grad():
            for level in range(start, stop):
                h = net.blocks[level](h)
        return {**carry, "h": h}

    def feedback_signal(self, net: BlockNet, carry: dict[str, Any]) -> tuple[Any, dict]:
        """The signal ``s`` of the batch; the read-out's own gradient is filled at once."""
        logits = net.readout(carry["h"].flatten(1))
        loss = F.cross_entropy(logits, carry["y"])
        loss.backward()
        acc = (logits.argmax(1) == carry["y"]).float().mean()
        sig = self.modulator(logits.detach(), carry["y"])
        return sig, {"loss": float(loss.detach()), "accuracy": float(acc)}

    def blocks_grads(self, net: BlockNet, carry: dict[str, Any], start: int,
                     stop: int) -> tuple[dict[str, float], dict[str, Any]]:
        h, sig = carry["h"], carry["feedback"]
        for level in range(start, stop):
            block = net.blocks[level]
            a = block.pre(h.detach())
            self.feed_back(level, a, sig)
            h = block.post(a.detach())
        return {}, {**carry, "h": h.detach()}  # no loss of the blocks: the read-out's is

    def block_parameters(self, level: int) -> list[torch.nn.Parameter]:
        """The read-out belongs to the top block (its stage trains it)."""
        return list(self.readout_params) if level == self.n_blocks - 1 else []

    def feedback(self, level: int) -> torch.Tensor:
        """The fixed matrix ``B_l``, shaped ``(*block_output_shape, n_out)``."""
        return getattr(self, f"B{level}")

    def modulator(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The signal ``s`` sent to every block, ``(N, n_out)``."""
        e = ce_error(logits, y)
        if self.kind == "dfa":
            return e
        if self.kind == "sign-dfa":
            return torch.sign(e) / logits.shape[0]
        return -F.one_hot(y, logits.shape[1]).to(logits.dtype) / logits.shape[0]

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        pres = []
        h = batch.x
        for block in net.blocks:
            a = block.pre(h.detach())
            pres.append(a)
            h = block.post(a.detach())
        # the read-out's own gradient; nothing flows below it
        sig, metrics = self.feedback_signal(net, {"h": h.detach(), "y": batch.y})
        for level, a in enumerate(pres):
            self.feed_back(level, a, sig)
        return metrics

    def feed_back(self, level: int, a: torch.Tensor, sig: torch.Tensor) -> None:
        """Fill block ``level``'s gradients from its pre-activation ``a`` and the signal."""
        delta = torch.einsum("...o,no->n...", self.feedback(level), sig) * relu_grad(a)
        a.backward(delta.detach())
