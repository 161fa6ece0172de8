"""Tests of ``lpl`` (locallearn.rules.lpl): latent predictive learning, block by block.

``tests/data/lpl_golden.json`` holds per-layer loss terms and gradients computed by running the
authors' public code (commit 0210f55) in float64 on a seeded VGG-11 and seeded views (its
``about`` field says exactly how; ``tests/data/make_lpl_golden.py`` made it). The preset's rule
must give the same terms and gradients to float64 rounding, for each term alone, for their
default weighting, and without pooling. Further: the update equals the autograd gradient of the
written-out loss of each block alone and the explicit three-factor product (a factor per unit and
image, routed through the max-pool, gated by the ReLU, times the input), a pipelined run (blocks
in ranges) does the same arithmetic, the top block's reference is that loss backpropagated through
every block, bad options are one-line errors, and a run trains, aligns and probes VGG-11.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from golden import check_stats as _check
from torch import nn

from locallearn.config import load_yaml
from locallearn.eval.alignment import alignment
from locallearn.nets.vgg import VGG11_PLAN, vgg11
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.rules.lpl import LPL
from locallearn.schema import ProbeConfig, RuleConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "configs" / "images"
GOLDEN = json.loads((ROOT / "tests" / "data" / "lpl_golden.json").read_text())
TERMS = ("pull", "push", "decorr")


def _golden_setup() -> tuple[nn.Module, Batch]:
    """The golden file's network (scaled by its gains) and views, in float64."""
    n, side = GOLDEN["n_images"], GOLDEN["side"]
    net = vgg11(GOLDEN["width_mult"], seed=0).double()
    with torch.no_grad():
        for block, gain in zip(net.blocks, GOLDEN["gains"]):
            block.pre.weight.mul_(gain)
            block.pre.bias.mul_(gain)
    g = torch.Generator().manual_seed(1)
    v1 = torch.randn(n, 3, side, side, generator=g, dtype=torch.float64)
    v2 = v1 + 0.5 * torch.randn(n, 3, side, side, generator=g, dtype=torch.float64)
    return net, Batch(v1, None, (v1, v2), None)


def _preset_rule(options: dict | None = None) -> LPL:
    """The rule of ``configs/images/lpl.yaml`` (its rule section as written), options added."""
    section = load_yaml(IMAGES / "lpl.yaml")["rule"]
    section["options"] = {**section.get("options", {}), **(options or {})}
    rule = build_rule(RuleConfig(**section), 0)
    assert isinstance(rule, LPL)
    return rule




def _grads(net, rule, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    for p in net.parameters():
        p.grad = None
    metrics = rule.compute_grads(net, batch)
    return metrics, {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("case", list(GOLDEN["cases"]))
def test_terms_and_gradients_match_the_authors_code(case):
    ref = GOLDEN["cases"][case]
    pull, push, decorr = ref["coefficients"]
    options = {"pull": pull, "push": push, "decorr": decorr,
               "pooling": "none" if ref["no_pooling"] else "global"}
    if case == "global":
        options = {}  # the preset's defaults are the code's
    net, batch = _golden_setup()
    rule = _preset_rule(options)
    rule.setup(net, batch.x)
    metrics, grads = _grads(net, rule, batch)
    n_blocks = len(net.blocks)
    for term in TERMS:
        got = [metrics[f"{term}_block{level + 1}"] for level in range(n_blocks)]
        assert got == pytest.approx(ref[term], rel=1e-9, abs=1e-12), term
    assert metrics["loss"] == pytest.approx(ref["total"], rel=1e-9)
    for name, g in grads.items():
        assert float(g.abs().max()) > 0, name
        _check(ref["grads"][name], g, f"{case}: {name}")


def test_the_published_decorrelation_formula_does_not_match():
    # break-on-purpose: the paper's first formula (squared products summed sample by sample,
    # which the erratum replaced) gives other numbers, so the test above can fail
    net, batch = _golden_setup()
    ref = GOLDEN["cases"]["global"]["decorr"]
    h = torch.cat(batch.views)
    with torch.no_grad():
        for level, block in enumerate(net.blocks):
            h = block(h)
            published = []
            for z in h.mean(dim=(2, 3)).chunk(2):
                sq = (z - z.mean(0)) ** 2
                b, c = z.shape
                pairs = (sq.sum(1) ** 2 - (sq ** 2).sum(1)).sum()  # sum_b sum_{i != k}
                published.append(pairs / ((b - 1) * (c * c - c)))
            assert float(sum(published)) / 2 != pytest.approx(ref[level], rel=1e-2)


def _written_out(z: torch.Tensor, pooling: str, eps: float = 1e-4) -> list[torch.Tensor]:
    """The three terms written out with the true batch mean (not detached) and explicit loops
    over the channel pairs of the covariance, from the block's output ``z`` (views stacked)."""
    if pooling == "global":
        z = z.mean(dim=(2, 3))
    a, b = z.chunk(2)
    pull = ((a - b) ** 2).sum() / a.numel()

    def hebb(x):
        var = ((x - x.mean(0)) ** 2).sum(0) / (x.shape[0] - 1)
        return -torch.log(var + eps).mean()

    def dec(x):
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        xc = x - x.mean(0)
        c = x.shape[1]
        total = x.new_zeros(())
        for j in range(c):
            for k in range(c):
                if j != k:
                    total = total + ((xc[:, j] * xc[:, k]).sum() / (x.shape[0] - 1)) ** 2
        return total / (c * c - c)

    return [pull, 0.5 * (hebb(a) + hebb(b)), 0.5 * (dec(a) + dec(b))]


@pytest.mark.parametrize("pooling", ["global", "none"])
def test_each_block_learns_from_its_own_loss_only(pooling):
    net = vgg11(1 / 16, seed=3).double()
    batch = _golden_setup()[1]
    v1, v2 = batch.views
    rule = LPL(pull=0.5, push=2.0, decorr=3.0, pooling=pooling)
    rule.setup(net, v1)
    metrics, got = _grads(net, rule, batch)
    h = torch.cat([v1, v2])
    total = 0.0
    for level, block in enumerate(net.blocks):
        z = block(h.detach())
        terms = _written_out(z, pooling)
        loss = 0.5 * terms[0] + 2.0 * terms[1] + 3.0 * terms[2]
        expect = torch.autograd.grad(loss, list(block.parameters()))
        for (name, _), e in zip(block.named_parameters(), expect):
            key = f"blocks.{level}.{name}"
            assert torch.allclose(got[key], e, rtol=1e-9, atol=1e-13), key
        for term, value in zip(TERMS, terms):
            got_term = metrics[f"{term}_block{level + 1}"]
            assert got_term == pytest.approx(float(value.detach()), rel=1e-10)
        total += float(loss.detach())
        h = z
    assert metrics["loss"] == pytest.approx(total, rel=1e-10)
    assert metrics["decorr"] == pytest.approx(
        sum(metrics[f"decorr_block{i}"] for i in range(1, 9)), rel=1e-12)


@pytest.mark.parametrize("cuts", [(3,), (1, 5), (2, 4, 7)])
def test_blocks_in_ranges_do_the_arithmetic_of_one_process(cuts):
    net, batch = _golden_setup()
    rule = _preset_rule()
    rule.setup(net, batch.x)
    whole, expect = _grads(net, rule, batch)
    for p in net.parameters():
        p.grad = None
    carry = rule.start_carry(net, batch)
    edges = [0, *cuts, len(net.blocks)]
    parts: dict[str, float] = {}
    for start, stop in zip(edges, edges[1:]):
        metrics, carry = rule.blocks_grads(net, carry, start, stop)
        parts.update(metrics)
    assert parts == whole  # the same numbers, bit for bit
    for name, p in net.named_parameters():
        assert torch.equal(p.grad, expect[name]), name
    # frozen blocks pass their output on without gradients and without adding to the losses
    for p in net.parameters():
        p.grad = None
    frozen = rule.frozen_carry(net, rule.start_carry(net, batch), 0, 3)
    assert all(p.grad is None for p in net.parameters())
    assert frozen["loss"] == 0.0
    metrics, _ = rule.blocks_grads(net, frozen, 3, len(net.blocks))
    assert metrics["loss_block4"] == whole["loss_block4"]
    assert torch.equal(net.blocks[3].pre.weight.grad, expect["blocks.3.pre.weight"])


def _factor(z: torch.Tensor, w: tuple[float, float, float], eps: float = 1e-4) -> torch.Tensor:
    """``dL/dz`` of the pooled outputs ``z`` (views stacked) by the explicit formula of the module
    docstring: towards the other view, away from the batch mean, against the covariances."""
    n, c = z.shape[0] // 2, z.shape[1]
    other = torch.cat([z[n:], z[:n]])
    out = w[0] * 2 * (z - other) / (n * c)
    for rows in (slice(0, n), slice(n, 2 * n)):
        x = z[rows] - z[rows].mean(0)
        var = (x ** 2).sum(0) / (n - 1)
        cov = (x.t() @ x / (n - 1)).fill_diagonal_(0)
        out[rows] -= w[1] * x / ((n - 1) * (var + eps) * c)
        out[rows] += w[2] * 2 * (x @ cov) / ((n - 1) * (c * c - c))
    return out


def test_update_is_the_explicit_three_factor_rule():
    net, batch = _golden_setup()
    weights = (1.0, 1.0, 10.0)
    rule = LPL(*weights)
    rule.setup(net, batch.x)
    _, got = _grads(net, rule, batch)
    h = torch.cat(batch.views)
    with torch.no_grad():
        for level, block in enumerate(net.blocks):
            a = block.pre(h)  # pre-activation
            r = torch.relu(a)
            pooled = any(isinstance(m, nn.MaxPool2d) for m in block.post.modules())
            y, where = F.max_pool2d(r, 2, return_indices=True) if pooled else (r, None)
            factor = _factor(y.mean(dim=(2, 3)), weights)  # the neuromodulating factor
            dy = (factor / (y.shape[2] * y.shape[3]))[:, :, None, None].expand_as(y)
            dr = F.max_unpool2d(dy, where, 2, output_size=r.shape[2:]) if pooled else dy
            post = dr * (a > 0)  # routed through the max-pool, gated by the ReLU's derivative
            dw = torch.nn.grad.conv2d_weight(h, block.pre.weight.shape, post, padding=1)
            db = post.sum(dim=(0, 2, 3))
            for name, e in (("weight", dw), ("bias", db)):
                key = f"blocks.{level}.pre.{name}"
                scale = float(e.abs().max())
                assert scale > 0, key
                assert torch.allclose(got[key], e, rtol=1e-9, atol=1e-12 * scale), key
            h = y


def test_top_block_reference_backpropagates_the_top_loss():
    net, batch = _golden_setup()
    rule = _preset_rule()
    rule.setup(net, batch.x)
    reference = rule.reference_rule()
    assert reference.name == "top-loss-backprop(lpl)"
    _, ref = _grads(net, reference, batch)
    x = torch.cat(batch.views)
    loss, _ = rule.block_loss(net.encode(x))
    expect = torch.autograd.grad(loss, list(net.parameters()))
    for (name, _), e in zip(net.named_parameters(), expect):
        assert float(e.abs().max()) > 0, name
        assert torch.allclose(ref[name], e, rtol=1e-12, atol=1e-15), name
    rows = alignment(rule, net, [batch])
    assert rows[-1]["cosine_mean"] == pytest.approx(1.0, abs=1e-9)  # top block: the same update
    assert all(r["cosine_mean"] < 1.0 - 1e-6 for r in rows[:-1])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pull": -1.0}, "rule.options.pull=-1.0 is invalid: must be >= 0"),
        ({"decorr": float("nan")}, "rule.options.decorr=nan is invalid"),
        ({"eps": 0.0}, "rule.options.eps=0.0 is invalid: must be > 0"),
        ({"pooling": "grid"}, "rule.options.pooling='grid' is invalid"),
        ({"pool": "global"}, "unknown config key 'rule.options.pool'"),
    ],
)
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as info:
        build_rule(RuleConfig(name="lpl", options=options))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown config key 'rule.options.f'"):
        build_rule(RuleConfig(name="lpl", options={"f": "hinge"}))


def test_bad_batches_and_networks_are_one_line_errors():
    rule = LPL()
    net = vgg11(1 / 16)
    one = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="at least 2 images"):
        rule.compute_grads(net, Batch(one, None, (one, one), None))
    with pytest.raises(ValueError, match="needs two views"):
        rule.compute_grads(net, Batch(torch.zeros(4, 3, 32, 32)))
    with pytest.raises(ValueError, match="block 1 outputs \\(1, 16, 16\\)"):
        rule.setup(vgg11(1 / 64), torch.zeros(2, 3, 32, 32))  # 64/64 = 1 channel
    assert rule.pipeline_refusal() is None
    # data parallel: each rank's part gives its own batch statistics, as for VICReg
    assert rule.data_parallel_refusal() is None


def test_vgg11_follows_the_code_encoder():
    net = vgg11(1.0)
    assert [b.pre.out_channels for b in net.blocks] == [64, 128, 256, 256, 512, 512, 512, 512]
    pools = [any(isinstance(m, nn.MaxPool2d) for m in b.post.modules()) for b in net.blocks]
    assert pools == [True, True, False, True, False, True, False, True]
    assert [c for c, _ in VGG11_PLAN] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(b.pre.bias is not None and b.pre.kernel_size == (3, 3) for b in net.blocks)
    assert sum(p.numel() for p in net.parameters()) == 9_220_480  # VGG-11's conv stack
    sides = [h.shape[-1] for h in net.features(torch.zeros(1, 3, 32, 32))]
    assert sides == [16, 8, 8, 4, 4, 2, 2, 1]  # each block's output is after its max-pool


def test_presets_set_the_paper_protocol():
    if not {"standardize", "blocks"} <= {f.name for f in dataclasses.fields(ProbeConfig)}:
        pytest.skip("probe.standardize and probe.blocks are not in the schema yet")
    cfg = load_config(IMAGES / "lpl.yaml")
    assert cfg.rule.name == "lpl" and cfg.net.kind == "vgg11" and cfg.net.bias
    assert (cfg.batch_size, cfg.epochs) == (1024, 800)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-3, 1.5e-6)
    assert (cfg.optim.schedule, cfg.optim.warmup_epochs) == ("cosine", 10)
    assert cfg.data.views.crop_scale == [0.08, 1.0]
    assert cfg.probe.grid == [1] * 8
    assert (cfg.probe.epochs, cfg.probe.batch_size, cfg.probe.lr) == (20, 512, 1e-3)
    cpu = load_config(IMAGES / "lpl-cpu.yaml")
    assert cpu.rule == cfg.rule and cpu.net.kind == "vgg11" and cpu.device == "cpu"
    assert cpu.net.width_mult == 0.25 and cpu.batch_size == 256


def test_a_run_trains_vgg11_and_probes_every_block(tmp_path, capsys):
    from image_folder import folder_config, write_dataset

    from locallearn import cli

    root = tmp_path / "images"
    write_dataset(root, {"train": 12, "test": 6}, side=32)  # VGG-11 halves 32 px five times
    config = folder_config(tmp_path, root, align_every=1, align_batches=1, **{
        "net.kind": "vgg11", "net.width_mult": 1 / 16, "rule.name": "lpl", "rule.options": {},
        "optim.name": "adam", "optim.lr": 1e-3, "probe.grid": [1] * 8,
        "probe.standardize": "none"})
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == "lpl" and len(summary["probe_block_accuracies"]) == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {f"{t}_block{i}" for t in ("loss", *TERMS) for i in range(1, 9)} <= set(rows[-1])
    assert rows[-1]["align_block8"] == pytest.approx(1.0, abs=1e-5)
