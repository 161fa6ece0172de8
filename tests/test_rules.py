"""Every rule's update: autograd (what the rule computes) against its explicit three-factor formula.

For a block with input patches ``x`` (``(N, P, C_in * s)``), pre-activation ``a`` and output
``h = relu(a)``, every rule's weight update has the form

    dW = scale * sum_{n,p} [neuromodulator x dendritic signal x relu'(a)]_{n,:,p} x_{n,p}^T

and the rules differ only in the signal. The formulas below are written out with plain tensor
algebra, independent of the rules' code.
"""

from __future__ import annotations

import pytest
import torch

from locallearn import losses
from locallearn.data.rhm import RHM
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.rules import Backprop, BackpropNoMask, Batch, DirectFeedback, Layerwise
from locallearn.rules.layerwise import sibling_context


def setup_module():
    torch.set_default_dtype(torch.float64)


def teardown_module():
    torch.set_default_dtype(torch.float32)


def make(L=3, width=12, n=16, seed=0):
    rhm = RHM(v=6, n_classes=4, m=3, s=2, L=L, seed_rules=seed)
    data, _ = rhm.sample(n_train=n, seed_sample=seed)
    net = hier_cnn(6, 2, L, width, 4, bias=False, seed=seed).double()
    x = rhm.one_hot(data.tokens, dtype=torch.float64)
    return rhm, net, x, data.labels, data.tokens


def forward_parts(net, x):
    """Per block: input patches, pre-activation (N, C, P), gates; and the top output."""
    parts = []
    h = x
    for block in net.blocks:
        conv = block.pre
        patches = conv.patches(h)
        w = conv.weight.reshape(conv.weight.shape[0], -1) * conv.scale
        a = (patches @ w.t()).transpose(1, 2)
        parts.append({"patches": patches, "a": a, "gate": (a > 0).double(), "conv": conv})
        h = torch.relu(a)
    return parts, h


def weight_update(part, delta):
    """``scale * sum_{n,p} delta[n,:,p] x[n,p]^T`` reshaped like the conv weight."""
    conv = part["conv"]
    g = torch.einsum("ncp,npk->ck", delta, part["patches"]) * conv.scale
    return g.reshape(conv.weight.shape)


def input_signal(part, delta, gate_for_input=None):
    """``W^T delta`` mapped back to the block's input positions (non-overlapping patches)."""
    conv = part["conv"]
    w = conv.weight.reshape(conv.weight.shape[0], -1) * conv.scale
    dp = torch.einsum("ncp,ck->npk", delta, w)  # (N, P, C_in * s)
    n, p, _ = dp.shape
    c_in, s = conv.weight.shape[1], conv.weight.shape[2]
    return dp.reshape(n, p, c_in, s).permute(0, 2, 1, 3).reshape(n, c_in, p * s)


def readout_error(net, top, y):
    logits = net.readout(top.flatten(1))
    e = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, logits.shape[1]).double()
    return logits, e / len(y)


def grads_of(rule, net, batch):
    for p in list(net.parameters()) + list(rule.parameters()):
        p.grad = None
    rule.compute_grads(net, batch)
    return [None if b.pre.weight.grad is None else b.pre.weight.grad.clone() for b in net.blocks]


def backprop_signal_to_top(net, e):
    ro = net.readout
    return (e @ (ro.weight * ro.scale)).reshape(e.shape[0], -1, 1)


@pytest.mark.parametrize("mask", [True, False], ids=["backprop", "backprop-nomask"])
def test_backprop_rules_match_three_factor_formula(mask):
    rhm, net, x, y, _ = make()
    parts, top = forward_parts(net, x)
    _, e = readout_error(net, top, y)
    signal = backprop_signal_to_top(net, e)  # dL/dh_L
    expect = [None] * len(parts)
    for level in range(len(parts) - 1, -1, -1):
        part = parts[level]
        delta = part["gate"] * signal
        expect[level] = weight_update(part, delta)
        gate_above = part["gate"] if mask else part["gate"].mean(0, keepdim=True)
        signal = input_signal(part, gate_above * signal)
    rule = Backprop() if mask else BackpropNoMask()
    got = grads_of(rule, net, Batch(x, y))
    for g, ex in zip(got, expect):
        assert torch.allclose(g, ex, atol=1e-10, rtol=1e-8)
    # the readout gets its true gradient in both
    ro_expect = e.t() @ top.flatten(1) * net.readout.scale
    assert torch.allclose(net.readout.weight.grad, ro_expect, atol=1e-12)


def test_nomask_differs_from_backprop_below_the_top():
    _, net, x, y, _ = make(seed=1)
    g_bp = grads_of(Backprop(), net, Batch(x, y))
    g_nm = grads_of(BackpropNoMask(), net, Batch(x, y))
    assert torch.allclose(g_bp[-1], g_nm[-1])  # top block: no gate above it
    assert not torch.allclose(g_bp[0], g_nm[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["dfa", "drtp", "sign-dfa"])
def test_direct_feedback_matches_three_factor_formula(kind):
    _, net, x, y, _ = make()
    rule = DirectFeedback(kind, seed=3)
    rule.setup(net, x)
    parts, top = forward_parts(net, x)
    _, e = readout_error(net, top, y)
    n = len(y)
    if kind == "dfa":
        mod = e
    elif kind == "sign-dfa":
        mod = torch.sign(e) / n
    else:
        mod = -torch.nn.functional.one_hot(y, 4).double() / n
    got = grads_of(rule, net, Batch(x, y))
    for level, part in enumerate(parts):
        B = rule.feedback(level)  # (C, P, n_out)
        dendritic = torch.einsum("cpo,no->ncp", B, mod)
        expect = weight_update(part, dendritic * part["gate"])
        assert torch.allclose(got[level], expect, atol=1e-12, rtol=1e-8)
    # the feedback is fixed: a second call uses the same matrices
    again = DirectFeedback(kind, seed=3)
    again.setup(net, x)
    assert torch.equal(again.feedback(0), rule.feedback(0))
    ro_expect = e.t() @ top.flatten(1) * net.readout.scale
    assert torch.allclose(net.readout.weight.grad, ro_expect, atol=1e-12)


def test_direct_feedback_ignores_the_layers_above():
    """Changing the weights of block 2 and 3 leaves block 1's DFA update unchanged."""
    _, net, x, y, _ = make()
    rule = DirectFeedback("dfa", seed=0)
    rule.setup(net, x)
    g1 = grads_of(rule, net, Batch(x, y))[0]
    logits_before = net(x)
    # a change above block 1 that keeps the output error: permute block-2 units consistently
    with torch.no_grad():
        net.blocks[1].pre.weight.mul_(2.0)
        net.blocks[2].pre.weight.mul_(0.5)
    assert torch.allclose(net(x), logits_before)
    g1_after = grads_of(rule, net, Batch(x, y))[0]
    assert torch.allclose(g1, g1_after)
    g_bp = grads_of(Backprop(), net, Batch(x, y))[0]
    assert not torch.allclose(g1, g_bp, atol=1e-6)


def clapp_expect(rule, level, part, z, c, neg):
    """Explicit CLAPP update of one direction (predict z from c)."""
    C = z.shape[1]
    pred = torch.einsum("dc,ncp->ndp", rule.B[level].detach(), c) / C
    u_pos = (z * pred).sum(1)
    u_neg = (z[neg] * pred).sum(1)
    g_pos, g_neg = losses.score_loss_grads(u_pos, u_neg, "hinge")
    n = z.shape[0]
    # gradient w.r.t. z: positive term on the sample itself, negative term on the sample neg
    dz = g_pos.unsqueeze(1) * pred / n
    dz_neg = g_neg.unsqueeze(1) * pred / n
    dz = dz.index_add(0, neg, dz_neg)
    return dz


@pytest.mark.parametrize("view", ["synonyms", "mask"])
def test_layerwise_clapp_matches_three_factor_formula(view):
    from locallearn.data.rhm_views import two_views

    rhm, net, x, y, tokens = make(width=10)
    rule = Layerwise("clapp", view, s=2)
    rule.setup(net, x)
    with torch.no_grad():
        for b in rule.B:
            b.normal_(0, 1.0)
    g = torch.Generator().manual_seed(0)
    v1, v2 = (v.double() for v in two_views(rhm, tokens, view, g))
    got = grads_of(rule, net, Batch(x, None, (v1, v2), g))
    both = torch.cat([v1, v2])
    parts, _ = forward_parts(net, both)
    neg = torch.roll(torch.arange(len(y)), -1)
    for level, part in enumerate(parts):
        z = torch.relu(part["a"])
        z1, z2 = z.chunk(2)
        dz1 = clapp_expect(rule, level, part, z1, z2, neg)
        dz2 = clapp_expect(rule, level, part, z2, z1, neg)
        delta = torch.cat([dz1, dz2]) * part["gate"]  # neuromodulated prediction x relu'
        expect = weight_update(part, delta)
        assert torch.allclose(got[level], expect, atol=1e-10, rtol=1e-8)
        assert rule.B[level].grad is not None and rule.B[level].grad.abs().sum() > 0


def test_layerwise_siblings_formula_and_top_block():
    rhm, net, x, y, _ = make(width=10)
    rule = Layerwise("clapp", "siblings", s=2)
    rule.setup(net, x)
    with torch.no_grad():
        for b in rule.B:
            b.normal_(0, 1.0)
    got = grads_of(rule, net, Batch(x, None, None, torch.Generator()))
    parts, _ = forward_parts(net, x)
    neg = torch.roll(torch.arange(len(y)), -1)
    for level, part in enumerate(parts[:-1]):
        z = torch.relu(part["a"])
        c = sibling_context(z, 2)
        expect = weight_update(part, clapp_expect(rule, level, part, z, c, neg) * part["gate"])
        assert torch.allclose(got[level], expect, atol=1e-10, rtol=1e-8)
    # the top block has one position and no siblings: no update
    assert net.blocks[-1].pre.weight.grad is None


def test_sibling_context():
    z = torch.arange(2 * 1 * 6, dtype=torch.float64).reshape(2, 1, 6)
    c = sibling_context(z, 3)
    # position 0's siblings are 1 and 2
    assert c[0, 0, 0] == (1 + 2) / 2 and c[0, 0, 4] == (3 + 5) / 2


@pytest.mark.parametrize("loss", ["infonce", "vicreg"])
def test_layerwise_losses_are_local(loss):
    """Each block's update equals the autograd gradient of its own loss on detached input."""
    from locallearn.data.rhm_views import two_views

    rhm, net, x, y, tokens = make(width=10)
    rule = Layerwise(loss, "synonyms", s=2)
    rule.setup(net, x)
    with torch.no_grad():
        for b in rule.B:  # (zero at initialisation: the first step only trains B)
            b.normal_(0, 1.0)
    g = torch.Generator().manual_seed(1)
    views = tuple(v.double() for v in two_views(rhm, tokens, "synonyms", g))
    got = grads_of(rule, net, Batch(x, None, views, g))
    h = torch.cat(views)
    for level, block in enumerate(net.blocks):
        w = block.pre.weight
        z = block(h.detach())
        z1, z2 = z.chunk(2)
        block_loss = rule.block_loss(level, z1, z2, Batch(x, None, views, g))
        (expect,) = torch.autograd.grad(block_loss, w)
        assert torch.allclose(got[level], expect, atol=1e-10)
        h = z.detach()
    assert all(gr.abs().sum() > 0 for gr in got)


def test_layerwise_never_sees_labels_and_skips_readout():
    rhm, net, x, y, tokens = make()
    rule = Layerwise("clapp", "siblings", s=2)
    rule.setup(net, x)
    params = rule.trained_parameters(net)
    assert all(p is not net.readout.weight for p in params)
    rule.compute_grads(net, Batch(x, None, None, torch.Generator()))
    assert net.readout.weight.grad is None


def test_bad_rule_options():
    for kwargs, key in [(dict(loss="x"), "rule.options.loss"),
                        (dict(view="y"), "rule.options.view"), (dict(f="z"), "rule.options.f"),
                        (dict(negatives="w"), "rule.options.negative_image")]:
        with pytest.raises(ValueError, match=key):
            Layerwise(**kwargs)
    with pytest.raises(ValueError, match="dfa, drtp, sign-dfa"):
        DirectFeedback("nope")


@pytest.mark.parametrize("loss", ["clapp", "vicreg"])
def test_per_block_synonym_views(loss):
    """Each block learns from its own pair of views, passed through the blocks below."""
    from locallearn.data.rhm_views import block_view_pairs

    rhm, net, x, y, tokens = make(width=10)
    rule = Layerwise(loss, "synonyms-per-block", s=2)
    rule.setup(net, x)
    with torch.no_grad():
        for b in rule.B:
            b.normal_(0, 1.0)
    g = torch.Generator().manual_seed(2)
    pairs = [tuple(v.double() for v in p) for p in block_view_pairs(rhm, tokens, g)]
    lat = [rhm.latents(p[0].argmax(1)) for p in pairs]
    lat2 = [rhm.latents(p[1].argmax(1)) for p in pairs]
    # pair of block l shares the latents at depth <= L - l
    for block in range(1, 4):
        for d in range(0, 3 - block + 1):
            assert torch.equal(lat[block - 1][d], lat2[block - 1][d])
    batch = Batch(x, None, None, g, pairs)
    got = grads_of(rule, net, batch)
    for level, block in enumerate(net.blocks):
        h = torch.cat(pairs[level])
        with torch.no_grad():
            for below in net.blocks[:level]:
                h = below(h)
        z1, z2 = block(h).chunk(2)
        (expect,) = torch.autograd.grad(rule.block_loss(level, z1, z2, batch), block.pre.weight)
        assert torch.allclose(got[level], expect, atol=1e-10)
