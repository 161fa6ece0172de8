"""The image CLAPP and CLAPP++ losses against reference numbers from the paper's public code.

``tests/data/clapp_golden.json`` holds values computed by running the public code of arXiv
2601.21683 (its layer-wise CLAPP loss with its default pairing of negatives) in float64 on a
seeded VGG-6, seeded views and seeded prediction matrices; its ``about`` field says exactly how.
Here the presets' rules (``configs/images/clapp.yaml``, ``clapp++.yaml``, with no override) must
give the same per-block losses, the same encoder gradients and the same prediction-matrix
gradients (after mapping the code's channel-major flattening of the pooled map to this library's
position-major one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden import check_stats as _check

from locallearn.nets.vgg import vgg6
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.rules.image_grid import channel_major_order, pool_flat
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "clapp_golden.json").read_text())




@pytest.mark.parametrize("preset", ["clapp", "clapp++"])
def test_preset_loss_and_gradients_match_the_paper_code(preset):
    ref = GOLDEN["rules"][preset]
    n, side = GOLDEN["n_images"], GOLDEN["side"]
    cfg = load_config(ROOT / "configs" / "images" / f"{preset}.yaml")
    torch.manual_seed(0)
    net = vgg6(GOLDEN["width_mult"], seed=0).double()
    x = torch.randn(2 * n, 3, side, side, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    rule = build_rule(cfg.rule, 0)
    rule.setup(net, x[:2])
    rule.to(torch.float64)
    orders = []
    for level, B in enumerate(rule.B_same):
        d, channels = ref["B_dims"][level], ref["B_channels"][level]
        assert B.shape == (d, d)
        g = torch.Generator().manual_seed(10 + level)
        W = torch.randn(d, d, generator=g, dtype=torch.float64)
        order = channel_major_order(d, channels)
        orders.append(order)
        with torch.no_grad():  # the code's W in this library's feature order
            B.copy_(W[order][:, order])
    # the code scales W_l by the mean squared norm of the pooled outputs; redo it here
    with torch.no_grad():
        feats = net.features(x)
        for level, (h, B) in enumerate(zip(feats, rule.B_same)):
            pooled = pool_flat(h, rule.pools[level])
            B.mul_(1.5 / float((pooled ** 2).sum(1).mean()))
    for p in list(net.parameters()) + list(rule.parameters()):
        p.grad = None
    metrics = rule.compute_grads(net, Batch(x[:n], None, (x[:n], x[n:]), None))
    losses = [metrics[f"loss_block{level + 1}"] for level in range(len(net.blocks))]
    assert losses == pytest.approx(ref["block_losses"], rel=1e-10)
    assert metrics["loss"] == pytest.approx(sum(ref["block_losses"]), rel=1e-10)
    for name, p in net.named_parameters():
        _check(ref["net_grads"][name], p.grad, name)
    for level, (B, order) in enumerate(zip(rule.B_same, orders)):
        inverse = torch.argsort(order)
        _check(ref["B_grads"][level], B.grad[inverse][:, inverse], f"B_{level + 1}")


def test_the_other_pairing_and_scale_do_not_match():
    # break-on-purpose: the former conventions give other numbers (so the test above can fail)
    ref = GOLDEN["rules"]["clapp++"]
    cfg = load_config(ROOT / "configs" / "images" / "clapp++.yaml",
                      ["rule.options.negatives=same-view"])
    n, side = GOLDEN["n_images"], GOLDEN["side"]
    net = vgg6(GOLDEN["width_mult"], seed=0).double()
    x = torch.randn(2 * n, 3, side, side, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    rule = build_rule(cfg.rule, 0)
    rule.setup(net, x[:2])
    rule.to(torch.float64)
    with torch.no_grad():
        for level, B in enumerate(rule.B_same):
            d = B.shape[0]
            B.copy_(torch.randn(d, d, generator=torch.Generator().manual_seed(10 + level),
                                dtype=torch.float64) / d)
    metrics = rule.compute_grads(net, Batch(x[:n], None, (x[:n], x[n:]), None))
    got = [metrics[f"loss_block{level + 1}"] for level in range(len(net.blocks))]
    assert got != pytest.approx(ref["block_losses"], rel=1e-6)
