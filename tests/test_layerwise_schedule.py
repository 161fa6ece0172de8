"""Layer-wise schedules (``layerwise.epochs``, greedy or together), per-block optimiser settings
and the exponential schedule, the image rules that see the image itself, and the probe's
protocol settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from image_folder import folder_config, write_dataset

from locallearn import cli
from locallearn.eval.image_probe import standardize_samples
from locallearn.experiments.runs import run
from locallearn.optim import build_optimizer
from locallearn.schema import load_config
from locallearn.train import Trainer

HEBB = {"net.kind": "softhebb", "net.width_mult": 1 / 16, "net.bias": False,
        "rule.name": "softhebb", "rule.options": {},
        "optim.name": "sgd", "optim.momentum": 0.0, "optim.block_lr": [0.08, 0.005, 0.01],
        "probe.grid": [8, 4, 2], "probe.epochs": 2}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_dataset(root, {"train": 16, "test": 6})
    return root


def _weights_per_epoch(monkeypatch, cfg, out):
    """The blocks' weights after every epoch of a run of ``cfg``."""
    snaps = []
    original = Trainer.train_epoch

    def recording(self):
        metrics = original(self)
        snaps.append([b.pre.weight.detach().clone() for b in self.net.blocks])
        return metrics

    monkeypatch.setattr(Trainer, "train_epoch", recording)
    start = None

    def first(self):
        nonlocal start
        start = [b.pre.weight.detach().clone() for b in self.net.blocks]

    original_prepare = Trainer.prepare_output

    def prepare(self):
        resumed = original_prepare(self)
        first(self)
        return resumed

    monkeypatch.setattr(Trainer, "prepare_output", prepare)
    run(cfg, out)
    return [start, *snaps]


def _changed(before, after):
    return [not torch.equal(a, b) for a, b in zip(before, after)]


@pytest.mark.parametrize("mode, counts, expected", [
    ("greedy", [1, 1, 1], [[True, False, False], [False, True, False], [False, False, True]]),
    ("together", [1, 2, 3], [[True, True, True], [False, True, True], [False, False, True]]),
])
def test_each_block_trains_in_its_epochs_only(tmp_path, image_root, monkeypatch, mode, counts,
                                              expected):
    cfg = load_config(folder_config(tmp_path, image_root, epochs=3, **HEBB, **{
        "layerwise.epochs": counts, "layerwise.mode": mode}))
    snaps = _weights_per_epoch(monkeypatch, cfg, tmp_path / "run")
    assert [_changed(a, b) for a, b in zip(snaps, snaps[1:])] == expected


def test_a_greedy_run_extended_trains_its_last_block_as_a_longer_run(tmp_path, image_root):
    extra = {**HEBB, "layerwise.epochs": [1, 1, 1]}
    short = load_config(folder_config(tmp_path, image_root, epochs=3, **extra))
    run(short, tmp_path / "cut")
    longer = load_config(folder_config(tmp_path, image_root, epochs=4, **extra))
    extended = run(longer, tmp_path / "cut")
    whole = run(longer, tmp_path / "whole")
    assert extended["probe_accuracy"] == whole["probe_accuracy"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key


@pytest.mark.parametrize("extra, words", [
    ({"layerwise.epochs": [1, 1]}, "one per block"),
    ({"layerwise.epochs": [2, 2, 2], "epochs": 5}, "shorter than the layer-wise schedule"),
    ({"layerwise.epochs": [3, 1, 4], "layerwise.mode": "together"}, "must not decrease"),
    ({"layerwise.epochs": [1, 0, 1]}, "count >= 1"),
    ({"layerwise.epochs": [1, 1, 1, 1, 1, 1], "net.kind": "vgg6", "net.bias": True,
      "net.width_mult": 1 / 32, "rule.name": "clapp-image", "optim.block_lr": None,
      "rule.options": {"context": "both"}, "optim.name": "adamw", "epochs": 6},
     "learns block by block"),
    ({"optim.gamma": [0.5, 0.5, 0.5]}, "needs optim.schedule=exponential"),
    ({"optim.block_lr": [0.1, -1, 0.1]}, "must be > 0"),
    ({"data.views.blur_p": 0.2}, "only flip_p applies"),
    ({"probe.blocks": [4]}, "valid: 1..3"),
    ({"probe.dropout": 1.0}, "probe.dropout"),
])
def test_bad_schedules_are_one_line_errors(tmp_path, image_root, capsys, extra, words):
    raw = {**HEBB, "epochs": 3, **extra}
    config = folder_config(tmp_path, image_root, **{k: v for k, v in raw.items()
                                                   if v is not None})
    code = cli.main(["run", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert words in err and "\n" not in err


def test_per_block_rates_and_the_exponential_schedule():
    cfg = load_config(None, ["optim.name=adamw", "optim.block_lr=[0.1,0.2]",
                             "optim.block_weight_decay=[0.0,0.5]", "optim.schedule=exponential",
                             "optim.gamma=[0.5,0.1]", "optim.period=[2,3]"])
    blocks = [[torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(3))]]
    loose = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer(cfg, blocks[0] + blocks[1] + [loose], 1, blocks, [0, 2])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.5, 0.0]
    rates = []
    for _ in range(6):
        rates.append([round(g["lr"], 12) for g in opt.param_groups])
        opt.step()
        sched.step()
    # block 1: decays after 1 step, then every 2 (the +1 of the reference's count); block 2
    # starts at step 2 and decays after 2 of its steps, then every 3
    assert [r[0] for r in rates] == [0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    assert [r[1] for r in rates] == [0.2, 0.2, 0.2, 0.2, 0.02, 0.02]
    assert [r[2] for r in rates] == [1e-3] * 6


def test_image_rules_see_the_image_flipped_as_asked(tmp_path, image_root):
    from locallearn.experiments.image_task import ImageTask

    cfg = load_config(folder_config(tmp_path, image_root, **HEBB, **{"data.views.flip_p": 1.0}))
    task = ImageTask(cfg, torch.device("cpu"))
    batch = next(task.batches(torch.Generator().manual_seed(0), 8, "image"))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:8]
    assert batch.views is None
    assert torch.equal(batch.x, task.transform(task.train_images[perm].flip(-1)))


def test_probe_protocol_settings_are_applied(tmp_path, image_root):
    out = tmp_path / "run"
    config = folder_config(tmp_path, image_root, **{
        **HEBB, "probe.blocks": [2, 3], "probe.standardize": "sample", "probe.dropout": 0.2,
        "probe.schedule": "halving", "probe.augment": "flip", "probe.init": "uniform",
        "probe.per_block": True, "probe.epochs": 3})
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["feature_dims"] == [24 * 4 * 4, 96 * 2 * 2]
    assert len(probe["block_accuracies"]) == 2
    words = probe["protocol"]
    for part in ("blocks 2, 3", "per image and block", "train-time flip", "dropout 0.2",
                 "halved", "uniform init"):
        assert part in words, part
    assert probe["extra"]["feature_seconds"] > 0


def test_sample_standardisation_is_per_image_and_block():
    feats = torch.randn(4, 10, dtype=torch.float64) * 3 + 1
    slices = [slice(0, 4), slice(4, 10)]
    out = standardize_samples(feats.clone(), slices)
    for sl in slices:
        part = out[:, sl]
        assert torch.allclose(part.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(part.std(1), torch.ones(4, dtype=torch.float64), atol=1e-9)


RHM_ARGS = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=3", "data.train_size=64",
            "data.test_size=32", "net.width=8", "batch_size=16", "progress=false",
            "threads=1", "checkpoint_every=1"]
RHM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rhm" / "clapp-per-block.yaml"


def test_the_logged_loss_is_that_of_the_blocks_that_train(tmp_path):
    """The default frozen pass (a rule without its own) adds nothing to the running loss."""
    cfg = load_config(RHM_CONFIG, [*RHM_ARGS, "epochs=3", "layerwise.epochs=[1,1,1]"])
    run(cfg, tmp_path / "run")
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for epoch in (1, 2, 3):
        row = rows[epoch]
        assert row["loss"] == pytest.approx(row[f"loss_block{epoch}"], rel=1e-6), row


def test_a_run_saved_before_layerwise_schedules_refuses_one(tmp_path):
    """Keys a config saved by an earlier version lacks take their defaults when compared."""
    import yaml

    out = tmp_path / "run"
    run(load_config(RHM_CONFIG, [*RHM_ARGS, "epochs=1"]), out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["layerwise"]
    for key in ("block_lr", "block_weight_decay", "gamma", "period"):
        del saved["optim"][key]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match="differs at layerwise.epochs"):
        run(load_config(RHM_CONFIG, [*RHM_ARGS, "epochs=3", "layerwise.epochs=[1,1,1]"]), out)
    resumed = run(load_config(RHM_CONFIG, [*RHM_ARGS, "epochs=2"]), out)
    assert resumed["epochs"] == 2


@pytest.mark.parametrize("extra, words", [
    (["probe.epochs=0", "probe.dropout=0.2"], "minibatch probe only"),
    (["probe.epochs=0", "probe.augment=flip"], "minibatch probe only"),
    (["data.streaming=true", "probe.epochs=3", "probe.standardize=none"], "streamed data"),
    (["data.streaming=true", "probe.epochs=3", "probe.blocks=[1]"], "streamed data"),
])
def test_probe_settings_the_chosen_probe_ignores_are_refused(tmp_path, extra, words):
    with pytest.raises(ValueError, match=words) as err:
        load_config(None, ["data.name=folder", f"data.root={tmp_path}", *extra])
    assert "\n" not in str(err.value)


def test_the_probe_dropout_mask_keeps_the_share_asked():
    from locallearn.eval.image_probe import keep_mask

    g = torch.Generator().manual_seed(0)
    for keep in (0.5, 0.8):
        mask = keep_mask(torch.Size([64, 5000]), keep, g, torch.device("cpu"))
        assert mask.shape == (64, 5000) and mask.dtype == torch.bool
        assert float(mask.float().mean()) == pytest.approx(keep, abs=0.003)
    assert bool(keep_mask(torch.Size([3, 7]), 1.0, g, torch.device("cpu")).all())


def test_a_rule_with_its_own_level_schedule_refuses_a_layerwise_one(tmp_path, capsys):
    """The stacked latent rule pipelines, but a layer-wise schedule on top of its own
    level-by-level one is refused in one line."""
    config = Path(__file__).resolve().parents[1] / "configs" / "rhm" / "latent-prediction.yaml"
    code = cli.main(["run", str(config), "--out", str(tmp_path / "run"), "data.train_size=2P*",
                     "epochs=3", "layerwise.epochs=[1,1,1]", "progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "rule latent-stacked trains its modules one after the other on its own schedule" in err
