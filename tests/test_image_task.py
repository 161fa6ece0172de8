"""Tests of the image task, the image probe and ``locallearn run`` / ``probe`` on images.

Unit tests write a tiny image-folder dataset (16x16 PNGs, two classes) into ``tmp_path``. The test
marked ``realdata`` reads a handful of the shared CIFAR-10 JPEGs next to the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from image_folder import folder_config, write_dataset

from locallearn import cli
from locallearn.experiments.image_task import ImageTask
from locallearn.experiments.probe_command import add_probe, probe_run
from locallearn.experiments.runs import run
from locallearn.nets.vgg import vgg6
from locallearn.schema import DATA_CONFIGS, ImageDataConfig, load_config
from locallearn.train import Trainer

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_dataset(root, {"train": 16, "test": 6})
    return root


def test_data_configs_are_registered():
    for name in ("cifar10", "stl10", "tiny-imagenet", "folder"):
        assert DATA_CONFIGS[name] is ImageDataConfig
    assert ImageDataConfig(name="stl10").splits() == ("train+unlabeled", "test", "train")
    assert ImageDataConfig(name="tiny-imagenet").splits() == ("train", "val", "train")


def test_run_end_to_end_writes_summary_with_probe(tmp_path, image_root, capsys):
    out = tmp_path / "run"
    config = folder_config(tmp_path, image_root, align_every=1, align_batches=1)
    code = cli.main(["run", str(config), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == "clapp-image"
    assert summary["epochs"] == 1
    assert summary["seconds"] > 0
    # the two classes differ in colour: every block's features separate them (chance: 0.5)
    assert summary["probe_accuracy"] >= 0.9
    assert min(summary["probe_block_accuracies"]) >= 0.75
    assert len(summary["probe_block_accuracies"]) == 6
    assert len(summary["probe_block_silent"]) == 6
    assert all(0 <= share < 1 for share in summary["probe_block_silent"])
    assert summary["probe_top_accuracy"] == summary["probe_block_accuracies"][-1]
    assert summary["probe_top_silent"] == summary["probe_block_silent"][-1]
    assert "Adam" in summary["probe_protocol"]
    assert summary["train_size"] == 32 and summary["dataset"] == "folder"
    probe = json.loads((out / "probe.json").read_text())
    assert probe["accuracy"] == summary["probe_accuracy"]
    assert probe["n_train"] == 32 and probe["n_test"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and "loss_block6" in rows[-1]
    # gradient alignment with BP-SSL: the top block's local update is the backprop update
    assert rows[-1]["align_block6"] == pytest.approx(1.0, abs=1e-5)


def test_zero_epochs_probes_the_random_encoder(tmp_path, image_root):
    cfg = load_config(folder_config(tmp_path, image_root, epochs=0, **{"rule.name": "bp-ssl",
                                                                 "rule.options": {}}))
    summary = run(cfg, tmp_path / "r0")
    assert summary["epochs"] == 0 and summary["seconds"] == 0
    torch.manual_seed(cfg.seed)
    task = ImageTask(cfg, torch.device("cpu"))
    fresh = vgg6(cfg.net.width_mult, seed=cfg.seed)
    assert task.probe(fresh).accuracy == summary["probe_accuracy"]


def test_encoder_layout_changes_no_feature(tmp_path, image_root):
    x = torch.rand(4, 3, 16, 16)
    feats = {}
    for flag in (True, False):
        cfg = load_config(folder_config(tmp_path, image_root, **{"net.channels_last": flag}))
        net = ImageTask(cfg, torch.device("cpu")).build_net()
        weight = net.blocks[1].pre.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == flag
        with torch.no_grad():
            feats[flag] = net.encode(x)
    assert float(feats[True].abs().max()) > 0
    assert torch.allclose(feats[True], feats[False], rtol=1e-4, atol=1e-6)


def test_resume_after_interruption_gives_identical_results(tmp_path, image_root, monkeypatch):
    # random negatives: the run's generator must be restored too, not only the global one
    # as the presets train (fused AdamW, channels-last), in two micro-batches
    cfg = load_config(folder_config(tmp_path, image_root, epochs=2, **{
        "rule.negatives": "random", "optim.fused": True,
        "rule.options": {"context": "both", "micro_batches": 2}}))
    whole = run(cfg, tmp_path / "whole")

    calls = {"n": 0}
    original = Trainer.train_epoch

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(cfg, tmp_path / "cut")
    assert resumed["probe_accuracy"] == whole["probe_accuracy"]
    assert resumed["probe_block_accuracies"] == whole["probe_block_accuracies"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key
    for key, value in a["rule"].items():
        assert torch.equal(value, b["rule"][key]), key


def test_probe_command_updates_the_run(tmp_path, image_root):
    out = tmp_path / "run"
    cfg = load_config(folder_config(tmp_path, image_root, epochs=0))
    first = run(cfg, out)
    result = probe_run(out, ["probe.epochs=0", "probe.steps=20", "probe.per_block=false",
                             "probe.augment=false"])
    assert "L-BFGS" in result["probe_protocol"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_accuracy"] == result["probe_accuracy"]
    assert "probe_block_accuracies" not in summary
    assert summary["epochs"] == first["epochs"] == 0
    assert json.loads((out / "probe.json").read_text())["accuracy"] == result["probe_accuracy"]
    augmented = probe_run(out, ["probe.epochs=1", "probe.augment=true"])
    assert "crop + flip" in augmented["probe_protocol"]
    with pytest.raises(ValueError, match="cannot change a saved run"):
        probe_run(out, ["optim.lr=1.0"])
    with pytest.raises(ValueError, match="unknown config key 'probe.epoch'"):
        probe_run(out, ["probe.epoch=3"])
    with pytest.raises(ValueError, match="not a run directory"):
        probe_run(tmp_path / "nothing")
    parser = argparse.ArgumentParser()
    add_probe(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["probe", str(out), "probe.epochs=1", "--quiet"])
    assert args.run_dir == str(out) and args.overrides == ["probe.epochs=1"] and args.quiet


def test_bad_rule_options_fail_before_the_data_loads(tmp_path, capsys):
    missing = tmp_path / "no-such-images"
    raw = {"data": {"name": "folder", "root": str(missing)}, "net": {"kind": "vgg6"},
           "rule": {"name": "clapp-image", "options": {"micro_batches": 0}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "micro_batches=0 is invalid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"rule.name": "backprop", "rule.options": {}}, "rule.name='backprop' does not fit image"),
        ({"net.kind": "hier-cnn"}, "net.kind='hier-cnn' does not fit data.name=folder"),
        ({"data.colour": 1}, "unknown config key 'data.colour'"),
        ({"rule.options": {"context": "top", "depth": 2}},
         "unknown config key 'rule.options.depth'"),
        ({"data.subset": 1}, "data.subset=1 is invalid"),
        ({"data.root": "/nonexistent/images"}, "does not exist"),
        ({"rule.options": {"pool": [3, 1, 1, 1, 1, 1]}}, r"pool\[0\]=3 does not divide"),
        ({"probe.batch_size": 0}, "probe.batch_size=0 is invalid"),
        ({"probe.grid": [4, 0]}, r"probe.grid=\[4, 0\] is invalid"),
        ({"data.probe_augment": True}, "unknown config key 'data.probe_augment'"),
        ({"data.views.blur": 0}, "unknown config key 'data.views.blur'; valid keys under "
                                 "data.views: crop_scale"),
        ({"data.views.blur_p": 1.5}, r"data.views.blur_p=1.5 is invalid: must lie in \[0, 1\]"),
        ({"data.views.crop_scale": [0.5, 0.2]}, r"data.views.crop_scale=\[0.5, 0.2\] is invalid"),
        ({"data.views.jitter": [0.4, 0.4]}, r"data.views.jitter=\[0.4, 0.4\] is invalid: give 4"),
        ({"data.views.jitter": [0.8, 0.8, 0.8, 0.6]}, r"hue in \[0, 0.5\]"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_2(tmp_path, image_root, capsys, extra, match):
    code = cli.main(["run", str(folder_config(tmp_path, image_root, **extra)), "--out",
                     str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert re.search(match, err), err


def test_batches_give_two_normalised_views(tmp_path, image_root):
    cfg = load_config(folder_config(tmp_path, image_root))
    torch.manual_seed(0)
    task = ImageTask(cfg, torch.device("cpu"))
    batches = list(task.batches(torch.Generator().manual_seed(0), 12, "ssl"))
    assert [b.x.shape[0] for b in batches] == [12, 12, 8]
    b = batches[0]
    assert b.views[0].shape == b.views[1].shape == (12, 3, 16, 16)
    assert not torch.equal(b.views[0], b.views[1])
    assert b.y is not None and b.x.dtype == torch.float32
    assert abs(float(b.x.mean())) < 3
    with pytest.raises(ValueError, match="views of kind"):
        next(task.batches(torch.Generator(), 4, "synonyms"))


def test_data_views_set_the_augmentations(tmp_path, image_root):
    """``data.views`` reaches the task's views; unset keys keep the paper's values, so the
    default draws the same views as an explicit paper setting."""
    def first_views(**extra):
        cfg = load_config(folder_config(tmp_path, image_root, **extra))
        task = ImageTask(cfg, torch.device("cpu"))
        torch.manual_seed(3)
        return task, next(iter(task.batches(torch.Generator().manual_seed(0), 8, "ssl"))).views

    paper, v_paper = first_views()
    assert (paper.views.blur_p, paper.views.crop_scale) == (0.5, (0.08, 1.0))  # folder data
    same, v_same = first_views(**{"data.views": {"blur_p": 0.5, "jitter": [0.8, 0.8, 0.8, 0.2]}})
    assert all(torch.equal(a, b) for a, b in zip(v_paper, v_same))
    light, v_light = first_views(**{"data.views": {"blur_p": 0, "crop_scale": [0.5, 1],
                                                   "jitter": [0.4, 0.4, 0.4, 0.1]}})
    assert light.views.blur_p == 0.0 and light.views.crop_scale == (0.5, 1.0)
    assert light.views.jitter == (0.4, 0.4, 0.4, 0.1)
    stages = [type(m).__name__ for m in light.views._pipeline(16, 16)]
    assert "RandomGaussianBlur" not in stages and "ColorJitter" in stages
    assert not torch.equal(v_paper[0], v_light[0])


def test_a_run_saved_before_data_views_resumes_only_with_the_paper_views(tmp_path, image_root,
                                                                          capsys):
    out = tmp_path / "run"
    config = folder_config(tmp_path, image_root)
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    raw = yaml.safe_load((out / "config.yaml").read_text())
    del raw["data"]["views"]  # as written before the key existed
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    (out / "summary.json").unlink()  # not finished: the run goes on from its checkpoint
    capsys.readouterr()
    code = cli.main(["run", str(config), "--out", str(out), "data.views.blur_p=0"])
    err = capsys.readouterr().err
    assert code == 2 and "differs at data.views.blur_p" in err, err
    assert cli.main(["run", str(config), "--out", str(out), "epochs=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 copy not present")
def test_real_cifar10_images_run_and_probe(tmp_path):
    # the first 18 test images of every class (the small archive): 12 as train/, 6 as test/
    root = tmp_path / "cifar10"
    with tarfile.open(SHARED_CIFAR / "cifar10-test-jpeg.tar.gz") as tar:
        wanted = []
        for m in tar:
            if m.isfile() and int(Path(m.name).stem) < 18:
                if int(Path(m.name).stem) < 12:
                    m.name = m.name.replace("test/", "train/", 1)
                wanted.append(m)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=wanted, **kwargs)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/images/clapp++-cpu.yaml",
                      [f"data.root={root}", "data.subset=null", "data.probe_subset=null",
                       "epochs=1", "probe.epochs=5", "progress=false"])
    summary = run(cfg, tmp_path / "run")
    assert summary["train_size"] == 120 and summary["image_size"] == 32
    assert summary["epochs"] == 1
    # 10 classes (chance 0.1), 60 test images; this seed gives 0.25 (15 right)
    assert summary["probe_accuracy"] > 0.15
    assert len(summary["probe_block_accuracies"]) == 6
    assert len(summary["probe_block_silent"]) == 6
    assert all(0 <= share < 1 for share in summary["probe_block_silent"])
    assert summary["probe_top_accuracy"] == summary["probe_block_accuracies"][-1]
    assert summary["probe_top_silent"] == summary["probe_block_silent"][-1]


def _old_index_of_new(channels: int, dim: int) -> torch.Tensor:
    """For each position-major feature, its index in the channel-major flattening that the
    earlier code used (``avg_pool2d(z, p).flatten(1)``), found by matching distinct values."""
    from locallearn.rules.image_grid import pool_flat

    cells = round((dim // channels) ** 0.5)
    z = torch.randperm(dim).double().reshape(1, channels, cells, cells)
    old, new = z.flatten(1)[0], pool_flat(z, 1)[0]
    return torch.stack([(old == v).nonzero()[0, 0] for v in new])


@pytest.mark.parametrize("rule", [{"name": "clapp-image", "options": {"context": "both"}},
                                  {"name": "bp-ssl", "options": {}}])
def test_runs_saved_with_the_earlier_layout_load_unchanged(tmp_path, image_root, rule):
    """Runs saved before the probe settings moved and features were flattened position-major."""
    from locallearn.experiments.runs import load_run

    cfg_path = folder_config(tmp_path, image_root, **{"rule.name": rule["name"],
                                                "rule.options": rule["options"]})
    out = tmp_path / "run"
    run(load_config(cfg_path), out)
    now = load_run(out)
    b_now = {k: v.clone() for k, v in now.rule.state_dict().items()}
    assert b_now and all(float(v.abs().max()) > 0 for v in b_now.values())
    # write the run as the earlier code did: probe keys in data, B in channel-major order
    raw = yaml.safe_load((out / "config.yaml").read_text())
    for old, new in (("probe_augment", "augment"), ("probe_per_block", "per_block"),
                     ("probe_batch_size", "batch_size"), ("probe_grid", "grid")):
        raw["data"][old] = raw["probe"].pop(new)
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["format"]
    channels = [b.pre.out_channels for b in now.net.blocks]
    orders = [_old_index_of_new(c, d) for c, d in zip(channels, now.rule.dims)]
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders)
    for key, value in ckpt["rule"].items():
        level = int(key.split(".")[-1]) if rule["name"] == "clapp-image" else -1
        rows = orders[level]
        cols = orders[-1] if key.startswith("B_top.") or rule["name"] == "bp-ssl" else rows
        old = torch.empty_like(value)
        old[rows[:, None], cols[None, :]] = value
        ckpt["rule"][key] = old
    torch.save(ckpt, out / "checkpoint.pt")
    legacy = load_run(out)
    assert legacy.cfg.probe.per_block is True
    for key, value in legacy.rule.state_dict().items():
        assert torch.equal(value, b_now[key]), key
    # the align command reloads the checkpoint itself
    trainer = Trainer(legacy.cfg, legacy.task, out)
    trainer.load_checkpoint()
    for key, value in trainer.rule.state_dict().items():
        assert torch.equal(value, b_now[key]), key


def test_stop_train_loss_ends_an_image_run_early(tmp_path, image_root):
    config = folder_config(tmp_path, image_root, epochs=4, stop_train_loss=1e9,
                           **{"probe.epochs": 1})
    summary = run(load_config(config, []), tmp_path / "run")
    assert summary["stopped_early"] and summary["epochs"] == 1
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["epoch"] for r in rows][-1] == 1 and rows[-1]["loss"] < 1e9
    # without the threshold the same run goes on to its last epoch
    summary = run(load_config(config, ["stop_train_loss=null", "epochs=2"]), tmp_path / "full")
    assert not summary["stopped_early"] and summary["epochs"] == 2


def test_probe_reports_the_share_of_silent_features():
    """Units that never fire on the probe images are counted per block, by both probes."""
    from locallearn.eval.image_probe import ProbeSettings, run_probe
    from locallearn.eval.stream_probe import run_stream_probe

    net = vgg6(width_mult=1 / 16, seed=0)  # top block: 64 channels on a 2x2 grid
    with torch.no_grad():
        for block in net.blocks:  # positive weights and biases: every unit fires
            block.pre.weight.abs_()
            block.pre.bias.fill_(0.1)
        net.blocks[-1].pre.bias[:5] = -1e6  # but 5 channels of the top block never do
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(24) % 2

    def transform(x):
        return x.float() / 255

    def batches(order, batch_size):
        yield images, labels

    settings = ProbeSettings(epochs=1)
    full = run_probe(net, images, labels, images, labels, 2, transform, settings)
    assert full.silent_fractions[:5] == [0.0] * 5
    assert full.silent_fractions[5] == pytest.approx(5 / 64)
    streamed = run_stream_probe(net, batches, 24, batches, 2, 32, transform, settings,
                                augment=False)
    assert streamed.silent_fractions == full.silent_fractions
