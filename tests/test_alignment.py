"""Gradient alignment against cases whose answer is known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from locallearn.cli import main
from locallearn.eval.alignment import alignment
from locallearn.experiments.runs import run
from locallearn.experiments.tasks import build_task
from locallearn.schema import load_config
from locallearn.train import Trainer

TINY = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=3", "data.train_size=1P*",
        "data.test_size=20", "net.width=24", "batch_size=32", "progress=false"]


def trainer(*extra):
    cfg = load_config(None, TINY + list(extra))
    return Trainer(cfg, build_task(cfg), "/nonexistent")


def batches(tr, n=3):
    import torch

    it = tr.task.batches(torch.Generator().manual_seed(0), 32, tr.rule.view_kind)
    return [next(it) for _ in range(n)]


def test_backprop_is_aligned_with_itself():
    tr = trainer("rule.name=backprop")
    rows = alignment(tr.rule, tr.net, batches(tr))
    assert [r["block"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and r["cosine_std"] < 1e-6


@pytest.mark.parametrize("view", ["synonyms", "mask"])
def test_layerwise_top_block_equals_bp_ssl_and_lower_blocks_do_not(view):
    tr = trainer("rule.name=layerwise", f"rule.view={view}", "rule.negatives=random")
    for _ in range(2):
        tr.train_epoch()  # B away from zero
    rows = alignment(tr.rule, tr.net, batches(tr))
    assert rows[-1]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["cosine_mean"] < 0.999


def test_dfa_is_not_aligned_at_initialisation():
    tr = trainer("rule.name=dfa")
    rows = alignment(tr.rule, tr.net, batches(tr))
    assert all(abs(r["cosine_mean"]) < 0.5 for r in rows)


def test_siblings_top_block_has_no_update():
    tr = trainer("rule.name=layerwise", "rule.view=siblings")
    tr.train_epoch()
    rows = alignment(tr.rule, tr.net, batches(tr))
    assert math.isnan(rows[-1]["cosine_mean"]) and rows[-1]["batches"] == 0
    assert rows[-2]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)


def test_alignment_callback_and_align_command(tmp_path, capsys):
    cfg = load_config(None, TINY + ["rule.name=layerwise", "epochs=2", "align_every=1",
                                    "align_batches=2"])
    run(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("align_block3" in r for r in rows)
    assert rows[-1]["align_block3"] == pytest.approx(1.0, abs=1e-6)
    # the callback does not change training: same result without it
    plain = run(load_config(None, TINY + ["rule.name=layerwise", "epochs=2"]), tmp_path / "p")
    assert plain["test_loss"] == json.loads((tmp_path / "summary.json").read_text())["test_loss"]
    assert main(["align", str(tmp_path), "--batches", "2"]) == 0
    out = json.loads((tmp_path / "alignment.json").read_text())
    assert [r["block"] for r in out] == [1, 2, 3]
    assert {"cosine_mean", "cosine_std"} <= set(out[0])
    assert "alignment of layerwise with top-loss-backprop(layerwise)" in capsys.readouterr().out
    assert main(["align", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_cosine_of_long_float32_vectors_stays_within_one():
    from locallearn.eval.alignment import cosine

    g = torch.Generator().manual_seed(0)
    a = torch.rand(4_000_000, generator=g) + 10.0  # long, far from zero mean: float32 sums stray
    b = a * (1 + 1e-7 * torch.randn(4_000_000, generator=g))
    c = cosine(a, b)
    assert 1 - 1e-9 < c <= 1 + 1e-12
    assert cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
