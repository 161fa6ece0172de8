"""LARS and the warm-up cosine schedule (locallearn.optim), checked against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from interrupt import full_and_resumed

from locallearn.experiments.tasks import build_task
from locallearn.optim import LARS, build_optimizer, lars_param_groups, warmup_cosine
from locallearn.schema import load_config
from locallearn.train import Trainer

TINY = [
    "data.v=8", "data.n_classes=4", "data.m=4", "data.L=2", "data.train_size=2P*",
    "data.test_size=40", "net.width=16", "batch_size=16", "progress=false",
    "checkpoint_every=2", "probe.steps=20", "threads=1",
]


def _lars_reference(w, g, v, lr, momentum, wd, eta):
    """One LARS step written out from the formula (float64)."""
    d = g + wd * w
    ratio = eta * w.norm() / d.norm() if w.norm() > 0 and d.norm() > 0 else 1.0
    v = momentum * v + ratio * d
    return w - lr * v, v


@pytest.mark.parametrize("fused", [False, True])
def test_lars_matches_its_formula_and_leaves_biases_plain(fused):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    b0 = torch.randn(4, generator=gen, dtype=torch.float64)
    z0 = torch.zeros(2, 5, dtype=torch.float64)  # a weight of norm zero: ratio 1
    grads = [(torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64),
              torch.randn(4, generator=gen, dtype=torch.float64),
              torch.randn(2, 5, generator=gen, dtype=torch.float64)) for _ in range(3)]
    w, b, z = (torch.nn.Parameter(t.clone()) for t in (w0, b0, z0))
    groups = lars_param_groups([w, b, z])
    assert [len(g["params"]) for g in groups] == [2, 1] and groups[1]["params"][0] is b
    lr, mom, wd, eta = 0.6, 0.9, 1e-2, 0.02
    opt = LARS(groups, lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta,
               fused=fused or None)
    rw, rb, rz = w0.clone(), b0.clone(), z0.clone()
    vw, vb, vz = torch.zeros_like(w0), torch.zeros_like(b0), torch.zeros_like(z0)
    for gw, gb, gz in grads:
        w.grad, b.grad, z.grad = gw.clone(), gb.clone(), gz.clone()
        opt.step()
        rw, vw = _lars_reference(rw, gw, vw, lr, mom, wd, eta)
        rz, vz = _lars_reference(rz, gz, vz, lr, mom, wd, eta)
        vb = mom * vb + gb  # plain SGD momentum: no trust ratio, no decay
        rb = rb - lr * vb
    assert torch.allclose(w.detach(), rw, rtol=1e-12, atol=1e-12)
    assert torch.allclose(b.detach(), rb, rtol=1e-12, atol=1e-12)
    assert torch.allclose(z.detach(), rz, rtol=1e-12, atol=1e-12)
    # the trust ratio matters: plain SGD with decay would have moved the weight elsewhere
    plain = w0 - lr * (grads[0][0] + wd * w0)
    first = w0 - lr * eta * w0.norm() / (grads[0][0] + wd * w0).norm() * (grads[0][0] + wd * w0)
    assert not torch.allclose(plain, first, atol=1e-3)


def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=10, warmup_steps=4)
    assert [f(t) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for t in range(4, 10):
        assert f(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 4) / 6)))
    assert f(10) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)
    g = warmup_cosine(total_steps=5, warmup_steps=0)
    assert g(0) == 1.0 and g(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 5)))


def test_schedule_is_per_step_with_warmup_epochs():
    cfg = load_config(None, TINY + ["optim.name=lars", "optim.lr=0.6", "optim.schedule=cosine",
                                    "optim.warmup_epochs=1.5", "epochs=4"])
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt, sched = build_optimizer(cfg, [p], steps_per_epoch=4)  # 16 steps, 6 of warm-up
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3, 3)
        opt.step()
        sched.step()
    expected = [0.6 * warmup_cosine(16, 6)(t) for t in range(16)]
    assert seen == pytest.approx(expected)
    assert seen[5] == pytest.approx(0.6) and seen[0] == pytest.approx(0.1)


def test_trainer_steps_the_schedule_per_batch(tmp_path):
    cfg = load_config(None, TINY + ["optim.name=sgd", "optim.lr=0.1", "optim.schedule=cosine",
                                    "optim.warmup_epochs=1", "epochs=2"])
    task = build_task(cfg)
    trainer = Trainer(cfg, task, tmp_path)
    steps = task.steps_per_epoch(cfg.batch_size)
    assert steps > 1
    trainer.train_epoch()
    assert trainer.sched.last_epoch == steps
    # after one epoch of warm-up the rate is back at its peak, not at a per-epoch cosine value
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_resume_with_lars_and_warmup_is_bit_identical(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + ["optim.name=lars", "optim.lr=0.6", "optim.schedule=cosine",
                                    "optim.warmup_epochs=1", "optim.weight_decay=1e-4",
                                    "epochs=4", "rule.name=backprop"])
    full, resumed = full_and_resumed(cfg, tmp_path, monkeypatch)
    assert resumed["train_loss"] == full["train_loss"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] > 4


@pytest.mark.parametrize("args, fragment", [
    (["optim.warmup_epochs=2"], "optim.warmup_epochs=2.0 needs optim.schedule=cosine"),
    (["optim.warmup_epochs=-1", "optim.schedule=cosine"], "must be >= 0"),
    (["optim.name=lars", "optim.trust_coefficient=0"], "optim.trust_coefficient=0.0 is invalid"),
    (["optim.name=lamb"], "optim.name"),
    (["optim.name=sgd", "optim.trust_coefficient=0.01"], "applies to optim.name=lars only"),
])
def test_bad_optimiser_options_are_one_line_errors(args, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, TINY + args)
