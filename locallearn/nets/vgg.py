"""VGG encoders as ordered lists of blocks (the image experiments of arXiv 2601.21683).

VGG-6 has six blocks ``[128], [256, M], [256], [512, M], [1024, M], [1024, M]``: a 3x3
convolution with padding 1 (the block's ``pre``, its pre-activation), then ReLU and, where marked
``M``, a 2x2 max-pool (the block's ``post``). There is no batch normalisation and no read-out: the
encoder is trained by a self-supervised rule and evaluated by a separate linear probe.

Feature-map sides for an input of side ``S``: ``S, S/2, S/2, S/4, S/8, S/16`` (CIFAR-10: 32, 16,
16, 8, 4, 2; Tiny ImageNet at 64 px: 64 ... 4; STL-10 at 96 px: 96 ... 6).

The losses and the probe average-pool each block's output on a spatial grid. The paper's grids are
8, 4, 4, 4, 2, 2 cells per side for every dataset (pool sizes 4-4-4-2-2-1 on CIFAR-10,
12-12-12-6-6-3 on STL-10, 8-8-8-4-4-2 on Tiny ImageNet); :func:`pool_sizes_for_grid` turns grids
into pool sizes for any input side.

VGG-8 (the paper's ImageNet encoder) has eight blocks ``[128], [256, M], [512, M], [512],
[1024, M], [1024, M], [1024], [1024, M]``: sides ``224, 112, 56, 56, 28, 14, 14, 7`` at 224 px. Its
loss pools are 28-28-14-14-14-7-7-7 at 224 px, i.e. grids 8, 4, 4, 4, 2, 2, 2, 1
(:data:`VGG8_GRID`). Its probe concatenates the 8 blocks pooled onto grids 4, 4, 4, 4, 2, 2, 2, 1
(:data:`VGG8_PROBE_GRID`): 35,840 values at full width, the feature count the paper reports (the
loss grids would give 41,984). :func:`loss_grid` and :func:`probe_grid` give the grids of a
network by its number of blocks.

VGG-11 (the encoder of the LPL rule, :mod:`locallearn.rules.lpl`) is the conv stack of the classic
VGG-11 without batch norm: eight blocks ``[64, M], [128, M], [256], [256, M], [512], [512, M],
[512], [512, M]`` of a 3x3 convolution with bias, ReLU and, where marked, a 2x2 max-pool, sides
``16, 8, 8, 4, 4, 2, 2, 1`` at 32 px. The max-pool sits inside the block, after the ReLU, so a
block's output (what the LPL loss and its probe read, average-pooled globally) is the map *after*
its max-pool, as in the rule's reference code. Having eight blocks it takes VGG-8's default grids
(:func:`loss_grid`, :func:`probe_grid`); the LPL presets set global pooling instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from locallearn.nets.base import Block, BlockNet, scaled_width

#: ``(channels, max-pool after the ReLU)`` of each VGG-6 block at full width.
VGG6_PLAN: tuple[tuple[int, bool], ...] = (
    (128, False), (256, True), (256, False), (512, True), (1024, True), (1024, True),
)
#: Cells per side of the loss (and probe) grid of each VGG-6 block in the paper.
PAPER_GRID: tuple[int, ...] = (8, 4, 4, 4, 2, 2)
#: ``(channels, max-pool after the ReLU)`` of each VGG-8 block at full width (ImageNet).
VGG8_PLAN: tuple[tuple[int, bool], ...] = (
    (128, False), (256, True), (512, True), (512, False),
    (1024, True), (1024, True), (1024, False), (1024, True),
)
#: Loss grid of VGG-8 (pools 28-28-14-14-14-7-7-7 at 224 px) and its probe grid (35,840 values).
VGG8_GRID: tuple[int, ...] = (8, 4, 4, 4, 2, 2, 2, 1)
VGG8_PROBE_GRID: tuple[int, ...] = (4, 4, 4, 4, 2, 2, 2, 1)
#: ``(channels, max-pool after the ReLU)`` of each VGG-11 block at full width (the LPL encoder).
VGG11_PLAN: tuple[tuple[int, bool], ...] = (
    (64, True), (128, True), (256, False), (256, True),
    (512, False), (512, True), (512, False), (512, True),
)
_LOSS_GRIDS = {len(PAPER_GRID): PAPER_GRID, len(VGG8_GRID): VGG8_GRID}
_PROBE_GRIDS = {len(PAPER_GRID): PAPER_GRID, len(VGG8_PROBE_GRID): VGG8_PROBE_GRID}


def loss_grid(n_blocks: int) -> tuple[int, ...]:
    """The paper's loss grid (cells per side) of a VGG encoder with ``n_blocks`` blocks (up to
    six blocks: the first ``n_blocks`` cells of VGG-6's grid)."""
    if n_blocks <= len(PAPER_GRID):
        return PAPER_GRID[:n_blocks]
    if n_blocks not in _LOSS_GRIDS:
        raise ValueError(
            f"no default pooling grid for {n_blocks} blocks (VGG-6 and VGG-8 have one); "
            "give explicit pool sizes"
        )
    return _LOSS_GRIDS[n_blocks]


def probe_grid(n_blocks: int) -> tuple[int, ...]:
    """The paper's probe grid of a VGG encoder with ``n_blocks`` blocks (see :func:`loss_grid`)."""
    if n_blocks <= len(PAPER_GRID):
        return PAPER_GRID[:n_blocks]
    if n_blocks not in _PROBE_GRIDS:
        raise ValueError(
            f"no default probe grid for {n_blocks} blocks (VGG-6 and VGG-8 have one); "
            "set probe.grid"
        )
    return _PROBE_GRIDS[n_blocks]


def vgg6(
    width_mult: float = 1.0,
    in_channels: int = 3,
    bias: bool = True,
    seed: int = 0,
    plan: tuple[tuple[int, bool], ...] = VGG6_PLAN,
) -> BlockNet:
    """Build the VGG-6 encoder (a :class:`BlockNet` without read-out).

    Args:
        width_mult: multiplier of every block's channels (``1/8`` gives 16-32-32-64-128-128).
        in_channels: input channels.
        bias: biases in the convolutions.
        seed: seed of the initial weights (PyTorch's default convolution initialisation, drawn
            from a private generator state: the global one is left as it was).
        plan: ``(channels, max-pool)`` per block at full width.
    """
    return vgg_net(plan, width_mult, in_channels, seed,
                   lambda c_in, c_out: nn.Conv2d(c_in, c_out, kernel_size=3, padding=1,
                                                 bias=bias))


def vgg_net(
    plan: tuple[tuple[int, bool], ...],
    width_mult: float,
    in_channels: int,
    seed: int,
    linear: Callable[[int, int], nn.Module],
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> BlockNet:
    """A VGG encoder of ``plan`` whose blocks are ``linear(c_in, c_out)`` (the block's
    ``pre``), then ``activation()`` and, where the plan marks it, a 2x2 max-pool (its
    ``post``); the weights drawn from a private generator state seeded with ``seed``."""
    scaled_width(1, width_mult)  # checks it
    blocks: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c_in = in_channels
        for channels, pool in plan:
            c_out = scaled_width(channels, width_mult)
            act = activation()
            post: nn.Module = nn.Sequential(act, nn.MaxPool2d(2)) if pool else act
            blocks.append(Block(linear(c_in, c_out), post))
            c_in = c_out
    return BlockNet(blocks, readout=None)


def vgg8(width_mult: float = 1.0, in_channels: int = 3, bias: bool = True,
         seed: int = 0) -> BlockNet:
    """Build the 8-block VGG encoder of the paper's ImageNet runs (see :func:`vgg6`)."""
    return vgg6(width_mult, in_channels, bias, seed, plan=VGG8_PLAN)


def vgg11(width_mult: float = 1.0, in_channels: int = 3, bias: bool = True,
          seed: int = 0) -> BlockNet:
    """Build the VGG-11 conv stack without batch norm (the LPL encoder; see :func:`vgg6`).

    Each block is a 3x3 convolution, ReLU and, after blocks 1, 2, 4, 6 and 8, a 2x2 max-pool:
    the block's output is the map after its max-pool, which is what the LPL loss reads.
    ``width_mult=1/8`` gives 8-16-32-32-64-64-64-64 channels.
    """
    return vgg6(width_mult, in_channels, bias, seed, plan=VGG11_PLAN)


#: ``net.kind`` -> builder of the image encoders.
VGG_KINDS = {"vgg6": vgg6, "vgg8": vgg8, "vgg11": vgg11}


def feature_shapes(net: BlockNet, side: int) -> list[tuple[int, int]]:
    """``(channels, side)`` of every block's output map for a square input of side ``side``,
    measured by one forward pass of a blank image (so any block that changes the size counts,
    not only max-pools)."""
    # the first convolution's weight (out, in, kh, kw) names the input's channels
    param = next(p for p in net.parameters() if p.dim() == 4)
    blank = torch.zeros(1, param.shape[1], side, side, device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            return [(int(h.shape[1]), int(h.shape[-1])) for h in net.features(blank)]
    except RuntimeError as err:
        raise ValueError(
            f"an input of side {side} is too small for the {len(net.blocks)} blocks of the "
            f"network ({str(err).splitlines()[0]})"
        ) from None


def feature_sides(net: BlockNet, side: int) -> list[int]:
    """Side of every block's output map for a square input of side ``side``
    (:func:`feature_shapes`)."""
    return [s for _, s in feature_shapes(net, side)]


def pool_sizes_for_grid(
    sides: list[int], grid: tuple[int, ...] | list[int] = PAPER_GRID
) -> list[int]:
    """Pool sizes (kernel = stride) that pool maps of side ``sides`` onto ``grid`` cells per side.

    A map smaller than its grid is not pooled (pool size 1, grid = the map).
    """
    if len(grid) != len(sides):
        raise ValueError(f"a grid of {len(grid)} blocks does not fit a network of {len(sides)}")
    out = []
    for level, (side, cells) in enumerate(zip(sides, grid)):
        cells = min(cells, side)
        if side % cells:
            raise ValueError(
                f"block {level + 1}: a map of side {side} cannot be pooled onto a grid of {cells}"
            )
        out.append(side // cells)
    return out

