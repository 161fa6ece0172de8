"""Shared by the golden tests: a tensor against the summary of a reference tensor stored in
``tests/data/*.json`` (its sum, its sum of squares and a few sampled entries)."""

from __future__ import annotations

import pytest
import torch


def check_stats(stats: dict, tensor: torch.Tensor, what: str, rel: float = 1e-9,
                value_abs: float = 1e-12) -> None:
    """Assert that ``tensor`` (in float64) has the reference's sum, sum of squares and sampled
    entries, to float64 rounding (relative ``rel``; sampled entries also within
    ``value_abs``)."""
    flat = tensor.detach().double().flatten()
    assert float(flat.sum()) == pytest.approx(stats["sum"], rel=rel, abs=1e-12), what
    assert float((flat * flat).sum()) == pytest.approx(stats["sumsq"], rel=rel), what
    got = flat[torch.tensor(stats["index"])].tolist()
    assert got == pytest.approx(stats["values"], rel=rel, abs=value_abs), what
