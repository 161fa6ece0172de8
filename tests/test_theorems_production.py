"""The deep-linear-network theorem on the production rule, not on the theory module's copies.

A deep linear network built from the project's own blocks (1x1 convolutions on 1x1 maps, no
nonlinearity, no bias: an MLP) is trained by the project's own layer-wise rule
(``clapp-image``, context ``same``, no pooling, softplus ``f``) and compared with that rule's own
BP-SSL reference (its top-block loss backpropagated through every block). Theorem (arXiv
2601.21683, see docs and ``locallearn.theory``): with orthonormal weights and every ``B_l`` at the
optimum of its regularised local loss, the local update of every layer equals the BP-SSL
gradient element-wise. Non-orthogonal weights, a random ``B`` or ReLU break it. Also on the
production rule: a linear CNN is exact without pooling and not with global pooling; with shrinking
widths, context from the top block (direct feedback) is closer to BP than the same block's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locallearn.nets.base import Block, BlockNet
from locallearn.rules.base import Batch
from locallearn.rules.image_local import LocalImageRule
from locallearn.theory.optimal_b import fit_b

WIDTH, DEPTH, N = 12, 4, 48


def _matrix(kind: str, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        return a / WIDTH**0.5
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))


def _net(kind: str, post: type[nn.Module] = nn.Identity, seed: int = 0) -> BlockNet:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(DEPTH):
        conv = nn.Conv2d(WIDTH, WIDTH, kernel_size=1, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(_matrix(kind, g)[:, :, None, None])
        blocks.append(Block(conv, post()))
    return BlockNet(blocks)


def _views(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, WIDTH, generator=g, dtype=torch.float64)
    other = x + 0.5 * torch.randn(N, WIDTH, generator=g, dtype=torch.float64)
    return x[:, :, None, None], other[:, :, None, None]


def _rule(net: BlockNet, v1: torch.Tensor, v2: torch.Tensor, b: str) -> LocalImageRule:
    rule = LocalImageRule("same", [1] * DEPTH, "softplus", "next")
    rule.setup(net, v1)
    rule.to(torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        f1, f2 = net.features(v1), net.features(v2)
        for level, B in enumerate(rule.B_same):
            z, c = f1[level].flatten(1), f2[level].flatten(1)
            optimal = fit_b(z, c, reg=0.01, kind="softplus", method="newton")
            if b == "random" and level < DEPTH - 1:
                optimal = torch.randn(B.shape, generator=g, dtype=B.dtype) * optimal.norm() / WIDTH
            B.copy_(optimal)
    return rule


def _weight_grads(rule, net, v1, v2) -> list[torch.Tensor]:
    for p in list(net.parameters()) + list(rule.parameters()):
        p.grad = None
    rule.compute_grads(net, Batch(v1, None, (v1, v2), torch.Generator().manual_seed(0)))
    return [block.pre.weight.grad.clone() for block in net.blocks]


def _local_and_bp(kind: str, b: str = "optimal", post: type[nn.Module] = nn.Identity):
    net = _net(kind, post)
    v1, v2 = _views()
    rule = _rule(net, v1, v2, b)
    return _weight_grads(rule, net, v1, v2), _weight_grads(rule.reference_rule(), net, v1, v2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_orthonormal_weights_and_optimal_b_give_the_bp_update_exactly():
    local, bp = _local_and_bp("orthonormal")
    for level, (a, b) in enumerate(zip(local, bp)):
        assert float(b.abs().max()) > 1e-6, f"layer {level + 1}: BP gradient vanishes"
        assert _rel(a, b) < 1e-8, f"layer {level + 1}: relative error {_rel(a, b):.1e}"


@pytest.mark.parametrize(
    "kind, b, post",
    [("gaussian", "optimal", nn.Identity), ("orthonormal", "random", nn.Identity),
     ("orthonormal", "optimal", nn.ReLU)],
    ids=["non-orthogonal", "random-B", "relu"],
)
def test_a_broken_assumption_breaks_the_equality(kind, b, post):
    local, bp = _local_and_bp(kind, b, post)
    assert _rel(local[-1], bp[-1]) < 1e-8  # the top layer's local loss is the BP loss
    errors = [_rel(a, r) for a, r in zip(local[:-1], bp[:-1])]
    assert min(errors) > 0.2, f"relative errors below the top: {errors}"


# --- spatial dependence: a linear CNN of the project's blocks, pooled or not before the loss

CHANNELS, SIDE = 6, 16  # maps 8, 4, 2, 1 cells per side after the four 2x2 stride-2 layers


def _cnn(seed: int = 3) -> BlockNet:
    torch.manual_seed(seed)
    convs = [nn.Conv2d(3 if k == 0 else CHANNELS, CHANNELS, 2, stride=2, bias=False).double()
             for k in range(4)]
    return BlockNet([Block(conv, nn.Identity()) for conv in convs])


def _transfer(net: BlockNet, level: int, shape: torch.Size) -> torch.Tensor:
    """The blocks above ``level`` as a matrix on flattened maps, position-major (row, col, ch)."""
    def above(flat: torch.Tensor) -> torch.Tensor:
        h = flat.reshape(1, shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        for block in net.blocks[level + 1:]:
            h = block(h)
        return h.permute(0, 2, 3, 1).reshape(-1)

    return torch.autograd.functional.jacobian(above, torch.zeros(shape[1:].numel(),
                                                                 dtype=torch.float64))


@pytest.mark.parametrize("pool", ["none", "global"])
def test_linear_cnn_is_exact_without_pooling_and_not_with_global_pooling(pool):
    net = _cnn()
    g = torch.Generator().manual_seed(4)
    v1 = torch.randn(N, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    v2 = v1 + 0.5 * torch.randn(v1.shape, generator=g, dtype=torch.float64)
    rule = LocalImageRule("same", [1] * 4 if pool == "none" else "global", "softplus", "next")
    rule.setup(net, v1)
    assert rule.pools == ([1] * 4 if pool == "none" else [8, 4, 2, 1])  # maps 8, 4, 2, 1
    rule.to(torch.float64)
    with torch.no_grad():
        f1, f2 = net.features(v1), net.features(v2)
        top1, top2 = f1[-1].flatten(1), f2[-1].flatten(1)
        b_top = fit_b(top1, top2, reg=0.01, kind="softplus", method="newton")
        for level, B in enumerate(rule.B_same):
            if pool == "none":  # B_l = M_l^T B_L M_l: the top problem read through M_l
                m = _transfer(net, level, f1[level].shape)
                B.copy_(m.t() @ b_top @ m)
            else:  # the optimum of the globally pooled local loss
                z, c = f1[level].mean((2, 3)), f2[level].mean((2, 3))
                B.copy_(fit_b(z, c, reg=0.01, kind="softplus", method="newton"))
    local = _weight_grads(rule, net, v1, v2)
    bp = _weight_grads(rule.reference_rule(), net, v1, v2)
    errors = [_rel(a, b) for a, b in zip(local, bp)]
    assert errors[-1] < 1e-8  # the top map is 1x1: pooled or not, its loss is BP's
    if pool == "none":
        assert max(errors) < 1e-8, errors
    else:
        assert min(errors[:-1]) > 0.05, errors


# --- direct feedback: with shrinking widths the top block's context is closer to BP

SHRINKING = (32, 16, 8, 4)


def _shrinking_net(seed: int = 6) -> BlockNet:
    g = torch.Generator().manual_seed(seed)
    blocks, width = [], SHRINKING[0]
    for out in SHRINKING:
        q, _ = torch.linalg.qr(torch.randn(width, out, generator=g, dtype=torch.float64))
        conv = nn.Conv2d(width, out, kernel_size=1, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(q.t()[:, :, None, None])  # orthonormal rows: W W^T = I
        blocks.append(Block(conv, nn.Identity()))
        width = out
    return BlockNet(blocks)


def _cosines(context: str, net: BlockNet, v1: torch.Tensor, v2: torch.Tensor) -> list[float]:
    rule = LocalImageRule(context, [1] * len(SHRINKING), "softplus", "next")
    rule.setup(net, v1)
    rule.to(torch.float64)
    with torch.no_grad():
        f1, f2 = net.features(v1), net.features(v2)
        store = rule.B_same if context == "same" else rule.B_top
        for level, B in enumerate(store):
            c = f2[level] if context == "same" else f2[-1]
            B.copy_(fit_b(f1[level].flatten(1), c.flatten(1), reg=0.01, kind="softplus"))
    local = _weight_grads(rule, net, v1, v2)
    bp = _weight_grads(rule.reference_rule(), net, v1, v2)
    return [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))
            for a, b in zip(local, bp)]


def test_direct_feedback_is_closer_to_bp_than_same_block_context_when_widths_shrink():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1024, SHRINKING[0], generator=g, dtype=torch.float64)
    other = x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    v1, v2 = x[:, :, None, None], other[:, :, None, None]
    net = _shrinking_net()
    same, top = _cosines("same", net, v1, v2), _cosines("top", net, v1, v2)
    assert same[-1] == pytest.approx(1.0) and top[-1] == pytest.approx(1.0)
    assert all(t > s for t, s in zip(top[:-1], same[:-1])), (top, same)
