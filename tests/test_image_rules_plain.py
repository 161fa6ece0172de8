"""The image rules' updates against autograd of their loss written out plainly in this file.

Nothing here uses the library's pooling, negative indexing, pair bookkeeping, score functions or
explicit gradient forms: the loss of the paper (arXiv 2601.21683) is written with ``torch`` only,
differentiated by autograd, and compared with the ``.grad`` the rules fill (the encoder by
autograd of their own graph, ``B`` by their gathered outer-product form).

The loss of a block with pooled outputs ``p1, p2`` of the two views, context ``c1, c2`` (detached)
and prediction matrix ``B``: the rows ``P = [p1; p2]`` and ``C = [c1; c2]`` of both views; every row
``r`` is predicted from the other view's context ``C[r + n]`` and contrasted with the next row
``P[r + 1]`` (indices mod ``2n``: the paper code's pairing, where the last image of each view meets
the other view of image 0), ``f(s P_r^T B C_{r+n}) + f(-s P_{r+1}^T B C_{r+n})`` (for
``softplus-diff``: ``softplus(s P_{r+1}^T B C_{r+n} - s P_r^T B C_{r+n})``), summed and divided by
:func:`normaliser` (the mean over the ``2n`` rows, as in that code).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locallearn.nets.vgg import vgg6
from locallearn.rules.base import Batch
from locallearn.rules.image_bp import BPSSL
from locallearn.rules.image_local import FFRule, LocalImageRule

N = 4
#: the paper's grid (cells per side of each block's pooled map) gives these pool sizes at 32 px
AUTO_POOLS_32PX = [4, 4, 4, 2, 2, 1]
#: explicit pool sizes for 16 px inputs (map sides 16, 8, 8, 4, 2, 1)
LIST_POOLS_16PX = [2, 4, 1, 2, 1, 1]


def normaliser(n: int) -> float:
    """What the summed scores of a batch of ``n`` images are divided by (both views' rows)."""
    return float(2 * n)


def f_plain(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return torch.clamp(1.0 - x, min=0.0)
    if kind == "softplus":
        return torch.log1p(torch.exp(1.0 - x))
    if kind == "linear":
        return -x
    raise AssertionError(kind)


def pool_plain(z: torch.Tensor, k: int) -> torch.Tensor:
    """Average over ``k x k`` windows, flattened (grid row, grid column, channel)."""
    n, c, h, w = z.shape
    cells = z.reshape(n, c, h // k, k, w // k, k).mean((3, 5))
    return cells.permute(0, 2, 3, 1).reshape(n, -1)


def pair_loss_plain(p1, p2, c1, c2, B, kind: str, norm: str, n: int) -> torch.Tensor:
    total = p1.new_zeros(())
    p, c = torch.cat([p1, p2]), torch.cat([c1, c2])
    s = 1.0 / math.sqrt(p.shape[1] * c.shape[1]) if norm == "dims" else 1.0
    for r in range(2 * n):
        j = (r + 1) % (2 * n)  # the next row of [view 1; view 2] is the negative
        ctx = c[(r + n) % (2 * n)]  # the other view of the same image
        pred = ctx if B is None else B @ ctx
        u_pos = s * torch.dot(p[r], pred)
        u_neg = s * torch.dot(p[j], pred)
        if kind == "softplus-diff":
            total = total + torch.log1p(torch.exp(u_neg - u_pos))
        else:
            total = total + f_plain(u_pos, kind) + f_plain(-u_neg, kind)
    return total / normaliser(n)


def layerwise_loss_plain(net, v1, v2, pools, B_same, B_top, kind, norm):
    with torch.no_grad():
        t1, t2 = pool_plain(net.encode(v1), pools[-1]), pool_plain(net.encode(v2), pools[-1])
    total = v1.new_zeros(())
    h1, h2 = v1, v2
    for level, block in enumerate(net.blocks):
        z1, z2 = block(h1), block(h2)
        p1, p2 = pool_plain(z1, pools[level]), pool_plain(z2, pools[level])
        if B_same is not None:
            B = B_same[level] if B_same else None  # [] means the identity (ff)
            total = total + pair_loss_plain(
                p1, p2, p1.detach(), p2.detach(), B, kind, norm, v1.shape[0]
            )
        if B_top is not None:
            total = total + pair_loss_plain(p1, p2, t1, t2, B_top[level], kind, norm, v1.shape[0])
        h1, h2 = z1.detach(), z2.detach()  # block inputs are detached
    return total


def _views(side: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v1 = torch.rand(N, 3, side, side, generator=g, dtype=torch.float64)
    v2 = (v1 + 0.3 * torch.rand(N, 3, side, side, generator=g, dtype=torch.float64)).clamp(0, 1)
    return v1, v2


def _random_b(rule, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():  # B starts at zero; scores of order one keep the hinge active
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 3.0 / p.shape[-1])


def _rule_grads(rule, net, v1, v2) -> list[torch.Tensor]:
    params = list(net.parameters()) + list(rule.parameters())
    for p in params:
        p.grad = None
    rule.compute_grads(net, Batch(v1, None, (v1, v2), torch.Generator().manual_seed(0)))
    return [p.grad for p in params]


def _compare(got: list[torch.Tensor], want: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"parameter {k} got no gradient"
        scale = float(b.abs().max())
        if b.dim() > 1:  # a weight matrix or B; a bias may vanish (terms cancel)
            assert scale > 0, f"parameter {k}: the plain gradient is zero"
        err = float((a - b).abs().max())
        assert err <= 1e-9 * scale + 1e-15, f"parameter {k}: error {err:.2e} of {scale:.2e}"


def _pools(spec, side: int) -> list[int]:
    return {"auto": AUTO_POOLS_32PX, "global": None, "list": LIST_POOLS_16PX}[spec]


@pytest.mark.parametrize(
    "context, pool, f, norm, parts",
    [
        ("same", "auto", "hinge", "none", 1),
        ("top", "auto", "hinge", "none", 1),
        ("both", "auto", "hinge", "none", 1),
        ("same", "global", "softplus", "none", 1),
        ("top", "global", "linear", "dims", 1),
        ("both", "global", "hinge", "none", 2),
        ("same", "list", "softplus-diff", "none", 1),
        ("top", "list", "hinge", "dims", 2),
        ("both", "list", "softplus", "none", 1),
    ],
)
def test_clapp_image_update_is_the_gradient_of_the_plain_loss(context, pool, f, norm, parts):
    side = 32 if pool == "auto" else 16
    net = vgg6(1 / 32, seed=1).to(torch.float64)
    v1, v2 = _views(side)
    spec = LIST_POOLS_16PX if pool == "list" else pool
    rule = LocalImageRule(context, spec, f, "next", score_norm=norm, micro_batches=parts)
    rule.setup(net, v1)
    rule.to(torch.float64)
    _random_b(rule)
    pools = _pools(pool, side) or [h.shape[-1] for h in net.features(v1[:1])]
    assert rule.pools == pools  # the documented pooling, not only a self-consistent one
    got = _rule_grads(rule, net, v1, v2)

    B_same = list(rule.B_same) if context in ("same", "both") else None
    B_top = list(rule.B_top) if context in ("top", "both") else None
    loss = layerwise_loss_plain(net, v1, v2, pools, B_same, B_top, f, norm)
    _compare(got, torch.autograd.grad(loss, list(net.parameters()) + list(rule.parameters())))


def test_ff_update_is_the_gradient_of_the_plain_loss_with_identity_b():
    net = vgg6(1 / 32, seed=2).to(torch.float64)
    v1, v2 = _views(16, seed=3)
    rule = FFRule(LIST_POOLS_16PX, "softplus", "next")
    rule.setup(net, v1)
    got = _rule_grads(rule, net, v1, v2)
    loss = layerwise_loss_plain(net, v1, v2, LIST_POOLS_16PX, [], None, "softplus", "none")
    _compare(got, torch.autograd.grad(loss, list(net.parameters())))


@pytest.mark.parametrize("parts", [1, 3])
def test_bp_clapp_update_is_the_gradient_of_the_plain_top_loss(parts):
    net = vgg6(1 / 32, seed=4).to(torch.float64)
    v1, v2 = _views(16, seed=5)
    rule = BPSSL("clapp", LIST_POOLS_16PX, "hinge", "next", micro_batches=parts)
    rule.setup(net, v1)
    rule.to(torch.float64)
    _random_b(rule)
    got = _rule_grads(rule, net, v1, v2)
    k = LIST_POOLS_16PX[-1]
    p1, p2 = pool_plain(net.encode(v1), k), pool_plain(net.encode(v2), k)
    loss = pair_loss_plain(p1, p2, p1.detach(), p2.detach(), rule.B[0], "hinge", "none", N)
    _compare(got, torch.autograd.grad(loss, list(net.parameters()) + [rule.B[0]]))


def test_bp_infonce_is_a_direct_log_softmax_of_cosines():
    net = vgg6(1 / 32, seed=6).to(torch.float64)
    v1, v2 = _views(16, seed=7)
    rule = BPSSL("infonce", "auto", temperature=0.2, seed=3)
    rule.setup(net, v1)
    rule.to(torch.float64)
    got = _rule_grads(rule, net, v1, v2)
    params = list(net.parameters()) + list(rule.parameters())
    e1 = rule.projection(net.encode(v1).mean((2, 3)))
    e2 = rule.projection(net.encode(v2).mean((2, 3)))
    loss = e1.new_zeros(())
    for a, b in ((e1, e2), (e2, e1)):
        for i in range(N):  # -log softmax of the positive among all cosines of row i
            cos = torch.stack([F.cosine_similarity(a[i], b[j], dim=0) for j in range(N)]) / 0.2
            loss = loss - (cos[i] - torch.logsumexp(cos, 0))
    _compare(got, torch.autograd.grad(loss / (2 * N), params))
