"""Measures of what RHM networks learn: probes, synonym sensitivity, masking; ``analyze``."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from locallearn.data.rhm import RHM
from locallearn.eval.rhm_measures import (
    feedback_matrices,
    input_specific_variance,
    latent_probes,
    masking,
    node_labels,
    synonym_sensitivity,
)
from locallearn.experiments.analyze import PLOTS, add_analyze, analyze_run, format_analysis
from locallearn.experiments.runs import run
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.rules.feedback import DirectFeedback
from locallearn.schema import load_config

SMALL = {"v": 4, "n_classes": 4, "m": 2, "s": 2, "L": 3}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscribing a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_rhm() -> RHM:
    return RHM(**SMALL, seed_rules=1)


def parser_net(rhm: RHM):
    """A hierarchical CNN that parses the grammar exactly.

    Block ``l`` has one unit per production rule of the level it inverts, the indicator that the
    patch below is that rule's tuple: weight 1 from the unit (token or rule) matching each slot,
    bias ``-(s - 1)``. The read-out sums the units of each class.
    """
    s, L, m = rhm.s, rhm.L, rhm.m
    widths = [r.shape[0] * m for r in reversed(rhm.rules)]
    net = hier_cnn(rhm.v, s, L, widths, rhm.n_classes, bias=True, seed=0)
    with torch.no_grad():
        for level, block in enumerate(net.blocks):
            rules = rhm.rules[L - 1 - level]  # (parents, m, s) producing the block's input
            conv = block.pre
            w = torch.zeros_like(conv.weight)
            for parent in range(rules.shape[0]):
                for j in range(m):
                    unit = parent * m + j
                    for pos in range(s):
                        child = int(rules[parent, j, pos])
                        if level == 0:
                            w[unit, child, pos] = 1.0
                        else:  # every input unit whose rule has parent ``child``
                            w[unit, child * m : (child + 1) * m, pos] = 1.0
            conv.weight.copy_(w / conv.scale)
            conv.bias.fill_(-(s - 1.0))
        ro = net.readout
        w = torch.zeros_like(ro.weight)
        for c in range(rhm.n_classes):
            w[c, c * m : (c + 1) * m] = 1.0
        ro.weight.copy_(w / ro.scale)
        ro.bias.zero_()
    return net.eval()


def test_node_labels_are_the_ancestors():
    rhm = small_rhm()
    data, _ = rhm.sample(16, 0, seed_sample=0)
    lat = rhm.latents(data.tokens)
    assert torch.equal(node_labels(rhm, lat, 1, 2), lat[2])
    assert torch.equal(node_labels(rhm, lat, 1, 1), lat[1][:, [0, 0, 1, 1]])
    assert torch.equal(node_labels(rhm, lat, 2, 0), lat[0][:, [0, 0]])
    with pytest.raises(ValueError, match="depth=2 is invalid for layer 2"):
        node_labels(rhm, lat, 2, 2)


def test_parser_network_decodes_every_latent_and_is_invariant_below():
    rhm = small_rhm()
    train, test = rhm.sample(160, 100, seed_sample=0)
    net = parser_net(rhm)
    assert torch.equal(net(rhm.one_hot(test.tokens)).argmax(1), test.labels)
    rows = latent_probes(net, rhm, train.tokens, test.tokens, steps=30)
    diag = {r["layer"]: r for r in rows if r["features"] == "position"
            and r["split"] == "random" and r["depth"] == rhm.L - r["layer"]}
    assert sorted(diag) == [1, 2, 3]
    for r in diag.values():
        assert r["value"] == 1.0
        assert r["chance"] < 0.6
    flat = {r["layer"]: r["value"] for r in rows if r["features"] == "flat"}
    assert flat[3] == 1.0
    # the tokens of a 4-token patch do not decode its depth-1 symbol linearly
    assert [r for r in rows if r["layer"] == 2 and r["depth"] == 1][0]["input_patch"] < 1.0

    sens = synonym_sensitivity(net, rhm, test.tokens, torch.Generator().manual_seed(0))
    grid = {(r["layer"], r["depth"]): r["value"] for r in sens}
    # block l codes the rule of its node (depth L-l): invariant to redraws at depth >= L-l+2
    for layer, k in [(2, 3), (3, 2), (3, 3)]:
        assert grid[(layer, k)] == 0.0
    for layer, k in [(1, 3), (2, 2), (3, 1), (0, 3)]:
        assert grid[(layer, k)] > 0.1
    assert not any(r["degenerate"] for r in sens)


def test_constant_network_probes_at_chance_and_sensitivity_undefined():
    rhm = small_rhm()
    train, test = rhm.sample(200, 100, seed_sample=2)
    net = hier_cnn(rhm.v, rhm.s, rhm.L, 8, rhm.n_classes, bias=True, seed=0)
    with torch.no_grad():
        for block in net.blocks:
            block.pre.weight.zero_()
            block.pre.bias.fill_(0.5)
    rows = latent_probes(net, rhm, train.tokens, test.tokens, steps=30, input_baseline=False)
    for r in rows:
        assert r["value"] == pytest.approx(r["chance"])
    sens = synonym_sensitivity(net, rhm, test.tokens, torch.Generator().manual_seed(0))
    for r in sens:
        if r["layer"] == 0:
            assert math.isfinite(r["value"]) and not r["degenerate"]
        else:
            assert math.isnan(r["value"]) and r["degenerate"]


def random_net(rhm: RHM, seed: int = 0):
    return hier_cnn(rhm.v, rhm.s, rhm.L, 16, rhm.n_classes, seed=seed).eval()


def test_feedback_matrix_matches_the_explicit_product():
    rhm = small_rhm()
    data, _ = rhm.sample(5, 0, seed_sample=3)
    x = rhm.one_hot(data.tokens)
    net = random_net(rhm, seed=4)
    mats = feedback_matrices(net, x)
    assert [tuple(m.shape) for m in mats] == [(5, 64, 4), (5, 32, 4), (5, 16, 4)]
    for i in range(len(x)):
        feats = net.features(x[i : i + 1])
        # M_1^T = W_out D_3 W_3 D_2 W_2 with the linear maps as explicit matrices
        prod = net.readout.weight * net.readout.scale  # (n_out, units_3)
        for level in (2, 1):
            block = net.blocks[level]
            h_in = feats[level - 1]
            gate = (block.pre(h_in) > 0).flatten().float()
            lin = torch.autograd.functional.jacobian(
                lambda h, b=block, shape=h_in.shape: b.pre(h.reshape(shape)).flatten(),
                h_in.flatten(),
            )
            prod = prod * gate @ lin
        assert torch.allclose(mats[0][i].t(), prod, atol=1e-5)


def test_masking_zero_for_fixed_feedback_positive_for_backprop():
    rhm = small_rhm()
    data, _ = rhm.sample(128, 0, seed_sample=5)
    x = rhm.one_hot(data.tokens)
    net = random_net(rhm)
    bp = {r["layer"]: r["value"] for r in masking(net, x)}
    assert bp[1] > 0.05 and bp[2] > 0.05
    assert bp[3] < 1e-10  # the top block's feedback is the read-out's weights
    dfa = DirectFeedback("dfa", seed=0)
    dfa.setup(net, x)
    fixed = masking(net, x, feedback=[dfa.feedback(level) for level in range(3)], state="x")
    assert [r["value"] for r in fixed] == [0.0, 0.0, 0.0]
    assert all(r["feedback"] == "fixed" and r["state"] == "x" for r in fixed)
    mean_gates = masking(net, x, mode="mean-gates")
    assert max(r["value"] for r in mean_gates) < 1e-10
    assert input_specific_variance(torch.zeros(4, 3, 2)) == 0.0
    assert input_specific_variance(torch.tensor([[1.0], [-1.0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mode='other' is unknown"):
        feedback_matrices(net, x, mode="other")


def tiny_run(tmp_path, rule: str):
    overrides = [f"data.{k}={v}" for k, v in SMALL.items()] + [
        "data.train_size=96", "data.test_size=64", "net.width=16", "epochs=2",
        "batch_size=32", "probe.steps=20", "progress=false", f"rule.name={rule}",
    ]
    out = tmp_path / rule
    run(load_config(None, overrides), out)
    return out


def test_analyze_backprop_run_writes_rows_and_plots(tmp_path, capsys):
    out = tiny_run(tmp_path, "backprop")
    sub = argparse.ArgumentParser().add_subparsers()
    add_analyze(sub)
    parser = sub.choices["analyze"]
    args = parser.parse_args([str(out), "--samples", "64", "--seed", "1"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "synonym sensitivity" in text and "masking" in text
    rows = json.loads((out / "analysis.json").read_text())
    assert {r["measure"] for r in rows} == {"probe", "sensitivity", "masking"}
    probes = [r for r in rows if r["measure"] == "probe"]
    assert {(r["layer"], r["depth"]) for r in probes if r["split"] == "random"
            and r["features"] == "position"} == {(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0)}
    sens = [r for r in rows if r["measure"] == "sensitivity"]
    assert len(sens) == 4 * 3
    mask = {(r["state"], r["layer"]): r["value"] for r in rows if r["measure"] == "masking"}
    assert set(mask) == {(s, layer) for s in ("init", "trained") for layer in (1, 2, 3)}
    assert mask[("init", 1)] > 0.0 and mask[("init", 1)] != mask[("trained", 1)]
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    assert format_analysis(rows) in text


def test_analyze_dfa_run_reports_its_fixed_feedback(tmp_path):
    out = tiny_run(tmp_path, "dfa")
    rows = analyze_run(out, n_samples=32, plots=False)
    fixed = [r for r in rows if r["measure"] == "masking" and r["feedback"] == "fixed"]
    assert [r["value"] for r in fixed] == [0.0, 0.0, 0.0]


def test_analyze_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        analyze_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a run directory"):
        analyze_run(tmp_path)
    other = tmp_path / "images"
    other.mkdir()
    (other / "config.yaml").write_text("data: {name: cifar10}\n")
    (other / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not rhm"):
        analyze_run(other)
    with pytest.raises(ValueError, match="n_samples=1 is invalid"):
        analyze_run(tmp_path, n_samples=1)


def test_analyze_a_sweep_folder_measures_each_finished_run_once(tmp_path, capsys):
    """Given a sweep folder: every finished RHM run without an analysis; again: none; --redo:
    all of them. Unfinished runs and image runs are left alone."""
    import shutil

    sweep = tmp_path / "sweep"
    done = tiny_run(tmp_path, "backprop")
    for name in ("a", "b"):
        shutil.copytree(done, sweep / "runs" / name)
    (sweep / "runs" / "b" / "summary.json").unlink()  # not finished
    image = sweep / "runs" / "img"
    image.mkdir()
    (image / "config.yaml").write_text("data: {name: cifar10}\n")
    (image / "summary.json").write_text("{}")
    sub = argparse.ArgumentParser().add_subparsers()
    add_analyze(sub)
    parser = sub.choices["analyze"]

    def analyze(*extra):
        args = parser.parse_args([str(sweep), "--samples", "32", *extra])
        assert args.func(args) == 0
        return capsys.readouterr().out

    text = analyze()
    assert "1 run(s) to measure" in text and "unseen-synonym probe per layer 1:" in text
    assert (sweep / "runs" / "a" / "analysis.json").is_file()
    assert not (sweep / "runs" / "b" / "analysis.json").exists()
    assert "0 run(s) to measure" in analyze()
    assert "1 run(s) to measure" in analyze("--redo")
