"""Hierarchical CNN for the Random Hierarchy Model.

``L`` blocks of 1-d convolution with filter size = stride = ``s`` over the ``s**L`` token
positions, each followed by ReLU, so that block ``l`` (1-based) has ``s**(L-l)`` positions and the
top block one; a linear read-out to the classes.

Scaling keeps activations of order one at any width: weights are drawn from N(0, 1) and the
convolution divides by ``sqrt(fan_in)`` in the forward pass (times ``sqrt(2)`` after a ReLU, the
He gain); the first block sees one-hot columns of unit norm, so its fan-in is ``s``. The read-out
divides by the width (mean-field read-out), as the reference CNN of the RHM literature does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import Block, BlockNet


class ScaledConv1d(nn.Module):
    """``conv1d(x, weight * scale, stride=kernel)``: non-overlapping patches, N(0, 1) weights."""

    def __init__(self, c_in: int, c_out: int, kernel: int, scale: float, bias: bool, gen=None):
        super().__init__()
        self.kernel = kernel
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, generator=gen))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # non-overlapping patches make the convolution one matrix product (faster on CPU)
        w = (self.weight * self.scale).reshape(self.weight.shape[0], -1)
        y = F.linear(self.patches(x), w, self.bias)  # (N, positions, c_out)
        return y.transpose(1, 2)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, positions, c_in * kernel)``: the input patch of every output position."""
        n, c, p = x.shape
        k = self.kernel
        if p % k:
            raise ValueError(f"input of {p} positions is not a multiple of the filter size {k}")
        return x.reshape(n, c, p // k, k).permute(0, 2, 1, 3).reshape(n, p // k, c * k)


class ScaledLinear(nn.Module):
    """``x @ (weight * scale).T + bias`` with N(0, 1) weights."""

    def __init__(self, d_in: int, d_out: int, scale: float, bias: bool = True, gen=None):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(d_out, d_in, generator=gen))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def hier_cnn(
    v: int,
    s: int,
    L: int,
    widths: int | list[int],
    n_out: int,
    bias: bool = False,
    seed: int = 0,
) -> BlockNet:
    """Build the hierarchical CNN.

    Args:
        v: input channels (vocabulary size).
        s: filter size and stride.
        L: number of blocks; inputs must have ``s**L`` positions.
        widths: channels of every block, or one width for all.
        n_out: read-out outputs (classes).
        bias: biases in the convolutions.
        seed: seed of the initial weights.
    """
    if isinstance(widths, int):
        widths = [widths] * L
    if len(widths) != L or any(int(w) < 1 for w in widths):
        raise ValueError(
            f"net.widths={widths} is invalid: need {L} positive widths (one per block, L={L})"
        )
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    c_in = v
    for level, width in enumerate(widths):
        scale = 1.0 / math.sqrt(s) if level == 0 else math.sqrt(2.0 / (c_in * s))
        blocks.append(Block(ScaledConv1d(c_in, width, s, scale, bias, gen), nn.ReLU()))
        c_in = width
    readout = ScaledLinear(c_in, n_out, 1.0 / c_in, bias=True, gen=gen)
    return BlockNet(blocks, readout)
