"""The three-block convolutional network of the Hebbian and forward-forward image papers.

SoftHebb (ICLR 2023, arXiv 2209.11883) introduced it for CIFAR-10 and SCFF (Nat. Commun. 2025)
reuses it: 96, 384 and 1536 channels, kernels 5, 3, 3 with reflect padding 2, 1, 1, a
"triangle" activation (each unit's input minus the mean over the channels at its location,
rectified and raised to a power), max-pools of kernel 4, stride 2, padding 1 after blocks 1 and 2
and an average pool of 2 after block 3. On 32-pixel inputs the maps are 16, 8 and 4 pixels a side,
so the top block has 1536 x 4 x 4 = 24,576 values.

This module holds what both rules' networks share (:data:`HEBB_PLAN`, :class:`Triangle`,
:func:`pool_of`) and SoftHebb's own network (:func:`softhebb_cnn`): each block normalises its input
with a batch norm without learned parameters, pads it (reflect) and convolves it without bias
(:class:`HebbConv`, the block's ``pre``), then applies the triangle and the pool (its ``post``).

:func:`softhebb_vgg6` puts the same block into the project's common network, VGG-6 (3x3
kernels, reflect padding 1 and the 2x2 max-pools of :data:`~locallearn.nets.vgg.VGG6_PLAN`), the
network on which every rule of the leaderboard is compared. It keeps SoftHebb's input batch norm,
bias-free convolution and triangle (the rule needs all three), with power 1 in every block, and
drops the 5x5 first kernel, the wide pools and the 96-384-1536 widths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import Block, BlockNet, scaled_width
from locallearn.nets.vgg import VGG6_PLAN, vgg_net

#: ``(channels, kernel, padding, pool)`` of each block at full width; a pool is ``("max", k, s,
#: p)`` or ``("avg", k, s, p)``.
HEBB_PLAN: tuple[tuple[int, int, int, tuple[str, int, int, int]], ...] = (
    (96, 5, 2, ("max", 4, 2, 1)),
    (384, 3, 1, ("max", 4, 2, 1)),
    (1536, 3, 1, ("avg", 2, 2, 0)),
)
#: SoftHebb's triangle powers per block (``demo.py``: 0.7, 1.4, 1.0).
SOFTHEBB_POWERS = (0.7, 1.4, 1.0)


class Triangle(nn.Module):
    """``relu(u - mean_c u) ** power``: each unit against the mean of the channels at its
    location (the mean is taken as a constant, as ``u.data`` in the papers' code)."""

    def __init__(self, power: float = 1.0) -> None:
        super().__init__()
        self.power = float(power)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = F.relu(u - u.detach().mean(1, keepdim=True))
        return out if self.power == 1.0 else out.pow(self.power)

    def extra_repr(self) -> str:
        return f"power={self.power:g}"


def pool_of(spec: tuple[str, int, int, int], ceil_mode: bool = False) -> nn.Module:
    """The pooling layer of a :data:`HEBB_PLAN` entry."""
    kind, k, s, p = spec
    if kind == "max":
        return nn.MaxPool2d(k, s, p, ceil_mode=ceil_mode)
    return nn.AvgPool2d(k, s, p, ceil_mode=ceil_mode)


class HebbConv(nn.Module):
    """SoftHebb's linear part: batch norm without learned parameters, reflect padding, and a
    convolution without bias.

    ``forward(x) = conv(pad(norm(x)))``. A rule that needs the convolution's input calls
    :meth:`inputs` (the normalised, padded input; in training mode it updates the batch norm's
    running statistics, once per call) and then :meth:`conv`.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, padding: int, init_range: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in, affine=False)
        self.padding = int(padding)
        fan_in = c_in * kernel * kernel
        self.weight = nn.Parameter(
            torch.randn(c_out, c_in, kernel, kernel) * (init_range / math.sqrt(fan_in))
        )

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's input: ``pad(norm(x))``."""
        p = self.padding
        return F.pad(self.norm(x), (p, p, p, p), mode="reflect")

    def conv(self, xp: torch.Tensor) -> torch.Tensor:
        """The weighted input ``u`` of padded inputs ``xp``."""
        return F.conv2d(xp, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.inputs(x))


def softhebb_cnn(
    width_mult: float = 1.0,
    in_channels: int = 3,
    bias: bool = False,
    seed: int = 0,
    powers: tuple[float, ...] = SOFTHEBB_POWERS,
    init_range: float = 25.0,
) -> BlockNet:
    """SoftHebb's CIFAR-10 network (preset ``4SoftHebbCnnCIFAR``: 96-384-1536 channels).

    Args:
        width_mult: multiplier of every block's channels.
        in_channels: input channels.
        bias: must be false (the rule has no bias; ``net.bias=true`` is refused).
        seed: seed of the initial weights, ``N(0, 1) * init_range / sqrt(fan_in)`` (drawn from a
            private generator state: the global one is left as it was).
        powers: the triangle's power per block.
        init_range: ``r`` of the initial weights' standard deviation ``r / sqrt(fan_in)`` (25).
    """
    if bias:
        raise ValueError("net.bias=true is invalid for net.kind=softhebb (its convolutions have "
                         "no bias); valid: false")
    scaled_width(1, width_mult)  # checks it
    blocks: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c_in = in_channels
        for (channels, kernel, padding, pool), power in zip(HEBB_PLAN, powers):
            c_out = scaled_width(channels, width_mult)
            pre = HebbConv(c_in, c_out, kernel, padding, init_range)
            blocks.append(Block(pre, nn.Sequential(Triangle(power), pool_of(pool))))
            c_in = c_out
    return BlockNet(blocks, readout=None)


def softhebb_vgg6(
    width_mult: float = 1.0,
    in_channels: int = 3,
    bias: bool = False,
    seed: int = 0,
    init_range: float = 25.0,
    power: float = 1.0,
) -> BlockNet:
    """VGG-6 (:data:`~locallearn.nets.vgg.VGG6_PLAN`) with SoftHebb's block in every block:
    batch norm without learned parameters, reflect padding 1 and a 3x3 convolution without bias
    (:class:`HebbConv`), then the triangle (``power`` in every block) in place of ReLU and, where
    the plan marks it, a 2x2 max-pool. Other arguments as :func:`softhebb_cnn`.

    The triangle is kept because the rule needs it: with ReLU, a pass of 10 epochs over 10,000
    CIFAR-10 images left the top blocks' weight norms far from 1 and the probe 1.3 points above
    the untrained network; with the triangle, 6.1 points (``docs/leaderboard.md``)."""
    if bias:
        raise ValueError("net.bias=true is invalid for net.kind=vgg6-softhebb (its convolutions "
                         "have no bias); valid: false")
    return vgg_net(VGG6_PLAN, width_mult, in_channels, seed,
                   lambda c_in, c_out: HebbConv(c_in, c_out, 3, 1, init_range),
                   lambda: Triangle(power))
