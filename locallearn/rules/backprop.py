"""Supervised backpropagation, and the control without masking.

``Backprop``: cross-entropy on the read-out, one backward through every block.

``BackpropNoMask``: the same error, sent down through the blocks above with each ReLU gate
replaced by its average over the batch, so the feedback that block ``l`` receives no longer
depends on the input beyond block ``l``'s own gate. With ``D_k = diag(relu'(a_k))`` and
``Dbar_k`` its batch mean, block ``l`` gets

    delta_l = D_l W_{l+1}^T Dbar_{l+1} ... W_L^T Dbar_L W_out^T e

instead of backprop's ``D_l W_{l+1}^T D_{l+1} ... D_L W_out^T e``: the "masking" by the gates of
the layers above (*Self-supervised local learning rules learn the hidden hierarchical structure of
high-dimensional data*, arXiv 2605.18557) is removed, the rest of the path kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule, relu_grad


class SupervisedRule(Rule):
    """A rule driven by the labels through a read-out; its reference is :class:`Backprop`."""

    def reference_rule(self) -> Rule:
        return Backprop()


class Backprop(SupervisedRule):
    """End-to-end backpropagation of the cross-entropy of the read-out."""

    name = "backprop"

    def reference_rule(self) -> Rule:
        return self

    def pipeline_refusal(self) -> str | None:
        return (f"rule {self.name} sends the error backward through every block (a signal from "
                "above)")

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        logits = net(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        loss.backward()
        acc = (logits.argmax(1) == batch.y).float().mean()
        return {"loss": float(loss.detach()), "accuracy": float(acc)}


class BackpropNoMask(SupervisedRule):
    """Backprop whose error passes the blocks above with batch-averaged ReLU gates."""

    name = "backprop-nomask"

    def pipeline_refusal(self) -> str | None:
        return (f"rule {self.name} sends the error backward through every block (a signal from "
                "above)")

    def compute_grads(self, net: BlockNet, batch: Batch) -> dict[str, float]:
        inputs, pres = [], []
        h = batch.x
        for block in net.blocks:
            h_in = h.detach().requires_grad_(True)
            a = block.pre(h_in)
            inputs.append(h_in)
            pres.append(a)
            h = block.post(a.detach())
        top = h.detach().requires_grad_(True)
        logits = net.readout(top.flatten(1))
        loss = F.cross_entropy(logits, batch.y)
        # read-out: true gradient; signal reaching the top block's output
        (signal,) = torch.autograd.grad(loss, top, retain_graph=True)
        loss.backward()
        for level in range(len(net.blocks) - 1, -1, -1):
            a = pres[level]
            # own gate for the block's update (a local, input-specific factor)
            a.backward(relu_grad(a) * signal, retain_graph=level > 0)
            if level > 0:
                gate_mean = relu_grad(a).mean(0, keepdim=True)
                (signal,) = torch.autograd.grad(a, inputs[level], gate_mean * signal)
        acc = (logits.argmax(1) == batch.y).float().mean()
        return {"loss": float(loss.detach()), "accuracy": float(acc)}
