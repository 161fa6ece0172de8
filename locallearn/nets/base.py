"""Networks as ordered lists of blocks.

A block maps ``h_{l-1}`` to ``h_l = post(pre(h_{l-1}))``: ``pre`` is the block's linear part (its
pre-activation ``a_l``), ``post`` the fixed nonlinearity (ReLU, pooling). Rules that need the
pre-activation (direct feedback, three-factor forms) call the two halves themselves; everything
else calls the block. A network never knows which rule trains it.
"""

from __future__ import annotations

import torch
from torch import nn


def scaled_width(channels: int, width_mult: float) -> int:
    """``channels * width_mult`` rounded, at least 1 (``width_mult > 0``, else a one-line
    ValueError)."""
    if not width_mult > 0:
        raise ValueError(f"net.width_mult={width_mult} is invalid: must be > 0")
    return max(1, int(round(channels * width_mult)))


class Block(nn.Module):
    """``post(pre(x))`` with the two halves reachable by rules."""

    def __init__(self, pre: nn.Module, post: nn.Module):
        super().__init__()
        self.pre = pre
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.pre(x))


class BlockNet(nn.Module):
    """An encoder of blocks and an optional linear read-out on the flattened top block.

    Attributes:
        blocks: the encoder, in order.
        readout: maps the flattened output of the last block to class scores, or ``None``.
    """

    def __init__(self, blocks: list[nn.Module], readout: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.readout = readout

    def features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Outputs of blocks ``0 .. upto-1`` (all blocks by default)."""
        out = []
        h = x
        for block in self.blocks[: len(self.blocks) if upto is None else upto]:
            h = block(h)
            out.append(h)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.readout is None:
            raise ValueError("this network has no read-out; use encode() or features()")
        return self.readout(self.encode(x).flatten(1))

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` every block in place.

        Compiled modules share code objects, and torch compiles at most ``recompile_limit``
        (8 by default) variants of a code object, then runs the rest eagerly. Each block is a
        variant for each input width, dtype (fp32 input, bf16 under autocast), grad mode (the
        probes and contexts run without gradients) and, once, batch size (then it is marked
        dynamic), so the limit is raised to eight variants per block.
        """
        import torch._dynamo.config as dynamo_config

        need = 8 * len(self.blocks)
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
            if getattr(dynamo_config, name, need) < need:
                setattr(dynamo_config, name, need)
        for block in self.blocks:
            block.compile(backend=backend)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the blocks (not of the read-out)."""
        return list(self.blocks.parameters())
