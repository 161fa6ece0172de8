"""``rule.options.negatives`` (the paper code's pairing or the same view) and the loss scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.nets.vgg import vgg6
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.rules.ssl_pairs import early_images, image_parts, pair_terms, paper_negative_rows
from locallearn.schema import RuleConfig, load_config

IMAGES = Path(__file__).resolve().parents[1] / "configs" / "images"


def test_paper_rows_wrap_over_both_views():
    assert paper_negative_rows(3).tolist() == [1, 2, 3, 4, 5, 0]
    t = pair_terms(3, paper_negative_rows(3))
    # anchor 2 (image 2, view 1) meets row 3 (image 0, view 2); anchor 5 meets row 0
    assert t.neg_row[t.neg_anchor.argsort()].tolist() == [1, 2, 3, 4, 5, 0]
    # with 3 parts, image 2's context is needed by part 0 (which holds its negatives' rows)
    assert early_images(paper_negative_rows(3), image_parts(3, 3)).tolist() == [2]


@pytest.mark.parametrize("preset", ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff",
                                    "bp-clapp++"])
def test_presets_pair_as_the_paper_code(preset):
    rule = build_rule(load_config(IMAGES / f"{preset}.yaml").rule, 0)
    assert rule.pairing == "paper"
    other = load_config(IMAGES / f"{preset}.yaml", ["rule.options.negatives=same-view"])
    assert build_rule(other.rule, 0).pairing == "same-view"


@pytest.mark.parametrize("options, negatives, match", [
    ({"negative_view": "other"}, "next", "rule.options.negative_view"),
    ({"negative_view": "paper"}, "random", "needs rule.options.negative_image=next"),
])
def test_bad_pairings_are_one_line_errors(options, negatives, match):
    cfg = RuleConfig(name="clapp-image",
                     options={"f": "hinge", "negative_image": negatives, **options})
    with pytest.raises(ValueError, match=match) as info:
        build_rule(cfg, 0)
    assert "\n" not in str(info.value)


def _batch(n=6, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v1 = torch.rand(n, 3, side, side, generator=g, dtype=torch.float64)
    v2 = (v1 + 0.3 * torch.rand(n, 3, side, side, generator=g, dtype=torch.float64)).clamp(0, 1)
    return Batch(v1, None, (v1, v2), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pairing", ["paper", "same-view"])
@pytest.mark.parametrize("name", ["clapp-image", "bp-ssl"])
def test_micro_batches_are_exact_for_both_pairings(pairing, name):
    batch = _batch()
    grads = {}
    for parts in (1, 3):
        options = {"negative_view": pairing, "micro_batches": parts}
        if name == "clapp-image":
            options["context"] = "both"
        net = vgg6(1 / 32, seed=0).double()
        rule = build_rule(RuleConfig(name=name, options=options), 0)
        rule.setup(net, batch.x)
        rule.to(torch.float64)
        with torch.no_grad():
            for i, p in enumerate(rule.parameters()):
                g = torch.Generator().manual_seed(100 + i)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 3.0 / p.shape[-1])
        rule.compute_grads(net, batch)
        grads[parts] = [p.grad.clone() for p in list(net.parameters()) + list(rule.parameters())]
    for a, b in zip(grads[1], grads[3]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_loss_is_the_mean_over_both_views():
    # B = 0: every score is 0 and each of the 2N anchors adds f(0) + f(0) = 2 (hinge)
    batch = _batch()
    net = vgg6(1 / 32, seed=0).double()
    rule = build_rule(load_config(IMAGES / "clapp++.yaml").rule, 0)
    rule.setup(net, batch.x)
    rule.to(torch.float64)
    metrics = rule.compute_grads(net, batch)
    assert [metrics[f"loss_block{i}"] for i in range(1, 7)] == pytest.approx([2.0] * 6)


def test_fixed_pairings_plan_once_random_negatives_every_batch():
    n, ranges = 6, image_parts(6, 3)
    rule = build_rule(load_config(IMAGES / "clapp++.yaml").rule, 0)
    neg = rule.negative_index(n, Batch(torch.zeros(n, 1), None, None, None), torch.device("cpu"))
    plan = rule.pair_plan(n, neg, ranges)
    terms, early = plan.terms, plan.early
    again = rule.pair_plan(n, neg, ranges)
    assert again.terms is terms and again.early is early  # made once for every batch of n
    for (a, b), t in zip(ranges, terms):
        fresh = pair_terms(n, neg, a, b)
        assert all(torch.equal(getattr(t, k), getattr(fresh, k)) for k in
                   ("rows", "anchors", "context_rows", "neg_anchor", "neg_row"))
    assert torch.equal(early, early_images(neg, ranges))
    cfg = load_config(IMAGES / "clapp++.yaml", ["rule.negatives=random",
                                                "rule.options.negatives=same-view"])
    rnd = build_rule(cfg.rule, 0)
    gen = torch.Generator().manual_seed(0)
    batch = Batch(torch.zeros(n, 1), None, None, gen)
    negs = [rnd.negative_index(n, batch, torch.device("cpu")) for _ in range(4)]
    plans = [rnd.pair_plan(n, neg, ranges) for neg in negs]
    assert plans[0].terms is not plans[1].terms
    assert len({tuple(p.terms[0].neg_row.tolist()) for p in plans}) > 1  # drawn anew
    # each piece is made once, where it is read: the early images never build the terms
    plan = rnd.pair_plan(n, negs[0], ranges)
    assert torch.equal(plan.early, early_images(negs[0], ranges)) and "terms" not in vars(plan)
    assert plan.terms is plan.terms
