"""Tests of ``infonce-image`` (locallearn.rules.image_infonce): BP-InfoNCE's loss, layer-wise.

The contract: each block's update is the gradient of its own InfoNCE with its input detached (no
signal from above), the top block's update is BP-InfoNCE's with the same projection, and the rule
runs from its presets through ``locallearn run``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from image_folder import folder_config, write_dataset

from locallearn import cli
from locallearn.eval.alignment import alignment
from locallearn.nets.vgg import vgg6
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.rules.image_bp import BPSSL
from locallearn.rules.image_grid import pool_flat
from locallearn.rules.image_infonce import LayerwiseInfoNCE
from locallearn.schema import RuleConfig, load_config

IMAGES = Path(__file__).resolve().parents[1] / "configs" / "images"


def _batch(n: int = 5, side: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    v1 = torch.rand(n, 3, side, side, generator=g, dtype=torch.float64)
    v2 = (v1 + 0.3 * torch.rand(n, 3, side, side, generator=g, dtype=torch.float64)).clamp(0, 1)
    return Batch(v1, None, (v1, v2), None)


def _built(pool="global", step="block", projection_dim=None, seed=0):
    net = vgg6(1 / 32, seed=1).double()
    rule = LayerwiseInfoNCE(pool, 0.1, projection_dim, step, seed)
    rule.setup(net, _batch().x)
    rule.double()
    return net, rule


def _grads(net, rule, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    params = dict(net.named_parameters()) | {f"rule.{k}": p for k, p in rule.named_parameters()}
    for p in params.values():
        p.grad = None
    metrics = rule.compute_grads(net, batch)
    return metrics, {k: p.grad.clone() for k, p in params.items()}


def _info_nce(e1: torch.Tensor, e2: torch.Tensor, t: float) -> torch.Tensor:
    """InfoNCE written out: a log-softmax over the other view, both directions."""
    cos = F.normalize(e1, dim=1) @ F.normalize(e2, dim=1).t() / t
    return -0.5 * ((cos.diag() - cos.logsumexp(1)).mean() + (cos.diag() - cos.logsumexp(0)).mean())


@pytest.mark.parametrize("pool", ["global", "auto"])
def test_each_block_learns_from_its_own_infonce_only(pool):
    net, rule = _built(pool)
    batch = _batch()
    metrics, got = _grads(net, rule, batch)
    h = torch.cat(batch.views)
    total = 0.0
    for level, block in enumerate(net.blocks):
        z = block(h.detach())
        e1, e2 = rule.projections[level](pool_flat(z, rule.pools[level])).chunk(2)
        loss = _info_nce(e1, e2, 0.1)
        own = list(block.parameters()) + list(rule.projections[level].parameters())
        expect = torch.autograd.grad(loss, own)
        names = [f"blocks.{level}.{k}" for k, _ in block.named_parameters()]
        names += [f"rule.projections.{level}.weight"]
        for name, e in zip(names, expect):
            assert float(e.abs().max()) > 0, name
            assert torch.allclose(got[name], e, rtol=1e-10, atol=1e-14), name
        assert metrics[f"loss_block{level + 1}"] == pytest.approx(float(loss.detach()), rel=1e-12)
        total += float(loss.detach())
        h = z
    assert metrics["loss"] == pytest.approx(total, rel=1e-12)
    assert rule.dims[0] == (4 if pool == "global" else 4 * 8 * 8)  # 4 channels, 8x8 grid


def test_summed_step_gives_the_block_by_block_gradients():
    batch = _batch()
    _, block = _grads(*_built(step="block"), batch)
    _, summed = _grads(*_built(step="summed"), batch)
    for key, value in block.items():
        assert torch.allclose(summed[key], value, rtol=1e-12, atol=1e-15), key


def test_top_block_reference_is_bp_infonce():
    net, rule = _built(projection_dim=8)
    batch = _batch(seed=3)
    reference = rule.reference_rule()
    assert reference.name == "top-loss-backprop(infonce-image)"
    assert list(reference.parameters()) == []  # it shares the rule's projections
    rows = alignment(rule, net, [batch])
    assert rows[-1]["cosine_mean"] == pytest.approx(1.0, abs=1e-9)  # top block: the same update
    assert all(-1.0 <= r["cosine_mean"] < 1.0 - 1e-6 for r in rows[:-1])
    # the reference is BP-InfoNCE itself when it projects with the same matrix
    bp = BPSSL("infonce", temperature=0.1, projection_dim=8)
    bp.setup(net, batch.x)
    bp.double()
    with torch.no_grad():
        bp.projection.weight.copy_(rule.projections[-1].weight)
    _, ref = _grads(net, reference, batch)
    _, end_to_end = _grads(net, bp, batch)
    for key, value in end_to_end.items():
        if key.startswith("blocks."):
            assert float(value.abs().max()) > 0, key
            assert torch.allclose(ref[key], value, rtol=1e-10, atol=1e-14), key


def test_projections_are_seeded_by_the_run_seed():
    _, a = _built(seed=0)
    _, b = _built(seed=0)
    _, c = _built(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.projections[0].weight, c.projections[0].weight)
    assert [tuple(p.shape) for p in a.parameters()] == [(d, d) for d in a.dims]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"options": {"temperature": 0.0}}, "rule.options.temperature=0.0 is invalid"),
        ({"options": {"projection_dim": 0}}, "projection_dim=0 is invalid"),
        ({"options": {"step": "all"}}, "rule.options.step='all' is invalid"),
        ({"options": {"pool": "grid"}}, "rule.options.pool='grid' is invalid"),
        ({"options": {"micro_batches": 2}}, "unknown config key 'rule.options.micro_batches'"),
        ({"options": {"f": "hinge"}}, "unknown config key 'rule.options.f'"),
    ],
)
def test_bad_options_are_one_line_errors(extra, match):
    with pytest.raises(ValueError, match=match) as info:
        build_rule(RuleConfig(name="infonce-image", **extra))
    assert "\n" not in str(info.value)


def test_presets_build_the_rule_as_bp_infonce_pools_and_projects():
    net = vgg6(1.0)
    cfg = load_config(IMAGES / "infonce.yaml")
    rule = build_rule(cfg.rule, 0)
    rule.setup(net, torch.zeros(2, 3, 32, 32))
    assert rule.view_kind == "ssl" and rule.uses_labels is False
    assert rule.pools == [32, 16, 16, 8, 4, 2]  # global pooling of every block
    top = [tuple(p.shape) for p in rule.projections[-1].parameters()]
    assert top == [(1024, 1024)]  # BP-InfoNCE's projection
    cpu = load_config(IMAGES / "infonce-cpu.yaml")
    assert cpu.rule == cfg.rule and cpu.net.width_mult == 0.125
    with pytest.raises(ValueError, match="at least 2 images"):
        one = Batch(torch.zeros(1, 3, 32, 32), None, (torch.zeros(1, 3, 32, 32),) * 2, None)
        rule.compute_grads(net, one)


def test_a_run_trains_probes_and_resumes_as_finished(tmp_path, capsys):
    root = tmp_path / "images"
    write_dataset(root, {"train": 16, "test": 6})
    config = folder_config(tmp_path, root, align_every=1, align_batches=1, **{
        "rule.name": "infonce-image", "rule.options": {}})
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == "infonce-image"
    assert summary["probe_accuracy"] >= 0.9  # the two classes differ in colour
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {f"loss_block{i}" for i in range(1, 7)} <= set(rows[-1])
    assert rows[-1]["align_block6"] == pytest.approx(1.0, abs=1e-5)
    before = (out / "summary.json").stat().st_mtime_ns
    assert cli.main(["run", str(config), "--out", str(out)]) == 0  # finished: nothing redone
    assert (out / "summary.json").stat().st_mtime_ns == before
