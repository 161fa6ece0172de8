"""The latent-prediction and token-prediction rules: explicit three-factor formula, locality,
options, and the uniform-RHM guard."""

from __future__ import annotations

import math

import pytest
import torch
from test_rules import forward_parts, grads_of, make, weight_update

from locallearn.rules import Batch
from locallearn.rules.latent import LatentOptions, LatentPrediction, balanced_codes
from locallearn.rules.token import TokenOptions, TokenPrediction, hide_tokens


def setup_module():
    torch.set_default_dtype(torch.float64)


def teardown_module():
    torch.set_default_dtype(torch.float32)


def latent_rule(net, x, **kw):
    rule = LatentPrediction(LatentOptions(**kw), s=2, seed=0)
    rule.setup(net, x)
    with torch.no_grad():  # R, T are zero at initialisation: the first step only trains them
        for r in list(rule.R) + list(rule.T):
            r.normal_(0, 1.0)
    return rule


def test_balanced_codes_are_distributions_with_equal_cluster_mass():
    scores = torch.randn(64, 8) + torch.linspace(0, 2, 8)  # biased towards the last clusters
    t = balanced_codes(scores, 0.2, 20)
    assert torch.allclose(t.sum(1), torch.ones(64))
    mass = t.sum(0)
    assert (mass - 8).abs().max() < 0.5  # nearly n / k per cluster
    raw = torch.softmax(scores / 0.2, 1).sum(0)
    assert (raw - 8).abs().max() > (mass - 8).abs().max()


@pytest.mark.parametrize("objective", ["stacked", "balanced-code"])
def test_latent_prediction_matches_three_factor_formula(objective):
    _, net, x, _, tokens = make(width=10)
    rule = latent_rule(net, x, objective=objective)
    got = grads_of(rule, net, Batch(x, None, None, torch.Generator()))
    parts, _ = forward_parts(net, x)
    o = rule.options
    below = torch.nn.functional.one_hot(tokens.long(), 6).double()  # codes under block 0
    for level, part in enumerate(parts[:-1]):
        z = torch.relu(part["a"])  # (N, C, P)
        n, c, p = z.shape
        zf = z.transpose(1, 2)
        norm = math.sqrt(c) * o.tau
        t = balanced_codes((zf @ rule.Q[level].detach().t() / math.sqrt(c)).reshape(-1, 6),
                           o.sinkhorn_eps, o.sinkhorn_iters).reshape(n, p, 6)
        dz = torch.zeros_like(zf)
        for r, r2 in ((0, 1), (1, 0)):  # the ordered sibling pairs
            if objective == "stacked":  # predict the codes of the sibling's two children
                for q in (0, 1):
                    T = rule.T[level][r, r2, q].detach()
                    err = torch.softmax(zf[:, r::2] @ T.t() / norm, -1) - below[:, 2 * r2 + q::4]
                    dz[:, r::2] += err @ T / norm / (n * p // 2) / 4
            else:  # predict the sibling's own code
                R = rule.R[level][r, r2].detach()
                err = torch.softmax(zf[:, r::2] @ R.t() / norm, -1) - t[:, r2::2]
                dz[:, r::2] += err @ R / norm / (n * p // 2) / 2
        Q = rule.Q[level].detach()
        err = torch.softmax(zf @ Q.t() / norm, -1) - t
        dz += o.cluster_weight * err @ Q / norm / (n * p)
        expect = weight_update(part, dz.transpose(1, 2) * part["gate"])
        assert torch.allclose(got[level], expect, atol=1e-10, rtol=1e-8)
        pred = rule.T[level] if objective == "stacked" else rule.R[level]
        assert pred.grad.abs().sum() > 0 and rule.Q[level].grad.abs().sum() > 0
        below = t  # this level's balanced codes are the next level's targets
    # the single-position top block has no sibling: no update
    assert net.blocks[-1].pre.weight.grad is None


@pytest.mark.parametrize("objective", ["stacked", "balanced-code", "mutual-information"])
def test_latent_prediction_is_local_and_label_free(objective):
    """Each block's update is the gradient of its own loss on its detached input; no label."""
    _, net, x, y, _ = make(width=10)
    rule = latent_rule(net, x, objective=objective)
    got = grads_of(rule, net, Batch(x, None, None, torch.Generator()))
    h = x
    below = rule.input_codes(x)
    for level, block in enumerate(net.blocks[:-1]):
        z = block(h.detach())
        (expect,) = torch.autograd.grad(rule.block_loss(level, z, below), block.pre.weight)
        below = rule.targets(level, z)
        assert torch.allclose(got[level], expect, atol=1e-10)
        assert got[level].abs().sum() > 0
        h = z.detach()
    assert net.readout.weight.grad is None
    assert rule.uses_labels is False and rule.view_kind is None


def test_latent_options_are_checked():
    from locallearn.rules import build_rule
    from locallearn.schema import RuleConfig

    for name in ("latent-prediction", "token-prediction"):
        with pytest.raises(ValueError, match="rule.options.bogus"):
            build_rule(RuleConfig(name=name, options={"bogus": 1}))
    rule = build_rule(RuleConfig(name="latent-prediction", options={"objective": "stacked"}), s=3)
    assert isinstance(rule, LatentPrediction) and rule.s == 3
    for kw, key in [({"clusters": 1}, "clusters"), ({"tau": 0}, "tau"),
                    ({"sinkhorn_iters": 0}, "sinkhorn_iters"), ({"cluster_weight": -1},
                                                                "cluster_weight")]:
        with pytest.raises(ValueError, match=f"rule.options.{key}"):
            LatentOptions(**kw).validate()


def test_token_prediction_hides_the_last_token_and_trains_by_backprop():
    _, net, x, y, tokens = make(width=10)
    xm, mask, tgt = hide_tokens(x, "last", 0.1, None)
    assert torch.equal(tgt, tokens.long())
    assert mask[:, -1].all() and not mask[:, :-1].any()
    assert torch.allclose(xm[:, :, -1], torch.full_like(xm[:, :, -1], 6**-0.5))
    assert torch.equal(xm[:, :, :-1], x[:, :, :-1])
    rule = TokenPrediction(TokenOptions("last"), seed=0)
    rule.setup(net, x)
    got = grads_of(rule, net, Batch(x, None, None, torch.Generator()))
    # the update is the backprop gradient of the masked-token cross-entropy, every block
    for p in net.parameters():
        p.grad = None
    loss = torch.nn.functional.cross_entropy(rule.head(net.encode(xm).flatten(1)), tgt[:, -1])
    expect = torch.autograd.grad(loss, [b.pre.weight for b in net.blocks])
    for g, e in zip(got, expect):
        assert torch.allclose(g, e, atol=1e-12) and g.abs().sum() > 0
    assert net.readout.weight.grad is None  # the class read-out is fitted afterwards
    # the hidden token cannot leak: changing it leaves the loss unchanged
    x2 = x.clone()
    x2[:, :, -1] = x[:, :, -1].roll(1, 1)
    assert torch.allclose(hide_tokens(x2, "last", 0.1, None)[0], xm)


def test_token_prediction_random_mask():
    _, net, x, _, tokens = make(L=3, width=10)
    g = torch.Generator().manual_seed(0)
    xm, mask, tgt = hide_tokens(x, "random", 0.3, g)
    assert 0.1 < mask.double().mean() < 0.5
    assert torch.allclose(xm.masked_select(mask.unsqueeze(1)), torch.tensor(6**-0.5))
    rule = TokenPrediction(TokenOptions("random", 0.3), seed=0)
    rule.setup(net, x)
    assert rule.head.out_features == 6 * 8
    metrics = rule.compute_grads(net, Batch(x, None, None, torch.Generator().manual_seed(0)))
    assert metrics["loss"] > 0 and net.blocks[0].pre.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="rule.options.p"):
        TokenOptions("random", 1.5).validate()


@pytest.mark.parametrize("preset", ["latent-prediction", "clapp-mask", "token-last"])
def test_label_free_rules_refuse_uniform_inputs(tmp_path, capsys, preset):
    """m = v**(s-1) and n_classes*m = v**s: every string equally likely, one-line error."""
    torch.set_default_dtype(torch.float32)  # runs as a user would (this module uses float64)
    from pathlib import Path

    from locallearn.cli import main

    root = Path(__file__).resolve().parents[1]
    args = ["run", str(root / f"configs/rhm/{preset}.yaml"), "--out", str(tmp_path / "o"),
            "data.v=2", "data.n_classes=2", "data.m=2", "data.L=2", "data.train_size=8",
            "data.test_size=8", "epochs=1", "progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "equally likely" in err and "data.m=2" in err
    # a larger vocabulary (m < v**(s-1)): structure in the inputs, the same rule is accepted
    ok = args[:4] + ["data.v=3"] + args[5:]
    ok[3] = str(tmp_path / "ok")
    try:
        assert main(ok) == 0, capsys.readouterr().err
    finally:
        torch.set_default_dtype(torch.float64)
