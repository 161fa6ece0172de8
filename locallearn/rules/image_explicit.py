"""The explicit three-factor form of the image rules' updates, without autograd.

For tests (each rule's autograd update against its formula) and alignment measures; the formula
is written out in the docstring of :mod:`locallearn.rules.image_ssl`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locallearn import losses
from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch
from locallearn.rules.image_bp import BPSSL
from locallearn.rules.image_grid import pool_flat, unflatten_grid, unpool
from locallearn.rules.image_ssl import ImageSSLRule

__all__ = ["explicit_grads"]


def _block_halves(block: nn.Module) -> tuple[nn.Conv2d, int]:
    """The convolution of a VGG block and its max-pool size (1: none)."""
    conv = getattr(block, "pre", None)
    post = getattr(block, "post", None)
    if not isinstance(conv, nn.Conv2d) or post is None:
        raise ValueError(
            "the explicit form needs VGG blocks (pre: Conv2d, post: ReLU [+ max-pool])"
        )
    pool = 1
    for m in post.modules():
        if isinstance(m, nn.MaxPool2d):
            pool = int(m.kernel_size) if isinstance(m.kernel_size, int) else int(m.kernel_size[0])
    return conv, pool


def _hebbian(
    conv: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_n,pos delta[o, pos] * patch(x)[i, pos]`` for the weight, ``sum delta`` for the bias."""
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    dw = torch.einsum("nol,nkl->ok", delta.flatten(2), patches).reshape(conv.weight.shape)
    db = delta.sum((0, 2, 3)) if conv.bias is not None else None
    return dw, db


def _modulated_prediction(
    rule: ImageSSLRule,
    p: torch.Tensor,
    c: torch.Tensor,
    B: torch.Tensor | None,
    neg: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dp`` (neuromodulator times dendritic prediction, per row) and ``dL/dB``.

    ``p``: the pooled outputs of the ``2N`` anchors; ``c``: the context of each anchor;
    ``neg``: the negative row of each anchor. The loss is the mean over the ``2N`` anchors.
    """
    rows = p.shape[0]
    s = rule.scale(p.shape[1], c.shape[1])
    pred = c if B is None else c @ B.t()
    u_pos = (p * pred).sum(1) * s
    u_neg = (p[neg] * pred).sum(1) * s
    g_pos, g_neg = losses.score_loss_grads(u_pos, u_neg, rule.f)
    dp = g_pos[:, None] * pred
    dp = dp.index_add(0, neg, g_neg[:, None] * pred) * (s / rows)
    dB = None
    if B is not None:
        post = g_pos[:, None] * p + g_neg[:, None] * p[neg]
        dB = post.t() @ c * (s / rows)
    return dp, dB


@torch.no_grad()
def explicit_grads(rule: ImageSSLRule, net: BlockNet, batch: Batch) -> dict[str, torch.Tensor]:
    """The three-factor updates, without autograd, keyed like ``named_parameters``.

    Keys: ``net.blocks.<l>.pre.weight`` / ``.bias`` for the encoder and ``rule.B_same.<l>``,
    ``rule.B_top.<l>`` (``clapp-image``) or ``rule.B.0`` (``bp-ssl`` with ``loss=clapp``) for the
    prediction matrices. For ``bp-ssl`` only the top block (whose update is local) is given.
    Negatives are drawn as :meth:`compute_grads` draws them (same generator state gives the same).
    """
    x, n = ImageSSLRule.views(batch)
    neg = rule.negative_index(n, batch, x.device)
    if isinstance(rule, BPSSL):
        if rule.loss_kind != "clapp":
            raise ValueError("the explicit three-factor form is defined for rule.loss=clapp")
        feats = net.features(x)
        levels = [len(net.blocks) - 1]
        inputs = {levels[0]: feats[-2] if len(feats) > 1 else x}
    else:
        feats = net.features(x)
        levels = list(range(len(net.blocks)))
        inputs = {lv: (x if lv == 0 else feats[lv - 1]) for lv in levels}
    top = pool_flat(feats[-1], rule.pools[-1])
    out: dict[str, torch.Tensor] = {}
    for level in levels:
        conv, mp = _block_halves(net.blocks[level])
        h = inputs[level]
        a = conv(h)
        r = torch.relu(a)
        if mp > 1:
            z, idx = F.max_pool2d(r, mp, return_indices=True)
        else:
            z, idx = r, None
        pool = rule.pools[level]
        p = pool_flat(z, pool)
        other = torch.roll(torch.arange(2 * n, device=p.device), n)  # each row's other view
        dp = torch.zeros_like(p)
        terms: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        if isinstance(rule, BPSSL):
            terms.append(("rule.B.0", p[other], rule.B[0]))
        else:
            if rule.uses_same:
                B = None if rule.identity_b else rule.B_same[level]
                terms.append((f"rule.B_same.{level}", p[other], B))
            if rule.uses_top:
                terms.append((f"rule.B_top.{level}", top[other], rule.B_top[level]))
        for key, contexts, B in terms:
            d, dB = _modulated_prediction(rule, p, contexts, B, neg)
            dp += d
            if B is not None:
                out[key] = dB
        # dendritic prediction pooled back onto the map, routed through the max-pool, gated
        dz = unpool(unflatten_grid(dp, z.shape[1], z.shape[2] // pool), pool)
        dr = F.max_unpool2d(dz, idx, mp, output_size=r.shape[-2:]) if idx is not None else dz
        delta = dr * (a > 0).to(a.dtype)
        dw, db = _hebbian(conv, h, delta)
        out[f"net.blocks.{level}.pre.weight"] = dw
        if db is not None:
            out[f"net.blocks.{level}.pre.bias"] = db
    return out
