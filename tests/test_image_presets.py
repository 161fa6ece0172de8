"""What the image presets set: the paper script's conventions and the per-dataset settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.nets.vgg import vgg6
from locallearn.rules import build_rule
from locallearn.schema import load_config

IMAGES = Path(__file__).resolve().parents[1] / "configs" / "images"
RULES = ("clapp", "clapp++", "clapp++dfb", "clapp++both", "bp-clapp++", "bp-infonce", "ff",
         "infonce")


@pytest.mark.parametrize("rule", RULES)
def test_tiny_imagenet_presets_apply_the_paper_weight_decay(rule):
    tiny = load_config(IMAGES / "tiny-imagenet" / f"{rule}.yaml")
    cifar = load_config(IMAGES / f"{rule}.yaml")
    assert tiny.data.name == "tiny-imagenet" and tiny.data.splits()[1] == "val"
    assert tiny.optim.weight_decay == 1e-5 and cifar.optim.weight_decay == 0.0
    assert tiny.rule == cifar.rule and tiny.epochs == cifar.epochs


def test_bp_clapp_pools_the_top_block_to_one_cell_as_the_paper_script():
    net = vgg6(1.0)
    counts = {}
    for pool in (None, "auto"):
        overrides = [] if pool is None else [f"rule.options.pool={pool}"]
        cfg = load_config(IMAGES / "bp-clapp++.yaml", overrides)
        rule = build_rule(cfg.rule, 0)
        rule.setup(net, torch.zeros(2, 3, 32, 32))
        (B,) = list(rule.parameters())
        counts[pool] = (tuple(B.shape), sum(p.numel() for p in rule.trained_parameters(net)))
    assert counts[None] == ((1024, 1024), 17_275_392)  # the paper's 17.28M
    assert counts["auto"][0] == (4096, 4096)  # the 2x2 grid, kept as an option
    cpu = load_config(IMAGES / "bp-clapp++-cpu.yaml")
    assert cpu.rule.options["pool"] == "global"


@pytest.mark.parametrize("name, epochs", [("images-cpu", 3), ("images-cpu-long", 20)])
def test_cpu_study_sweeps_give_every_rule_the_same_budget(name, epochs):
    from locallearn.experiments.sweep_spec import expand, load_sweep

    sweeps = IMAGES.parent / "sweeps"
    runs = expand(load_sweep(sweeps / f"{name}.yaml", overrides=["data.root=/x"]))
    assert len(runs) == 18 and {r.seed for r in runs} == {0, 1}
    trained = [r for r in runs if r.values["preset"] != "random"]
    budgets = {(r.raw["epochs"], r.raw["data"]["subset"], r.raw["net"]["width_mult"],
                r.raw["batch_size"]) for r in trained}
    assert budgets == {(epochs, None, 0.125, 32)}
    # each preset's rate is its best of the grid; the grid itself gives every rule every rate
    best = {r.values["preset"]: r.raw["optim"]["lr"] for r in trained}
    assert best["clapp++"] == best["bp-clapp++"] == best["bp-infonce"] == 5e-4
    assert best["clapp++dfb"] == best["clapp++both"] == best["ff"] == 2.5e-4
    assert best["clapp"] == best["infonce"] == 1e-3
    grid = expand(load_sweep(sweeps / f"{name}.yaml", overrides=["data.root=/x"],
                             grid=["optim.lr=2.5e-4,5e-4,1e-3,2e-3"], seeds="0"))
    rates = {}
    for r in grid:
        rates.setdefault(r.values["preset"], set()).add(r.raw["optim"]["lr"])
    assert all(v == {2.5e-4, 5e-4, 1e-3, 2e-3} for v in rates.values()) and len(rates) == 9
    random = [r for r in runs if r.values["preset"] == "random"]
    assert len(random) == 2 and all(r.raw["epochs"] == 0 for r in random)
    assert all(r.raw["probe"]["per_block"] and r.raw["probe_every"] > 0 for r in runs)
