"""Streamed image data (ImageNet layout, streamed folders), the VGG-8 presets, resume.

The tests write a small ImageNet-shaped tree of real JPEG files (three wnids, images of varying
sizes and aspect ratios, a grayscale one), with the validation split in the three official forms:
``val/<wnid>/`` folders, a flat ``val/`` with ``LOC_val_solution.csv``, and a flat ``val/`` with
the devkit's ground truth and ``meta.mat``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from interrupt import full_and_resumed
from PIL import Image

from locallearn.data.streaming import PathList, StreamLoader, decode_square, open_stream
from locallearn.experiments.runs import run
from locallearn.experiments.tasks import build_task
from locallearn.nets.vgg import VGG8_PLAN, feature_sides, probe_grid, vgg8
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n02000003", "n01000001", "n01500002"]  # written unsorted: labels follow sorted order
COLORS = {"n01000001": (220, 40, 40), "n01500002": (40, 200, 60), "n02000003": (40, 60, 220)}
PER_CLASS = 8
VAL_PER_CLASS = 3


def _image(rng: np.random.Generator, wnid: str, w: int, h: int) -> Image.Image:
    arr = np.asarray(COLORS[wnid]) + rng.integers(-30, 30, (h, w, 3))
    arr[rng.integers(0, h), :, :] = 255
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(36, 90)), int(rng.integers(36, 90))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    val_rows = ["ImageId,PredictionString"]
    val_index = 0
    for wnid in WNIDS:
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            _image(rng, wnid, *_size(rng)).save(folder / f"{wnid}_{i + 1}.JPEG", quality=90)
        (root / "val" / wnid).mkdir(parents=True)
        for _ in range(VAL_PER_CLASS):
            val_index += 1
            name = f"ILSVRC2012_val_{val_index:08d}"
            _image(rng, wnid, *_size(rng)).save(root / "val" / wnid / f"{name}.JPEG")
            val_rows.append(f"{name},{wnid} 1 2 30 40")
    gray = Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), mode="L")
    gray.save(root / "train" / "n01000001" / "n01000001_99.JPEG")
    (root / "val_solution.csv").write_text("\n".join(val_rows) + "\n")
    return root


def _flat_copy(src: Path, dst: Path) -> list[tuple[str, str]]:
    """A copy of ``src`` with a flat val/ folder; returns (stem, wnid) of the val images."""
    import shutil

    shutil.copytree(src / "train", dst / "train")
    (dst / "val").mkdir()
    pairs = []
    for wnid_dir in sorted((src / "val").iterdir()):
        for f in sorted(wnid_dir.iterdir()):
            shutil.copy(f, dst / "val" / f.name)
            pairs.append((f.stem, wnid_dir.name))
    return sorted(pairs)


def test_train_listing_and_label_order(imagenet):
    data = open_stream("imagenet", imagenet, "train", 40)
    assert data.classes == sorted(WNIDS)
    assert len(data) == 3 * PER_CLASS + 1
    for i in range(len(data)):
        wnid = Path(data.paths[i]).parent.name
        assert data.labels[i] == sorted(WNIDS).index(wnid)
    image, label = data[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40) and label == 0


def test_val_labels_in_all_three_official_forms(imagenet, tmp_path):
    folders = open_stream("imagenet", imagenet, "val", 32)
    by_name = {Path(folders.paths[i]).stem: int(folders.labels[i]) for i in range(len(folders))}
    assert len(by_name) == 3 * VAL_PER_CLASS and sorted(set(by_name.values())) == [0, 1, 2]

    flat = tmp_path / "flat"
    pairs = _flat_copy(imagenet, flat)
    with pytest.raises(ValueError, match="needs its labels"):
        open_stream("imagenet", flat, "val", 32)
    (flat / "LOC_val_solution.csv").write_text((imagenet / "val_solution.csv").read_text())
    csv_set = open_stream("imagenet", flat, "val", 32)
    assert {Path(csv_set.paths[i]).stem: int(csv_set.labels[i])
            for i in range(len(csv_set))} == by_name

    # the devkit: ILSVRC2012 ids in meta.mat order (not the sorted wnid order)
    from scipy.io import savemat

    (flat / "LOC_val_solution.csv").unlink()
    devkit = flat / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    ids = {"n02000003": 1, "n01000001": 2, "n01500002": 3}
    synsets = np.zeros(3, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for k, (w, i) in enumerate(ids.items()):
        synsets[k] = (i, w)
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(str(ids[w]) for _, w in pairs) + "\n")
    kit = open_stream("imagenet", flat, "val", 32)
    assert {Path(kit.paths[i]).stem: int(kit.labels[i]) for i in range(len(kit))} == by_name


def test_decode_square_takes_the_centre_and_converts_to_rgb(tmp_path):
    arr = np.zeros((40, 120, 3), np.uint8)  # left third red, centre green, right third blue
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:80] = (0, 255, 0)
    arr[:, 80:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    sq = decode_square(str(tmp_path / "wide.png"), 20)
    assert sq.shape == (3, 20, 20)
    inner = sq[:, :, 2:-2]  # the resampling filter reaches one source pixel past the square
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()
    assert sq[0].max() < 60 and sq[2].max() < 60  # red and blue thirds are cut off
    Image.fromarray(np.full((30, 30), 77, np.uint8), mode="L").save(tmp_path / "g.jpg")
    g = decode_square(str(tmp_path / "g.jpg"), 16)
    assert g.shape == (3, 16, 16) and torch.equal(torch.from_numpy(g[0]), torch.from_numpy(g[2]))
    (tmp_path / "broken.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*broken.JPEG"):
        decode_square(str(tmp_path / "broken.JPEG"), 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_decodes_the_given_batches_in_worker_processes(imagenet, workers):
    data = open_stream("imagenet", imagenet, "train", 24)
    loader = StreamLoader(data, workers=workers, prefetch=2)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    chunks = [order[s:s + 5].tolist() for s in range(0, len(data), 5)]
    got = list(loader.batches(chunks))
    assert [len(y) for _, y in got] == [len(c) for c in chunks]
    for (images, labels), chunk in zip(got, chunks):
        expect = torch.stack([data[i][0] for i in chunk])
        assert torch.equal(images, expect)
        assert labels.tolist() == [int(data.labels[i]) for i in chunk]
    # a second pass in another order (the workers are kept)
    again = list(loader.batches([chunks[1]]))
    assert torch.equal(again[0][0], got[1][0])
    # the pixel memory held at once is bounded by the batches in flight, not by the dataset
    assert loader.bytes_in_flight(5) == 5 * 3 * 24 * 24 * (max(workers, 1) * (2 if workers
                                                                              else 1) + 1)
    assert data.paths.nbytes < 100 * len(data)


def test_broken_file_is_a_one_line_error_from_a_worker(imagenet, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(imagenet / "train", root / "train")
    (root / "train" / "n01000001" / "n01000001_1.JPEG").write_bytes(b"garbage")
    data = open_stream("imagenet", root, "train", 16)
    loader = StreamLoader(data, workers=1, persistent=False)
    with pytest.raises(ValueError) as err:
        list(loader.batches([list(range(len(data)))]))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot decode image") and "n01000001_1" in msg


def test_path_list_round_trip():
    items = ["a/b.JPEG", "", "ü/ß.jpg", "n01/n01_10.JPEG"]
    pl = PathList(items)
    assert [pl[i] for i in range(len(pl))] == items
    assert [pl.take(np.array([3, 0]))[i] for i in range(2)] == ["n01/n01_10.JPEG", "a/b.JPEG"]


def test_vgg8_blocks_sides_and_probe_features():
    assert [b.pre.out_channels for b in vgg8(1 / 16).blocks] == [c // 16 for c, _ in VGG8_PLAN]
    net = vgg8(1 / 64)  # sides and pools do not depend on the width
    assert feature_sides(net, 224) == [224, 112, 56, 56, 28, 14, 14, 7]
    from locallearn.eval.image_probe import probe_pools
    from locallearn.rules.image_grid import resolve_pools

    assert resolve_pools("auto", feature_sides(net, 224)) == [28, 28, 14, 14, 14, 7, 7, 7]
    pools = probe_pools(net, 224)
    dims = [c * (s // p) ** 2 for (c, _), s, p in zip(VGG8_PLAN, feature_sides(net, 224), pools)]
    assert sum(dims) == 35840 and probe_grid(8) == (4, 4, 4, 4, 2, 2, 2, 1)


SMALL = ["net.width_mult=0.0625", "data.image_size=32", "data.load_size=36", "batch_size=6",
         "epochs=1", "probe.epochs=1", "probe.batch_size=8", "data.workers=1", "threads=1",
         "progress=false", "device=cpu", "optim.warmup_epochs=0.5"]


@pytest.mark.parametrize("preset", ["clapp++dfb", "bp-clapp++", "bp-infonce"])
def test_imagenet_presets_run_a_few_steps_and_probe(imagenet, tmp_path, preset):
    cfg = load_config(ROOT / "configs" / "imagenet" / f"{preset}.yaml",
                      [f"data.root={imagenet}", *SMALL])
    assert cfg.net.kind == "vgg8" and cfg.optim.name == "lars" and cfg.data.streams()
    summary = run(cfg, tmp_path / preset)
    assert summary["streaming"] is True and summary["train_size"] == 3 * PER_CLASS + 1
    assert summary["image_size"] == 32 and summary["num_classes"] == 3
    rows = [json.loads(x) for x in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and np.isfinite(rows[-1]["loss"])
    probe = json.loads((tmp_path / preset / "probe.json").read_text())
    assert probe["n_train"] == 3 * PER_CLASS + 1 and probe["n_test"] == 3 * VAL_PER_CLASS
    assert len(probe["block_accuracies"]) == 8 and 0.0 <= probe["accuracy"] <= 1.0
    assert "streamed" in probe["protocol"]
    state = torch.load(tmp_path / preset / "checkpoint.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 4  # 25 images: 4 batches of 6, a lone one left


def _small_cfg(imagenet: Path, *extra: str):
    return load_config(ROOT / "configs" / "imagenet" / "clapp++dfb.yaml",
                       [f"data.root={imagenet}", *SMALL, *extra])


def test_views_are_cut_from_the_decoded_square_on_the_device(imagenet, tmp_path):
    cfg = _small_cfg(imagenet, "data.load_size=40")
    task = build_task(cfg)
    assert not hasattr(task, "train_images")  # nothing decoded up front
    gen = torch.Generator().manual_seed(0)
    batches = list(task.batches(gen, 6, "ssl"))
    assert len(batches) == task.steps_per_epoch(6) == 4
    b = batches[0]
    assert b.x.shape == (6, 3, 32, 32) and b.x.dtype == torch.float32
    assert b.views[0].shape == b.views[1].shape == (6, 3, 32, 32)
    assert not torch.equal(b.views[0], b.views[1])
    assert b.y is not None and b.y.shape == (6,)
    # the epoch's order is the generator's: the same seed gives the same images
    again = list(task.batches(torch.Generator().manual_seed(0), 6, None))
    assert all(torch.equal(a.x, c.x) for a, c in zip(batches, again))
    other = list(task.batches(torch.Generator().manual_seed(1), 6, None))
    assert not all(torch.equal(a.x, c.x) for a, c in zip(batches, other))


def test_streamed_resume_is_bit_identical(imagenet, tmp_path, monkeypatch):
    cfg = _small_cfg(imagenet, "epochs=3", "probe.epochs=1")
    full, resumed = full_and_resumed(cfg, tmp_path, monkeypatch)
    assert resumed["probe_accuracy"] == full["probe_accuracy"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(a["rule"][k], b["rule"][k]) for k in a["rule"])
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text()
          .splitlines()[1:]]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text()
          .splitlines()[1:]]
    assert la == lb and len(set(la)) == 3


def test_folder_in_streaming_mode(imagenet, tmp_path):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(imagenet / "train", root / "train")
    shutil.copytree(imagenet / "val", root / "test")
    cfg = load_config(None, [
        "data.name=folder", f"data.root={root}", "data.streaming=true", "data.image_size=32",
        "data.workers=0", "net.kind=vgg6", "net.width_mult=0.0625", "rule.name=clapp-image",
        "batch_size=8", "epochs=1", "probe.epochs=1", "progress=false", "threads=1"])
    summary = run(cfg, tmp_path / "run")
    assert summary["streaming"] and summary["load_size"] == 35 and summary["train_size"] == 25
    assert summary["probe_accuracy"] is not None


@pytest.mark.parametrize("args, fragment", [
    (["data.name=imagenet", "data.streaming=false"], "data.streaming=false is invalid"),
    (["data.name=cifar10", "data.streaming=true"], "data.streaming=true is invalid"),
    (["data.name=cifar10", "data.image_size=64"], "data.image_size applies to streamed"),
    (["data.name=imagenet", "data.workers=-1"], "data.workers=-1"),
    (["data.name=folder", "data.workers=2"], "data.workers applies to streamed data only"),
    (["data.name=imagenet", "data.download=true"], "data.download=true is invalid"),
])
def test_bad_streaming_options_are_one_line_errors(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_config(None, args)


def test_missing_imagenet_layout_is_a_one_line_error(tmp_path, capsys):
    from locallearn.cli import main

    code = main(["run", str(ROOT / "configs" / "imagenet" / "clapp++dfb.yaml"),
                 "--out", str(tmp_path / "out"), f"data.root={tmp_path}", "device=cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no ImageNet data under" in err


SCRIPT = """
import sys, torch
from locallearn import distributed as ddp
from locallearn.schema import load_config
from locallearn.data.streaming import StreamSet
from locallearn.experiments.tasks import build_task
calls = []
get = StreamSet.__getitem__
StreamSet.__getitem__ = lambda self, i: calls.append(i) or get(self, i)
ddp.init_from_env("cpu")
torch.manual_seed(0)
task = build_task(load_config(sys.argv[1], sys.argv[3:]))
out = [(b.x, b.views, b.y) for b in task.batches(torch.Generator().manual_seed(5), 6, "ssl")]
decoded = len(calls)
# the probe's pass: a last chunk of one image leaves rank 1 nothing to decode
tail = [y for _, y in task.stream.batches(None, len(task.stream) - 1)]
torch.save({"batches": out, "decoded": decoded, "tail": tail}, f"{sys.argv[2]}.{ddp.rank()}")
ddp.cleanup()
"""


def test_two_ranks_decode_their_parts_and_gather_the_batch_of_one(imagenet, tmp_path):
    """Under torchrun each rank's workers decode its half of every global batch; after the
    gather every rank holds the global batch and draws the same views as one process. A batch
    smaller than the number of ranks (the probe's last) is kept, not dropped."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    config = str(ROOT / "configs" / "imagenet" / "bp-clapp++.yaml")
    args = [f"data.root={imagenet}", *SMALL, "data.workers=0"]  # decoded here: countable
    (tmp_path / "probe.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
           str(tmp_path / "probe.py"), config, str(tmp_path / "out"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.manual_seed(0)
    task = build_task(load_config(config, args))
    single = list(task.batches(torch.Generator().manual_seed(5), 6, "ssl"))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert saved["decoded"] == 4 * 3  # 3 of the 6 images of each of the 4 batches
        got = saved["batches"]
        assert len(got) == len(single) == 4
        for (x, views, y), b in zip(got, single):
            assert torch.equal(x, b.x) and torch.equal(y, b.y)
            assert torch.equal(views[0], b.views[0]) and torch.equal(views[1], b.views[1])
        tail = saved["tail"]
        assert [len(y) for y in tail] == [len(task.stream) - 1, 1]
        assert torch.equal(torch.cat(tail), torch.as_tensor(task.stream.dataset.labels))


def test_random_crop_flip_cuts_windows_of_each_image():
    from locallearn.data.augment import center_crop, random_crop_flip

    x = torch.arange(16 * 3 * 9 * 11, dtype=torch.float32).reshape(16, 3, 9, 11)
    out = random_crop_flip(x, 6, torch.Generator().manual_seed(0))
    flips = 0
    for i in range(16):
        windows = {(t, l): x[i, :, t:t + 6, l:l + 6] for t in range(4) for l in range(6)}
        plain = [k for k, w in windows.items() if torch.equal(out[i], w)]
        flipped = [k for k, w in windows.items() if torch.equal(out[i], w.flip(-1))]
        assert len(plain) + len(flipped) == 1
        flips += len(flipped)
    assert 0 < flips < 16
    assert torch.equal(random_crop_flip(x, 6, torch.Generator().manual_seed(0)), out)
    assert torch.equal(center_crop(x, 5), x[:, :, 2:7, 3:8])


def test_probe_command_on_a_streamed_run(imagenet, tmp_path):
    from locallearn.experiments.probe_command import probe_run

    run(_small_cfg(imagenet, "epochs=0"), tmp_path / "run")
    out = probe_run(tmp_path / "run", ["probe.epochs=2", "data.test_subset=4",
                                       "probe.per_block=false"])
    probe = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert probe["n_test"] == 4 and probe["block_accuracies"] is None
    assert "2 epochs" in out["probe_protocol"] and "streamed" in out["probe_protocol"]


def test_learning_curve_on_streamed_data(imagenet, tmp_path):
    cfg = _small_cfg(imagenet, "epochs=2", "probe_every=1", "probe.curve_train=7",
                     "probe.curve_test=5")
    task = build_task(cfg)
    curve = replace(cfg.data, probe_subset=7, test_subset=5)
    tr_x, tr_y, te_x, te_y = task.probe_data(curve, salt=4)
    assert tr_x.shape == (7, 3, 32, 32) and te_x.shape == (5, 3, 32, 32)
    assert tr_x.dtype == torch.uint8 and tr_y.shape == (7,) and te_y.shape == (5,)
    assert set(tr_y.tolist()) <= {0, 1, 2} and set(te_y.tolist()) <= {0, 1, 2}
    # a fixed draw: the same images every time, another salt draws others
    again = task.probe_data(curve, salt=4)
    assert torch.equal(again[0], tr_x) and torch.equal(again[3], te_y)
    assert not torch.equal(task.probe_data(curve, salt=2)[0], tr_x)
    run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe_accuracy" in r and "epoch" in r]
    assert [r["epoch"] for r in probes][-2:] == [1, 2]
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 and "seconds" in r and "step" in r
               for r in probes)
