"""The stacked predictor-clusterer network and its rule (latent-stacked): sibling targets, the
explicit three-factor formula and k-means step, the level-by-level schedule, errors, exact
resume, and that it learns the hierarchy without labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interrupt import full_and_resumed

from locallearn.cli import main
from locallearn.experiments.runs import run
from locallearn.nets.clusterer import ClusterBlock, predictor_clusterer_net
from locallearn.rules import Batch
from locallearn.rules.latent import balanced_codes
from locallearn.rules.latent_stacked import LatentStacked, StackedOptions, sibling_targets
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "rhm" / "latent-prediction.yaml"


def codes_of(idx: torch.Tensor, k: int) -> torch.Tensor:
    """One-hot codes ``(N, k, T)`` of symbol indices ``(N, T)``."""
    return F.one_hot(idx, k).transpose(1, 2).double()


def test_sibling_targets_by_hand():
    # s = 2, k_in = 3: positions 0 (patch 2,1) and 1 (patch 0,2) are siblings
    x = codes_of(torch.tensor([[2, 1, 0, 2]]), 3)
    assert sibling_targets(x, 2, 3).tolist() == [[0 + 3 * 2, 2 + 3 * 1]]
    # two parents: each position's sibling is the other patch under the same parent
    x = codes_of(torch.tensor([[0, 1, 1, 1, 2, 2, 0, 0]]), 3)
    assert sibling_targets(x, 2, 3).tolist() == [[4, 3, 0, 8]]
    # s = 3: the next patch in the parent, cyclically
    x = codes_of(torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0]]), 2)
    values = [0 + 0 + 4, 1 + 2 + 0, 0 + 0 + 0]  # base-2 digits, first code lowest
    assert sibling_targets(x, 3, 2).tolist() == [[values[1], values[2], values[0]]]


def make(seed: int = 0):
    torch.manual_seed(seed)
    net = predictor_clusterer_net(v=4, s=2, L=3, width=6, n_out=3, seed=seed).double()
    with torch.no_grad():  # the predictors start at zero; give them a signal to send back
        for b in net.blocks[:2]:
            b.predictor.normal_(0, 1.0)
    x = codes_of(torch.randint(4, (5, 8)), 4)
    rule = LatentStacked(StackedOptions(schedule="joint", cluster_start=0.0))
    rule.setup(net, x)
    return net, rule, x


def test_three_factor_formula_and_kmeans_step():
    net, rule, x = make()
    rule.compute_grads(net, Batch(x, None, None, torch.Generator().manual_seed(1)))
    h_in = x
    for block in net.blocks[:2]:
        conv = block.pre
        patch = conv.patches(h_in)  # (N, P, s k_in)
        w = (conv.weight * conv.scale).reshape(conv.weight.shape[0], -1).detach()
        a = patch @ w.t() + conv.bias.detach()
        h = torch.relu(a)
        n, p = a.shape[:2]
        side = torch.arange(p) % 2
        T = block.predictor.detach()[side]  # (P, K, width): each position's own side
        logits = torch.einsum("nph,pkh->npk", h, T)
        target = sibling_targets(h_in, 2, block.k_in)
        err = torch.softmax(logits, -1) - F.one_hot(target, logits.shape[-1]).double()
        err = err / (n * p)
        d_h = torch.einsum("npk,pkh->nph", err, T)  # prediction error through the predictor
        expect_w = torch.einsum("nph,npi->hi", d_h * (a > 0).double(), patch) * conv.scale
        got_w = conv.weight.grad.reshape(expect_w.shape)
        assert torch.allclose(got_w, expect_w, atol=1e-12)
        expect_t = torch.zeros_like(block.predictor)
        for r in (0, 1):
            expect_t[r] = torch.einsum("npk,nph->kh", err[:, r::2], h[:, r::2])
        assert torch.allclose(block.predictor.grad, expect_t, atol=1e-12)
        # k-means step: sum_i A_ic (C_c - p_i) / n over the batch's prediction points
        points = block.points(torch.einsum("nph,rkh->nprk", h, block.predictor.detach()))
        points = points.reshape(n * p, -1)
        C = block.prototypes.detach()
        dist = torch.cdist(points, C).pow(2)
        A = balanced_codes(-dist / dist.mean(), rule.options.sinkhorn_eps,
                           rule.options.sinkhorn_iters)
        expect_c = (A.t() @ torch.ones(n * p, 1).double()) * C - A.t() @ points
        assert torch.allclose(block.prototypes.grad, expect_c / (n * p), atol=1e-10)
        assert block.prototypes.grad.abs().sum() > 0
        h_in = block(h_in)  # the next module reads this module's codes
        assert torch.equal(h_in.sum(1), torch.ones(n, p, dtype=h_in.dtype))  # one-hot codes
    top = net.blocks[-1]
    assert top.pre.weight.grad is None and net.readout.weight.grad is None


def test_levelwise_schedule_trains_one_module_at_a_time():
    net, _, x = make()
    rule = LatentStacked(StackedOptions(cluster_start=0.5), steps_per_epoch=2, epochs=4)
    rule.setup(net, x)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(8):  # 2 modules x 4 steps each
        for p in net.parameters():
            p.grad = None
        rule.compute_grads(net, Batch(x, None, None, gen))
        seen.append([(b.pre.weight.grad is not None, b.prototypes.grad is not None)
                     for b in net.blocks[:2]])
    # module 1 in steps 0-3, clustering from its step 2 on; then module 2 alike
    assert seen[:4] == [[(True, False), (False, False)]] * 2 + [[(True, True), (False, False)]] * 2
    assert seen[4:] == [[(False, False), (True, False)]] * 2 + [[(False, False), (True, True)]] * 2
    assert int(rule.step) == 8 and bool(rule.placed.all())


def test_prototypes_are_seeded_on_distinct_batch_points():
    net, rule, x = make()
    rule.compute_grads(net, Batch(x, None, None, torch.Generator().manual_seed(3)))
    block = net.blocks[0]
    assert isinstance(block, ClusterBlock)
    protos = block.prototypes.detach()
    # k-means++ never picks a point twice while distinct points remain
    assert torch.cdist(protos, protos).fill_diagonal_(1).min() > 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["rule.name=backprop"], "net.kind=predictor-clusterer does not fit rule.name=backprop"),
        (["net.kind=hier-cnn"], "net.kind=hier-cnn does not fit rule.name=latent-stacked"),
        (["rule.options.cluster_start=1"], "rule.options.cluster_start=1"),
        (["rule.options.level_epochs=-1"], "rule.options.level_epochs=-1"),
        (["rule.options.schedule=random"], "rule.options.schedule"),
        (["data.L=1", "data.train_size=16", "data.test_size=8"], "needs L >= 2"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, match):
    out = tmp_path / "o"
    argv = ["run", str(PRESET), "--out", str(out), "data.train_size=64", "data.test_size=16",
            "epochs=1", "progress=false", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


TINY = ["data.L=3", "data.train_size=0.5P*", "data.test_size=200", "net.width=32",
        "epochs=6", "checkpoint_every=1", "progress=false", "threads=1"]


def test_killed_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = load_config(PRESET, TINY)
    full, resumed = full_and_resumed(cfg, tmp_path, monkeypatch, crash_at=4)
    for key in ("test_accuracy", "train_accuracy", "test_loss", "train_loss"):
        assert full[key] == resumed[key], key
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for k, v in a["net"].items():
        assert torch.equal(v, b["net"][k]), k


def test_learns_the_hierarchy_without_labels(tmp_path):
    """L = 3, 2 P* = 1024 samples, 20 epochs: the frozen codes, read out linearly, classify
    almost perfectly (backprop of the same network size needs about 3 P* for test error 0.1,
    docs/rhm-frontier.md); the untrained network (0 epochs) is near chance."""
    base = ["data.L=3", "data.train_size=2P*", "data.test_size=1000", "progress=false",
            "threads=1", "eval_every=20"]
    trained = run(load_config(PRESET, base + ["epochs=20"]), tmp_path / "t")
    untrained = run(load_config(PRESET, base + ["epochs=0"]), tmp_path / "u")
    assert trained["test_accuracy"] >= 0.9, trained
    assert untrained["test_accuracy"] < 0.4, untrained


def test_analyze_measures_the_codes(tmp_path, capsys):
    """``locallearn analyze`` on a predictor-clusterer run: latent probes and synonym
    sensitivity of the codes; no feedback (masking) measure, since no gradient crosses codes."""
    out = tmp_path / "r"
    args = ["run", str(PRESET), "--out", str(out), "data.L=3", "data.train_size=2P*",
            "data.test_size=500", "epochs=20", "eval_every=20", "progress=false", "threads=1"]
    assert main(args) == 0
    assert main(["analyze", str(out), "--samples", "500"]) == 0
    printed = capsys.readouterr().out
    assert "masking.png" not in printed and (out / "probes.png").is_file()
    import json

    rows = json.loads((out / "analysis.json").read_text())
    assert not [r for r in rows if r["measure"] == "masking"]
    # the first module's codes are its node's symbol, for synonyms never seen in the fit
    unseen = [r for r in rows if r["measure"] == "probe" and r["layer"] == 1
              and r["split"] == "synonyms"]
    assert unseen and unseen[0]["value"] > 0.9 > 0.5 > unseen[0]["input_patch"], unseen


def test_a_finished_run_is_extended_only_when_its_schedule_allows(tmp_path):
    """The level-by-level schedule shares the run's epochs among the modules: a longer run is
    not the same run continued, so extending one is refused; with level_epochs set it is not."""
    short = TINY[:4] + ["epochs=2", "progress=false", "threads=1"]
    run(load_config(PRESET, short), tmp_path / "shared")
    with pytest.raises(ValueError, match=r"epochs=4 differs .*rule.options.level_epochs=0"):
        run(load_config(PRESET, short + ["epochs=4"]), tmp_path / "shared")
    fixed = short + ["rule.options.level_epochs=1"]
    run(load_config(PRESET, fixed), tmp_path / "fixed")
    longer = run(load_config(PRESET, fixed + ["epochs=4"]), tmp_path / "fixed")
    assert longer["epochs"] == 4
