"""Similarity measures between a local weight update and the BP weight gradient."""

from __future__ import annotations

import torch


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors of the same shape, flattened (0 if one is zero)."""
    x, y = _flat_pair(a, b)
    den = float(x.norm() * y.norm())
    if den == 0.0:
        return 0.0
    return float(x @ y) / den


def rel_error(local: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative Frobenius error ``||local - reference|| / ||reference||``."""
    x, y = _flat_pair(local, reference)
    ref = float(y.norm())
    if ref == 0.0:
        raise ValueError("reference gradient is zero; relative error undefined")
    return float((x - y).norm()) / ref
