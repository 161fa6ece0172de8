"""The fast path: bf16 autocast and compile for the image rules, and ``benchmarks/gpu_check.py``.

The CPU tests check that the options run and what they change; the GPU test skips without one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locallearn.rules.base import Batch
from locallearn.schema import load_config
from locallearn.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("clapp", "clapp++", "clapp++dfb", "clapp++both", "bp-clapp++", "bp-infonce", "ff",
           "infonce")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(preset: str, device: str, *overrides: str) -> Trainer:
    gpu_check = _gpu_check()
    cfg = load_config(ROOT / "configs" / "images" / f"{preset}.yaml",
                      [f"device={device}", "net.width_mult=0.0625", *overrides])
    task = gpu_check.SyntheticCifar(cfg, torch.device(device), 64)
    trainer = Trainer(cfg, task, ROOT / "unused")
    # B starts at zero, where every score is 0, the loss a constant and the encoder's gradient
    # zero: the comparisons take the same random B in every trainer instead
    gen = torch.Generator().manual_seed(7)
    for b, _, _ in trainer.rule.prediction_matrices():
        b.data.copy_(torch.randn(b.shape, generator=gen) / b.shape[1] ** 0.5)
    return trainer


def _grads(trainer: Trainer, batch: Batch) -> tuple[float, list[torch.Tensor]]:
    trainer.opt.zero_grad(set_to_none=True)
    with trainer.autocast():
        loss = trainer.rule.compute_grads(trainer.net, batch)["loss"]
    return loss, [p.grad.clone() for p in trainer.params]


def _batch(trainer: Trainer) -> Batch:
    torch.manual_seed(1)
    return next(trainer.task.batches(torch.Generator().manual_seed(0), 16, "ssl"))


def test_gpu_check_says_no_gpu_in_one_line(monkeypatch, capsys):
    module = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA GPU" in out[0]


def test_gpu_all_says_no_gpu_in_one_line(tmp_path):
    """``benchmarks/gpu_all.sh`` (every GPU check in one command) exits 0 without a GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing ran


def test_gpu_check_runs_its_code_on_the_cpu(capsys):
    module = _gpu_check()
    argv = ["--device", "cpu", "--width", "0.03125", "--steps", "10", "--warmup", "1",
            "--presets", "clapp++", "--precision", "bf16"]
    assert module.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    row = next(r for r in rows if r[0] == "clapp++")
    assert row[1] == "bf16" and float(row[3]) > 0  # pairs/s
    assert float(row[-1]) > 0  # projected hours of 300 epochs


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_trains_every_image_rule(preset):
    # same weights, same views: the bf16 loss is the fp32 one to bf16 rounding, the gradients
    # are stored in fp32 and point the same way (bf16 products round to 3 digits: small
    # gradients of the top blocks at initialisation differ most)
    full = _trainer(preset, "cpu")
    half = _trainer(preset, "cpu", "precision=bf16")
    batch = _batch(full)
    loss32, g32 = _grads(full, batch)
    loss16, g16 = _grads(half, batch)
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32) + 1e-3
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g16)
    a, b = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    encoder = len(full.net.encoder_parameters())
    assert all(float(g.norm()) > 0 for g in g32[:encoder])  # every encoder tensor learns
    assert float((a * b).sum() / (a.norm() * b.norm())) > 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_and_compile_on_the_gpu(preset):
    eager = _trainer(preset, "cuda")
    fast = _trainer(preset, "cuda", "compile=true")
    batch = _batch(eager)
    loss_e, g_e = _grads(eager, batch)
    loss_c, g_c = _grads(fast, batch)
    assert loss_c == pytest.approx(loss_e, rel=1e-3)
    assert all(float(g.norm()) > 0 for g in g_e[:len(eager.net.encoder_parameters())])
    for a, b in zip(g_e, g_c):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-5)
    half = _trainer(preset, "cuda", "precision=bf16")
    loss_h, _ = _grads(half, batch)
    assert loss_h == pytest.approx(loss_e, rel=0.05)


def test_prediction_gradient_takes_fp32_scores_beside_bf16_products():
    # CUDA's autocast sums in fp32 and multiplies in bf16; CPU autocast gives the same mix when
    # the pooled outputs are fp32: B's explicit gradient must gather in fp32, as autograd's
    from locallearn.rules.image_ssl import ImageSSLRule
    from locallearn.rules.ssl_pairs import PredictionGrads, pair_terms, paper_negative_rows

    trainer = _trainer("clapp++", "cpu")
    rule = trainer.rule
    assert isinstance(rule, ImageSSLRule)
    n, d = 6, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2 * n, d, generator=gen)
    c = torch.rand(2 * n, d, generator=gen)
    terms = pair_terms(n, paper_negative_rows(n, torch.device("cpu")))
    grads = {}
    for mode in ("autograd", "explicit"):
        B = torch.nn.Parameter(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
        b_grads = PredictionGrads() if mode == "explicit" else None
        p = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = rule.pair_loss(p, c, B, terms, n, b_grads)
        loss.backward()
        if b_grads is not None:
            b_grads.apply()
        grads[mode] = B.grad
    assert grads["explicit"].dtype == torch.float32 and float(grads["autograd"].norm()) > 0
    assert torch.allclose(grads["explicit"], grads["autograd"], rtol=0.05, atol=0.02)


def test_bf16_with_micro_batches_matches_fp32():
    full = _trainer("clapp++", "cpu", "rule.options.micro_batches=2")
    half = _trainer("clapp++", "cpu", "precision=bf16", "rule.options.micro_batches=2")
    batch = _batch(full)
    loss32, g32 = _grads(full, batch)
    loss16, g16 = _grads(half, batch)
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32) + 1e-3
    a, b = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert all(g.dtype == torch.float32 for g in g16)
    assert float((a * b).sum() / (a.norm() * b.norm())) > 0.6


def test_compiled_blocks_stay_compiled_in_every_mode():
    # every block in fp32 and under bf16 autocast, with and without gradients: 24 variants of
    # one forward, more than torch's default limit of 8 compiled variants
    import torch._dynamo as dynamo
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from locallearn.nets.vgg import vgg6

    limit = dynamo_config.recompile_limit
    dynamo.reset()
    counters.clear()
    try:
        net = vgg6(0.0625)
        net.compile_blocks(backend="eager")
        x = torch.randn(2, 3, 32, 32)
        for grad in (True, False):
            for bf16 in (False, True):
                with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, bf16):
                    net.encode(x)
        frames = dict(counters["frames"])
    finally:
        dynamo.reset()
        dynamo_config.recompile_limit = limit
    assert frames["total"] > 8 and frames["ok"] == frames["total"]
