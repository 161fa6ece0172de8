"""Weight initialisations for the deep-linear-network theory (float64).

``semi_orthogonal(rows, cols)`` has orthonormal rows when ``rows <= cols`` (``W W^T = I``, a
projection followed by a rotation) and orthonormal columns otherwise (``W^T W = I``, an
isometric embedding); for ``rows == cols`` it is a Haar-random orthogonal matrix.
"""

from __future__ import annotations

import torch


def semi_orthogonal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random matrix ``(rows, cols)`` with orthonormal rows or columns, whichever is fewer."""
    if rows < 1 or cols < 1:
        raise ValueError(f"matrix sizes must be positive, got {rows}x{cols}")
    big, small = max(rows, cols), min(rows, cols)
    g = torch.randn(big, small, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # sign fix so that q is Haar-distributed, not biased by the QR convention
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    q = q * sign
    return q.t().contiguous() if rows <= cols else q.contiguous()


def gaussian(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Non-orthogonal random matrix, entries ``N(0, 1/cols)`` (preserves norms on average)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"matrix sizes must be positive, got {rows}x{cols}")
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / cols**0.5


def mlp_weights(
    widths: list[int], gen: torch.Generator, kind: str = "orthonormal", gain: float = 1.0
) -> list[torch.Tensor]:
    """Weights ``W_l`` of shape ``(widths[l], widths[l-1])`` for an MLP, input width first.

    ``kind``: ``orthonormal`` (semi-orthogonal when widths differ) or ``gaussian``. ``gain``
    multiplies every matrix.
    """
    if len(widths) < 2:
        raise ValueError("widths needs the input width and at least one layer width")
    if kind not in ("orthonormal", "gaussian"):
        raise ValueError(f"weight kind {kind!r} is unknown; valid: orthonormal, gaussian")
    make = semi_orthogonal if kind == "orthonormal" else gaussian
    return [gain * make(widths[i + 1], widths[i], gen) for i in range(len(widths) - 1)]


def conv_weights(
    in_channels: int, channels: int, layers: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """Orthonormal-style 2x2 stride-2 conv kernels, each ``(channels, c_in, 2, 2)``.

    The kernel reshaped to ``(c_out, 4 c_in)`` is semi-orthogonal: layer 1 (``4 c_in <= c_out``)
    is an isometry of each 2x2 patch; later layers (``4 c_out -> c_out``) have orthonormal rows,
    so the map from any layer to the top has orthonormal rows.
    """
    if in_channels < 1 or channels < 1 or layers < 1:
        raise ValueError("in_channels, channels and layers must be positive")
    out = []
    c_in = in_channels
    for _ in range(layers):
        out.append(semi_orthogonal(channels, 4 * c_in, gen).reshape(channels, c_in, 2, 2))
        c_in = channels
    return out
