"""Tests of the VGG-6 encoder (locallearn.nets.vgg)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locallearn.nets.base import Block, BlockNet
from locallearn.nets.vgg import (
    PAPER_GRID,
    feature_sides,
    pool_sizes_for_grid,
    scaled_width,
    vgg6,
)


def test_blocks_follow_the_paper_plan():
    net = vgg6(1.0)
    assert net.readout is None
    assert len(net.blocks) == 6
    channels = [b.pre.out_channels for b in net.blocks]
    assert channels == [128, 256, 256, 512, 1024, 1024]
    pools = [any(isinstance(m, nn.MaxPool2d) for m in b.post.modules()) for b in net.blocks]
    assert pools == [False, True, False, True, True, True]
    for b in net.blocks:
        assert isinstance(b, Block)
        assert isinstance(b.pre, nn.Conv2d)
        assert b.pre.kernel_size == (3, 3) and b.pre.padding == (1, 1)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in b.modules())
        relus = [m for m in b.post.modules() if isinstance(m, nn.ReLU)]
        assert len(relus) == 1


def test_width_mult_and_feature_shapes():
    net = vgg6(0.125)
    feats = net.features(torch.zeros(2, 3, 32, 32))
    assert [tuple(h.shape[1:]) for h in feats] == [
        (16, 32, 32), (32, 16, 16), (32, 16, 16), (64, 8, 8), (128, 4, 4), (128, 2, 2)
    ]
    assert feature_sides(net, 32) == [32, 16, 16, 8, 4, 2]
    assert feature_sides(net, 96) == [96, 48, 48, 24, 12, 6]
    assert scaled_width(1024, 1 / 8) == 128 and scaled_width(3, 0.01) == 1
    # an odd side is floored by the max-pool, as PyTorch does; the paper's grid then refuses it
    assert feature_sides(net, 36) == [36, 18, 18, 9, 4, 2]
    with pytest.raises(ValueError, match="side 36 cannot be pooled onto a grid of 8"):
        pool_sizes_for_grid(feature_sides(net, 36), PAPER_GRID)
    with pytest.raises(ValueError, match="side 4 is too small for the 6 blocks"):
        feature_sides(net, 4)
    # any block that changes the size counts (here a strided convolution, no max-pool)
    strided = BlockNet([Block(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
                        Block(nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2))])
    assert feature_sides(strided, 32) == [16, 8]
    with pytest.raises(ValueError, match="width_mult"):
        vgg6(0.0)
    with pytest.raises(ValueError, match="no read-out"):
        net(torch.zeros(1, 3, 32, 32))


def test_paper_grid_gives_the_paper_pool_sizes():
    net = vgg6(1 / 16)
    assert pool_sizes_for_grid(feature_sides(net, 32), PAPER_GRID) == [4, 4, 4, 2, 2, 1]
    assert pool_sizes_for_grid(feature_sides(net, 96), PAPER_GRID) == [12, 12, 12, 6, 6, 3]
    assert pool_sizes_for_grid(feature_sides(net, 64), PAPER_GRID) == [8, 8, 8, 4, 4, 2]
    with pytest.raises(ValueError, match="grid"):
        pool_sizes_for_grid([32, 16], PAPER_GRID)


def test_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = vgg6(1 / 16, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = vgg6(1 / 16, seed=3)
    c = vgg6(1 / 16, seed=4)
    wa, wb, wc = (n.blocks[2].pre.weight for n in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert a.blocks[0].pre.bias is not None
    assert vgg6(1 / 16, bias=False).blocks[0].pre.bias is None
