"""The leaderboard's common network: SoftHebb's and SCFF's linear parts in VGG-6, and the sweeps
that give every rule the same budget on it (configs/sweeps/local-rules.yaml,
tiny-imagenet-cpu.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.experiments.sweep_spec import expand, load_sweep
from locallearn.nets.image_nets import IMAGE_NETS
from locallearn.nets.vgg import feature_shapes
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.schema import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("kind", ["vgg6-softhebb", "vgg6-scff"])
def test_the_rule_variants_of_vgg6_have_its_maps(kind):
    net = IMAGE_NETS[kind](0.125, seed=0)
    assert feature_shapes(net, 32) == feature_shapes(IMAGE_NETS["vgg6"](0.125), 32)
    assert len(net.blocks) == 6


@pytest.mark.parametrize("preset", ["softhebb-vgg6-cpu", "scff-vgg6-cpu", "lpl-vgg6-cpu"])
def test_each_new_rule_learns_every_block_of_the_common_network(preset):
    """The preset builds, and one step of its rule changes every block's weights."""
    cfg = load_config(CONFIGS / "images" / f"{preset}.yaml")
    assert cfg.net.width_mult == 0.125 and cfg.batch_size == 32
    net = IMAGE_NETS[cfg.net.kind](cfg.net.width_mult, bias=cfg.net.bias, seed=0)
    rule = build_rule(cfg.rule, 0)
    x = torch.rand(8, 3, 32, 32)
    rule.setup(net, x)
    g = torch.Generator().manual_seed(0)
    views = (x + 0.05 * torch.randn(x.shape, generator=g), x.flip(-1))
    rule.compute_grads(net, Batch(x=x, views=views, generator=g))
    for level, block in enumerate(net.blocks):
        grads = [p.grad for p in block.parameters() if p.requires_grad]
        assert grads and all(gr is not None for gr in grads), level
        assert sum(float(gr.abs().sum()) for gr in grads) > 0, level


def test_softhebb_refuses_a_temperature_list_of_another_depth():
    cfg = load_config(CONFIGS / "images" / "softhebb-vgg6-cpu.yaml",
                      ["rule.options.t_invert=[1.0,0.65,0.25]"])
    net = IMAGE_NETS["vgg6-softhebb"](0.125)
    with pytest.raises(ValueError, match="gives 3 values for a network of 6 blocks"):
        build_rule(cfg.rule, 0).setup(net, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="net.bias=true is invalid for net.kind=vgg6-softhebb"):
        IMAGE_NETS["vgg6-softhebb"](0.125, bias=True)


def test_the_leaderboard_sweep_gives_every_rule_the_tiers_budget():
    """Every rule of the one-hour tier plus SoftHebb, SCFF and LPL, with the tier's runs named
    and configured as recorded (so they are reused), 20 epochs of batches of 32, one probe."""
    runs = expand(load_sweep(CONFIGS / "sweeps" / "local-rules.yaml",
                             overrides=["data.root=/x"]))
    tier = expand(load_sweep(CONFIGS / "sweeps" / "images-cpu-long.yaml",
                             overrides=["data.root=/x"]))
    names = {r.values["preset"] for r in runs}
    assert {"clapp", "clapp++", "clapp++dfb", "clapp++both", "ff", "infonce", "softhebb",
            "scff", "lpl", "bp-clapp++", "bp-infonce", "random"} <= names
    by_name = {r.name: r for r in runs}
    for old in tier:  # the recorded runs are the same runs
        assert by_name[old.name].raw == old.raw
    trained = [r for r in runs if r.raw["epochs"] != 0 and "untrained" not in r.name]
    assert {(r.raw["epochs"], r.raw["batch_size"], r.raw["data"]["subset"],
             r.raw["net"]["width_mult"]) for r in trained} == {(20, 32, None, 0.125)}
    probes = {yaml_key(r.raw["probe"]) for r in runs}
    assert len(probes) == 1 and {r.seed for r in runs} == {0, 1}


def yaml_key(section: dict) -> str:
    return repr(sorted(section.items()))


def test_the_tiny_imagenet_tier_reads_the_val_split_at_one_budget():
    runs = expand(load_sweep(CONFIGS / "sweeps" / "tiny-imagenet-cpu.yaml"))
    assert {r.raw["data"]["name"] for r in runs} == {"tiny-imagenet"}
    trained = [r for r in runs if r.raw["epochs"] != 0 and "untrained" not in r.name]
    assert {(r.raw["epochs"], r.raw["data"]["subset"], r.raw["batch_size"])
            for r in trained} == {(3, 50000, 32)}
    cfg = load_config(CONFIGS / "images" / "clapp++-cpu.yaml",
                      ["data.name=tiny-imagenet", "data.root=/x"])
    assert cfg.data.splits()[1] == "val"
