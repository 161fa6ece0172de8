"""The path a new rule takes into the leaderboard (docs/leaderboard.md): a rule written outside
the package, installed with an entry point in the group ``locallearn.rules``, its preset added to
a study's sweep with ``--grid preset=PATH.yaml``, the report re-made with its row."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from image_folder import write_dataset

TOY_RULE = '''
"""A toy rule from outside the package: each block pulls its channels' mean squared
pre-activation towards 1 (a local loss on the block's own output, the input detached)."""
import torch
from locallearn.rules.base import Rule


class UnitPower(Rule):
    name = "unit-power"
    uses_labels = False
    view_kind = "image"

    def trained_parameters(self, net):
        return net.encoder_parameters()

    def compute_grads(self, net, batch):
        h, total = batch.x, 0.0
        for block in net.blocks:
            with torch.enable_grad():
                u = block.pre(h.detach())
                loss = (u.pow(2).mean((0, 2, 3)) - 1).pow(2).mean()
                loss.backward()
            total += float(loss)
            h = block.post(u).detach()
        return {"loss": total}
'''


def _install_toy(site: Path) -> None:
    """The toy rule as an installed distribution: its module and its entry point."""
    (site / "toy_rule.py").write_text(textwrap.dedent(TOY_RULE))
    info = site / "toy_rule-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-rule\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[locallearn.rules]\nunit-power = toy_rule:UnitPower\n")


def _cli(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "locallearn", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_rule_from_outside_the_package_enters_the_table_with_one_command(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_toy(site)
    data = tmp_path / "data"
    write_dataset(data, {"train": 12, "test": 6})
    common = {
        "data": {"name": "folder", "root": str(data)},
        "net": {"kind": "vgg6", "width_mult": 1 / 32, "bias": True},
        "optim": {"name": "adamw", "lr": 1e-3},
        "probe": {"epochs": 2, "per_block": False},
        "epochs": 2, "batch_size": 8, "checkpoint_every": 1, "progress": False,
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {**common, "rule": {"name": "clapp-image", "options": {"context": "same"}}}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "description": "a small study",
        "grid": {"preset": {"random": {"config": "base.yaml", "epochs": 0},
                            "clapp": {"config": "base.yaml"}}},
        "seeds": [0],
    }))
    toy = tmp_path / "presets" / "unit-power.yaml"
    toy.parent.mkdir()
    toy.write_text(yaml.safe_dump({**common, "rule": {"name": "unit-power"}}))
    out = tmp_path / "study"

    # the study as it was, then the new rule with one command, then the report
    first = _cli(["sweep", "study.yaml", "--out", str(out), "--workers", "1"], site, tmp_path)
    assert first.returncode == 0, first.stderr
    added = _cli(["sweep", "study.yaml", "--out", str(out), "--workers", "1",
                  "--grid", f"preset={toy}"], site, tmp_path)
    assert added.returncode == 0, added.stderr
    assert (out / "runs" / "preset=unit-power,seed=0" / "summary.json").is_file()
    report = _cli(["report", str(out)], site, tmp_path)
    assert report.returncode == 0, report.stderr
    board = (out / "report.md").read_text().split("## Leaderboard")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0][2:]: line for line in board.splitlines()
            if line.startswith("| ") and not line.startswith("| rule")}
    assert set(rows) == {"random", "clapp", "unit-power"}
    assert "untrained" in rows["random"] and "untrained" not in rows["unit-power"]
    assert rows["unit-power"].split(" | ")[4].startswith(("+", "-"))  # a gain over random

    # without the package the name is unknown, in one line
    bare = subprocess.run([sys.executable, "-m", "locallearn", "run", str(toy), "--out",
                           str(tmp_path / "bare")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bare.returncode == 2 and "rule.name='unit-power' is unknown" in bare.stderr


def test_a_plugin_that_fails_to_import_is_named_when_it_is_used(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_rule-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-rule\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[locallearn.rules]\nbroken = no_such_module:Rule\nclapp-image = no_such_module:X\n")
    preset = tmp_path / "broken.yaml"
    preset.write_text(yaml.safe_dump({"data": {"name": "folder", "root": str(tmp_path)},
                                      "net": {"kind": "vgg6"}, "rule": {"name": "broken"}}))
    run = _cli(["run", str(preset), "--out", str(tmp_path / "run")], site, tmp_path)
    assert run.returncode == 2
    assert "rule.name='broken': the entry point of its package (locallearn.rules) failed" \
        in run.stderr and "ModuleNotFoundError" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    # the package's own rule of the same name is kept, and the other rules are not affected
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", "from locallearn.rules import rule_class, registered; "
         "print(rule_class('clapp-image').__module__, 'broken' in registered())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert probe.stdout.split() == ["locallearn.rules.image_local", "False"], probe.stderr
