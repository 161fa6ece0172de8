"""Tests of the split of the two-view loss into parts of the batch (locallearn.rules.ssl_pairs)."""

from __future__ import annotations

import pytest
import torch

from locallearn.rules.layerwise import pick_negatives
from locallearn.rules.ssl_pairs import early_images, image_parts, pair_terms


def _scores(n: int, neg: torch.Tensor, start: int, stop: int) -> set[tuple]:
    """The (kind, anchor row, context row, sample row) of every score a part owns."""
    t = pair_terms(n, neg, start, stop)
    assert t.anchors[: t.rows.numel()].tolist() == t.rows.tolist()
    assert ((t.anchors + n) % (2 * n)).tolist() == t.context_rows.tolist()
    out = {("pos", int(t.anchors[r]), int(t.context_rows[r]), int(t.rows[r]))
           for r in range(t.rows.numel())}
    out |= {("neg", int(t.anchors[a]), int(t.context_rows[a]), int(t.rows[r]))
            for a, r in zip(t.neg_anchor.tolist(), t.neg_row.tolist())}
    return out


@pytest.mark.parametrize("how", ["next", "random"])
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_parts_own_every_score_exactly_once(how, parts):
    n = 7
    neg = pick_negatives(n, how, torch.Generator().manual_seed(parts), "cpu")
    expected = set()
    for r in range(2 * n):
        partner = (r + n) % (2 * n)
        expected.add(("pos", r, partner, r))
        expected.add(("neg", r, partner, int(neg[r % n]) + (r // n) * n))
    owned = [_scores(n, neg, a, b) for a, b in image_parts(n, parts)]
    assert sum(len(s) for s in owned) == 4 * n  # no score twice
    assert set().union(*owned) == expected


def test_whole_batch_scores_are_in_anchor_order():
    neg = pick_negatives(5, "random", torch.Generator().manual_seed(0), "cpu")
    t = pair_terms(5, neg)
    assert t.rows.tolist() == list(range(10))
    assert t.anchors.tolist() == t.neg_anchor.tolist() == list(range(10))
    assert t.neg_row.tolist() == torch.cat([neg, neg + 5]).tolist()


def test_parts_and_early_images():
    assert image_parts(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert image_parts(3, 8) == [(0, 1), (1, 2), (2, 3)]  # never an empty part
    assert image_parts(4, 1) == [(0, 4)]
    neg = pick_negatives(6, "next", None, "cpu")
    # with the next image as negative only the last image's context is needed early
    assert early_images(neg, image_parts(6, 3)).tolist() == [5]
    assert early_images(neg, image_parts(6, 1)).tolist() == []
    with pytest.raises(ValueError, match=r"images \[2, 6\) are not a non-empty part of a batch"):
        pair_terms(4, pick_negatives(4, "next", None, "cpu"), 2, 6)
