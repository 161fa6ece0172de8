"""Pooling the maps of image encoders onto grids, and the flat order of the pooled features.

The image rules and the linear probe average-pool each block's output on a spatial grid (kernel
= stride = the block's pool size; one cell is global pooling) and flatten it position-major:
(grid row, grid column, channel), a view without a copy of a channels-last map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locallearn.nets.vgg import loss_grid, pool_sizes_for_grid

__all__ = ["channel_major_order", "pool_flat", "resolve_pools", "unflatten_grid", "unpool"]


def resolve_pools(pool: list[int] | str, sides: list[int]) -> list[int]:
    """Pool sizes per block for maps of side ``sides``, from ``rule.options.pool``."""
    if pool == "auto":
        return pool_sizes_for_grid(sides, loss_grid(len(sides)))
    if pool == "global":
        return list(sides)
    if not isinstance(pool, list):
        raise ValueError(f"rule.options.pool={pool!r} is invalid")
    if len(pool) != len(sides):
        raise ValueError(
            f"rule.options.pool lists {len(pool)} pool sizes for a network of {len(sides)} blocks"
        )
    for level, (p, side) in enumerate(zip(pool, sides)):
        if side % p:
            raise ValueError(
                f"rule.options.pool[{level}]={p} does not divide block {level + 1}'s map "
                f"side {side}"
            )
    return list(pool)


def pool_flat(z: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool ``(N, C, H, W)`` with kernel = stride = ``pool`` and flatten to ``(N, D)``.

    The flat order is position-major (grid row, grid column, channel): a view, without a copy,
    of a channels-last map, so that the loss's gradient flows back in the encoder's layout.
    """
    if pool > 1:
        z = F.avg_pool2d(z, pool)
    return z.permute(0, 2, 3, 1).flatten(1)


def channel_major_order(dim: int, channels: int) -> torch.Tensor:
    """Index of each position-major feature of :func:`pool_flat` in the channel-major order
    (channel, grid row, grid column) that runs saved before this layout used."""
    cells = dim // channels
    return (torch.arange(channels)[None, :] * cells + torch.arange(cells)[:, None]).flatten()


def unflatten_grid(p: torch.Tensor, channels: int, cells: int) -> torch.Tensor:
    """Inverse of the flattening of :func:`pool_flat`: ``(N, D)`` to ``(N, C, cells, cells)``."""
    return p.reshape(p.shape[0], cells, cells, channels).permute(0, 3, 1, 2)


def unpool(g: torch.Tensor, pool: int) -> torch.Tensor:
    """Adjoint of the average pool: each cell's value spread over its window, over its area."""
    if pool == 1:
        return g
    return g.repeat_interleave(pool, 2).repeat_interleave(pool, 3) / (pool * pool)
