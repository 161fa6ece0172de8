"""Tests of the image SSL rules (locallearn.rules.image_ssl).

The contract: each rule's update, computed by autograd, equals its explicit three-factor form
(neuromodulator x dendritic prediction pooled back x Hebbian term), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locallearn.eval.memory import saved_activation_meter
from locallearn.nets.base import Block, BlockNet
from locallearn.nets.vgg import vgg6
from locallearn.rules import build_rule, registered
from locallearn.rules.base import Batch
from locallearn.rules.image_bp import BPSSL
from locallearn.rules.image_explicit import explicit_grads
from locallearn.rules.image_grid import pool_flat
from locallearn.rules.image_local import FFRule, LocalImageRule
from locallearn.schema import RuleConfig

SIDE = 16
WIDTH = 1 / 32  # 4-8-8-16-32-32 channels


def _views(n: int = 4, side: int = SIDE, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # positive inputs keep a good share of the ReLUs open at every block
    v1 = torch.rand(n, 3, side, side, generator=g, dtype=dtype)
    v2 = (v1 + 0.3 * torch.rand(n, 3, side, side, generator=g, dtype=dtype)).clamp(0, 1)
    return v1, v2


def _setup(rule, net, v1, randomise_b: bool = True, seed: int = 0):
    rule.setup(net, v1)
    rule.to(v1.dtype)
    if randomise_b:  # B starts at zero; a random B exercises every term of the formula
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in rule.parameters():  # scores of order one: the hinge is active
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 3.0 / p.shape[-1])
    return rule


def _net(seed: int = 1, dtype=torch.float64) -> BlockNet:
    return vgg6(WIDTH, seed=seed).to(dtype)


def _named(net, rule):
    out = {f"net.{k}": p for k, p in net.named_parameters()}
    out.update({f"rule.{k}": p for k, p in rule.named_parameters()})
    return out


def _autograd(rule, net, batch):
    for p in list(net.parameters()) + list(rule.parameters()):
        p.grad = None
    rule.compute_grads(net, batch)
    return {k: (p.grad.clone() if p.grad is not None else None)
            for k, p in _named(net, rule).items()}


def _assert_close(expected: dict, got: dict) -> None:
    for key, value in expected.items():
        assert got[key] is not None, key
        scale = float(value.abs().max())
        if not key.endswith("bias"):  # a bias update may vanish (pos and neg terms cancel)
            assert scale > 0, f"{key}: the explicit update is zero"
        err = float((got[key] - value).abs().max())
        assert err <= 1e-5 * scale + 1e-14, f"{key}: error {err:.2e} of {scale:.2e}"


@pytest.mark.parametrize("context", ["same", "top", "both"])
@pytest.mark.parametrize("f", ["hinge", "softplus", "linear", "softplus-diff"])
def test_layerwise_three_factor_form_matches_autograd(context, f):
    net = _net()
    v1, v2 = _views()
    rule = _setup(LocalImageRule(context, "auto", f, "next"), net, v1)
    batch = Batch(v1, None, (v1, v2), torch.Generator().manual_seed(0))
    expected = explicit_grads(rule, net, batch)
    got = _autograd(rule, net, batch)
    n_params = 12 + len(list(rule.parameters()))
    assert len(expected) == n_params  # every encoder weight, bias and B
    _assert_close(expected, got)


def test_ff_three_factor_form_matches_autograd():
    net = _net()
    v1, v2 = _views()
    rule = _setup(FFRule("auto", "softplus", "next"), net, v1)
    assert rule.name == "ff" and rule.identity_b
    assert list(rule.parameters()) == []  # B is the identity, nothing to learn
    batch = Batch(v1, None, (v1, v2), torch.Generator().manual_seed(0))
    _assert_close(explicit_grads(rule, net, batch), _autograd(rule, net, batch))


def test_random_negatives_three_factor_form_matches_autograd():
    net = _net()
    v1, v2 = _views(n=6)
    rule = _setup(LocalImageRule("same", "auto", "hinge", "random"), net, v1)
    def batch() -> Batch:  # the same generator state: the same random negatives
        return Batch(v1, None, (v1, v2), torch.Generator().manual_seed(5))

    expected = explicit_grads(rule, net, batch())
    got = _autograd(rule, net, batch())
    _assert_close(expected, got)


def test_bp_clapp_top_block_is_three_factor_and_lower_blocks_get_backprop():
    net = _net()
    v1, v2 = _views()
    rule = _setup(BPSSL("clapp", "auto", "hinge", "next"), net, v1)
    batch = Batch(v1, None, (v1, v2), torch.Generator().manual_seed(0))
    expected = explicit_grads(rule, net, batch)
    assert set(expected) == {"net.blocks.5.pre.weight", "net.blocks.5.pre.bias", "rule.B.0"}
    got = _autograd(rule, net, batch)
    _assert_close(expected, got)
    # the lower blocks learn from the top loss through backprop (not from a local loss)
    assert float(got["net.blocks.0.pre.weight"].abs().max()) > 0


@pytest.mark.parametrize(("score_norm", "s"), [("none", 1.0), ("dims", 1.0 / 12.0)])
def test_three_factor_form_on_a_small_conv_block_written_out(score_norm, s):
    """One conv block, grid pooling 2 on a 4x4 map, the formula written out term by term.

    ``s``: the score scale (``dims``: 1 / sqrt(D_z D_c), D = 3 channels x 2 x 2 cells).
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    net = BlockNet([Block(conv, nn.ReLU())])
    n = 3
    v1 = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    v2 = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    rule = LocalImageRule("same", [2], "hinge", "next", score_norm=score_norm)
    _setup(rule, net, v1)
    B = rule.B_same[0]
    got = _autograd(rule, net, Batch(v1, None, (v1, v2), None))
    # explicit: dW[o, i, kh, kw] = s/2n sum_anchors gamma * (P^T B c)[o, y, x]
    #           * relu'(a[o, y, x]) * xpad[i, y + kh, x + kw]
    # rows [view 1; view 2]; anchor r: context row r + n, negative row r + 1 (mod 2n; the paper
    # code's pairing: the last image of a view meets the other view of image 0)
    dW = torch.zeros_like(conv.weight)
    db = torch.zeros_like(conv.bias)
    x = torch.cat([v1, v2])
    a = conv(x).detach()
    # pooled maps flattened position-major: (grid row, grid column, channel)
    p = F.avg_pool2d(torch.relu(a), 2).permute(0, 2, 3, 1).flatten(1)
    xpad = F.pad(x, (1, 1, 1, 1))
    for r in range(2 * n):
        pos, neg = r, (r + 1) % (2 * n)
        pred = (B @ p[(r + n) % (2 * n)]).detach()
        u_pos, u_neg = s * p[pos] @ pred, s * p[neg] @ pred
        gammas = ((pos, -float(u_pos < 1)), (neg, float(-u_neg < 1)))  # f'(u), -f'(-u)
        for k, gamma in gammas:
            dend = pred.reshape(2, 2, 3).permute(2, 0, 1)
            dend = dend.repeat_interleave(2, 1).repeat_interleave(2, 2) / 4
            gate = (a[k] > 0).double()
            post = gamma * dend * gate * s / (2 * n)  # (3, 4, 4)
            for kh in range(3):
                for kw in range(3):
                    patch = xpad[k, :, kh:kh + 4, kw:kw + 4]  # (2, 4, 4)
                    dW[:, :, kh, kw] += torch.einsum("oyx,iyx->oi", post, patch)
            db += post.sum((1, 2))
    for key, value in (("net.blocks.0.pre.weight", dW), ("net.blocks.0.pre.bias", db)):
        assert float(value.abs().max()) > 0
        assert torch.allclose(got[key], value, rtol=1e-5, atol=1e-10), key


def test_block_by_block_equals_summed_backward():
    net = _net()
    v1, v2 = _views()
    grads = {}
    for step in ("block", "summed"):
        rule = _setup(LocalImageRule("both", "auto", "hinge", "next", step=step), net, v1)
        grads[step] = _autograd(rule, net, Batch(v1, None, (v1, v2), None))
    for key, value in grads["block"].items():
        assert value is not None and float(value.abs().max()) > 0, key
        assert torch.allclose(value, grads["summed"][key], rtol=1e-10, atol=1e-12), key


def test_grid_pool_size_one_differs_from_global_pooling():
    net = _net()
    v1, v2 = _views()
    out = {}
    for pool in ([1] * 6, "global"):
        rule = LocalImageRule("same", pool, "hinge", "next", score_norm="dims")
        _setup(rule, net, v1, randomise_b=False)
        with torch.no_grad():
            for B in rule.B_same:  # the same kind of B: identity (scaled) on each pooled size
                B.copy_(torch.eye(B.shape[0], dtype=B.dtype))
        got = _autograd(rule, net, Batch(v1, None, (v1, v2), None))
        out[str(pool)] = got["net.blocks.1.pre.weight"]
        assert float(out[str(pool)].abs().max()) > 0
        assert rule.dims[1] == (8 * 64 if pool != "global" else 8)
    a, b = out[str([1] * 6)], out["global"]
    cos = float(F.cosine_similarity(a.flatten(), b.flatten(), 0))
    assert cos < 0.99


def test_block_by_block_holds_less_activation_memory():
    net = vgg6(1 / 16, seed=0)
    v1, v2 = _views(n=8, side=32, dtype=torch.float32)
    peaks = {}
    for name, rule in (
        ("block", LocalImageRule("same", "auto", "hinge", "next", step="block")),
        ("summed", LocalImageRule("same", "auto", "hinge", "next", step="summed")),
        ("bp", BPSSL("clapp")),
    ):
        rule.setup(net, v1)
        with saved_activation_meter(net, rule) as meter:
            rule.compute_grads(net, Batch(v1, None, (v1, v2), None))
        assert meter.current_bytes == 0  # every graph was freed
        peaks[name] = meter.peak_bytes
    assert 0 < peaks["block"] < 0.6 * peaks["summed"]
    assert peaks["block"] < 0.6 * peaks["bp"]


def test_micro_batches_hold_the_memory_of_one_part():
    net = vgg6(1 / 16, seed=0)
    v1, v2 = _views(n=8, side=32, dtype=torch.float32)
    peaks = {}
    for parts in (1, 2, 4):
        rule = LocalImageRule("same", "auto", "hinge", "next", micro_batches=parts)
        rule.setup(net, v1)
        with saved_activation_meter(net, rule) as meter:
            rule.compute_grads(net, Batch(v1, None, (v1, v2), None))
        assert meter.current_bytes == 0
        peaks[parts] = meter.peak_bytes
    assert 0 < peaks[4] < 0.3 * peaks[1]
    assert peaks[2] < 0.55 * peaks[1]


@pytest.mark.parametrize("negatives", ["next", "random"])
def test_bp_clapp_micro_batches_give_the_same_gradients(negatives):
    net = _net()
    v1, v2 = _views(n=5)
    grads, values = {}, {}
    for parts in (1, 2, 5):
        rule = _setup(BPSSL("clapp", "auto", "hinge", negatives, micro_batches=parts), net, v1)
        batch = Batch(v1, None, (v1, v2), torch.Generator().manual_seed(3))
        for p in list(net.parameters()) + list(rule.parameters()):
            p.grad = None
        values[parts] = rule.compute_grads(net, batch)["loss"]
        grads[parts] = {k: p.grad.clone() for k, p in _named(net, rule).items()}
        assert values[parts] > 0
    for parts in (2, 5):
        assert values[parts] == pytest.approx(values[1], rel=1e-10)
        for key, value in grads[1].items():
            assert float(value.abs().max()) > 0 or key.endswith("bias"), key
            assert torch.allclose(grads[parts][key], value, rtol=1e-10, atol=1e-13), (parts, key)


@pytest.mark.parametrize(
    ("kind", "context", "negatives", "step"),
    [
        ("clapp", "same", "next", "block"),
        ("clapp", "top", "next", "block"),
        ("clapp", "both", "random", "block"),
        ("clapp", "same", "random", "summed"),
        ("ff", "same", "next", "block"),
    ],
)
def test_micro_batches_give_the_same_gradients(kind, context, negatives, step):
    net = _net()
    v1, v2 = _views(n=5)
    grads, losses_ = {}, {}
    for parts in (1, 3, 5):
        if kind == "ff":
            rule = FFRule("auto", "softplus", negatives, step, micro_batches=parts)
        else:
            rule = LocalImageRule(context, "auto", "hinge", negatives, step, micro_batches=parts)
        _setup(rule, net, v1)
        g = torch.Generator().manual_seed(3)  # the same random negatives for every split
        batch = Batch(v1, None, (v1, v2), g)
        for p in list(net.parameters()) + list(rule.parameters()):
            p.grad = None
        losses_[parts] = rule.compute_grads(net, batch)
        grads[parts] = {k: p.grad.clone() for k, p in _named(net, rule).items()}
    for parts in (3, 5):
        for key, value in grads[1].items():
            if not key.endswith("bias"):  # a bias update may vanish (pos and neg cancel)
                assert float(value.abs().max()) > 0, key
            assert torch.allclose(grads[parts][key], value, rtol=1e-10, atol=1e-13), (parts, key)
        for key, value in losses_[1].items():
            assert losses_[parts][key] == pytest.approx(value, rel=1e-10, abs=1e-13), key


def test_infonce_loss_and_gradients():
    net = vgg6(1 / 16, seed=0)
    v1, v2 = _views(n=6, side=32, dtype=torch.float32)
    rule = BPSSL("infonce", temperature=0.1)
    rule.setup(net, v1)
    assert rule.projection.weight.shape == (64, 64)  # 1024 -> 1024 scaled by the width
    metrics = rule.compute_grads(net, Batch(v1, None, (v1, v2), None))
    with torch.no_grad():
        e = F.normalize(rule.projection(net.encode(torch.cat([v1, v2])).mean((2, 3))), dim=1)
        cos = e[:6] @ e[6:].t() / 0.1  # a direct log-softmax over both directions
        expected = -0.5 * ((cos.diag() - cos.logsumexp(1)).mean()
                           + (cos.diag() - cos.logsumexp(0)).mean())
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    for p in list(net.parameters()) + list(rule.parameters()):
        assert p.grad is not None and float(p.grad.abs().max()) > 0


def test_rules_are_registered_and_label_free():
    for name in ("clapp-image", "ff", "bp-ssl", "infonce-image"):
        assert name in registered()
        rule = build_rule(RuleConfig(name=name))
        assert rule.name == name
        assert rule.view_kind == "ssl"
        assert rule.uses_labels is False
    rule = build_rule(RuleConfig(name="clapp-image", options={"context": "both", "step": "summed",
                                                                "pool": [4, 4, 4, 2, 2, 1]}))
    assert rule.context == "both" and rule.step == "summed"


@pytest.mark.parametrize(
    ("name", "extra", "match"),
    [
        ("clapp-image", {"options": {"contxt": "top"}}, "unknown config key 'rule.options.contxt'"),
        ("clapp-image", {"options": {"context": "up"}}, "rule.options.context='up' is invalid"),
        ("clapp-image", {"options": {"pool": "grid"}}, "rule.options.pool='grid' is invalid"),
        ("clapp-image", {"options": {"pool": [4, 0]}}, "pool sizes must be >= 1"),
        ("clapp-image", {"options": {"f": "cubic"}}, "rule.options.f='cubic' is invalid"),
        ("clapp-image", {"options": {"negative_image": "all"}},
         "rule.options.negative_image='all' is invalid"),
        ("ff", {"options": {"context": "top"}}, "unknown config key 'rule.options.context'"),
        ("bp-ssl", {"options": {"loss": "vicreg"}}, "rule.options.loss='vicreg' is invalid"),
        ("bp-ssl", {"options": {"projection_dim": 0}}, "projection_dim=0 is invalid"),
        ("bp-ssl", {"options": {"loss": "infonce", "temperature": 0.0}},
         "rule.options.temperature=0.0 is invalid"),
        ("clapp-image", {"options": {"micro_batches": 0}}, "micro_batches=0 is invalid"),
        ("ff", {"options": {"micro_batches": -1}}, "micro_batches=-1 is invalid"),
        ("clapp-image", {"options": {"f": "softplus-diff", "micro_batches": 2}},
         "does not fit rule.options.f=softplus-diff"),
        ("bp-ssl", {"options": {"loss": "infonce", "micro_batches": 2}},
         "micro_batches > 1 needs rule.options.loss=clapp"),
    ],
)
def test_bad_options_are_one_line_errors(name, extra, match):
    with pytest.raises(ValueError, match=match) as info:
        build_rule(RuleConfig(name=name, **extra))
    assert "\n" not in str(info.value)


def test_pool_sizes_must_fit_the_maps():
    net = vgg6(1 / 32)
    v1, _ = _views(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"pool\[0\]=3 does not divide"):
        LocalImageRule("same", [3, 1, 1, 1, 1, 1]).setup(net, v1)
    with pytest.raises(ValueError, match="lists 2 pool sizes"):
        LocalImageRule("same", [1, 1]).setup(net, v1)
    with pytest.raises(ValueError, match="at least 2 images"):
        rule = LocalImageRule()
        rule.setup(net, v1)
        rule.compute_grads(net, Batch(v1[:1], None, (v1[:1], v1[:1]), None))


def test_pool_flat_is_grid_average():
    z = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert pool_flat(z, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert pool_flat(z, 4).tolist() == [[7.5]]
    # two channels: position-major order (cell 0 of both channels, then cell 1, ...)
    z2 = torch.stack([z[0, 0], 100 + z[0, 0]])[None]
    assert pool_flat(z2, 2).tolist() == [[2.5, 102.5, 4.5, 104.5, 10.5, 110.5, 12.5, 112.5]]
    # the flat view of a channels-last map is taken without a copy
    cl = z2.contiguous(memory_format=torch.channels_last)
    assert pool_flat(cl, 1).data_ptr() == cl.data_ptr()


@pytest.mark.parametrize("context", ["same", "top", "both"])
def test_reference_rule_is_the_top_loss_backpropagated(context):
    from locallearn.eval.alignment import alignment

    net = _net()
    v1, v2 = _views()
    rule = _setup(LocalImageRule(context, "auto", "hinge", "random"), net, v1)
    reference = rule.reference_rule()
    assert reference.name == "top-loss-backprop(clapp-image)" and list(reference.parameters()) == []
    rows = alignment(rule, net, [Batch(v1, None, (v1, v2), torch.Generator().manual_seed(2))])
    assert rows[-1]["cosine_mean"] == pytest.approx(1.0, abs=1e-9)  # top block: the same update
    assert all(-1.0 <= r["cosine_mean"] < 1.0 - 1e-6 for r in rows[:-1])
    bp = BPSSL("clapp")
    assert bp.reference_rule() is bp


@pytest.mark.parametrize("context", ["same", "both"])
def test_reference_rule_takes_the_micro_batches_of_its_rule(context):
    net = _net()
    v1, v2 = _views(n=5)
    grads = {}
    for parts in (1, 3):
        rule = _setup(LocalImageRule(context, "auto", "hinge", "random", micro_batches=parts),
                      net, v1)
        grads[parts] = _autograd(rule.reference_rule(), net,
                                 Batch(v1, None, (v1, v2), torch.Generator().manual_seed(4)))
    for key, value in grads[1].items():
        if value is None:  # parameters of the local rule the top loss does not use
            assert grads[3][key] is None, key
            continue
        assert key.endswith("bias") or float(value.abs().max()) > 0, key
        assert torch.allclose(grads[3][key], value, rtol=1e-10, atol=1e-13), key
