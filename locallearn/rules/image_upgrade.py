"""Checkpoints of image rules saved before format 2 (pooled features flattened channel-major):
their prediction matrices are reordered to the position-major order when loaded."""

from __future__ import annotations

import torch
from torch import nn

from locallearn.nets.base import BlockNet
from locallearn.rules.image_grid import channel_major_order

__all__ = ["reorder_channel_major_b"]


@torch.no_grad()
def reorder_channel_major_b(
    matrices: list[tuple[nn.Parameter, int, int]], dims: list[int], net: BlockNet
) -> None:
    """Reorder prediction matrices loaded from a channel-major run, in place.

    ``matrices``: ``(B, row block, column block)`` for every prediction matrix of a rule (its
    rows act on the pooled output of the row block, its columns on that of the column block);
    ``dims``: the pooled size of every block.
    """
    if not dims:
        return
    channels = [block.pre.out_channels for block in net.blocks]
    orders = [channel_major_order(d, c) for d, c in zip(dims, channels)]
    for B, row, col in matrices:
        rows, cols = orders[row].to(B.device), orders[col].to(B.device)
        B.copy_(B[rows][:, cols])
