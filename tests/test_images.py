"""Tests of the image readers in locallearn.data.images.

Unit tests write small files in each official format and read them back. Tests marked
``realdata`` read the compressed copies of CIFAR-10 and Tiny ImageNet kept in ``shared/data``
next to the repository; they run whenever that folder exists.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.data import image_files as F
from locallearn.data.download import extract, verify
from locallearn.data.images import (
    CIFAR10_CLASSES,
    DATASETS,
    ImageSet,
    channel_stats,
    dataset_info,
    load_images,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save_png(path: Path, hwc: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hwc).save(path, format="PNG")


def _save_jpeg(path: Path, hwc: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hwc).save(path, format="JPEG", quality=95)


def _solid(color: tuple[int, int, int], side: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (side, side, 3)).copy()


# ----------------------------------------------------------------------------------------------
# dataset facts, entry-point errors


def test_dataset_info():
    assert dataset_info("cifar10").crop_scale == (0.25, 1.0)
    for name in ("stl10", "tiny-imagenet", "folder"):
        assert dataset_info(name).crop_scale == (0.08, 1.0)
    assert dataset_info("cifar10").image_size == 32
    assert dataset_info("STL_10").image_size == 96
    assert dataset_info("tiny_imagenet").image_size == 64
    assert dataset_info("tiny-imagenet").num_classes == 200
    for info in DATASETS.values():
        assert len(info.mean) == 3 and len(info.std) == 3
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 0.5 for s in info.std)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset name 'mnist'; valid names: cifar10"):
        load_images("mnist", tmp_path, "train")
    with pytest.raises(ValueError, match="does not exist"):
        load_images("cifar10", tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="unknown split 'validation'; valid splits: train, test"):
        load_images("cifar10", tmp_path, "validation")
    with pytest.raises(ValueError, match="valid splits: train, test, unlabeled, train\\+unlabeled"):
        load_images("stl10", tmp_path, "extra")
    with pytest.raises(ValueError, match="no CIFAR-10 data"):
        load_images("cifar10", tmp_path, "train")
    with pytest.raises(ValueError, match="no STL-10 data"):
        load_images("stl10", tmp_path, "train")
    with pytest.raises(ValueError, match="no Tiny ImageNet data"):
        load_images("tiny-imagenet", tmp_path, "val")


def test_error_messages_are_one_line(tmp_path):
    for args in (("mnist", tmp_path, "train"), ("cifar10", tmp_path, "train"),
                 ("folder", tmp_path, "train")):
        with pytest.raises(ValueError) as err:
            load_images(*args)
        assert "\n" not in str(err.value)


def test_imageset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), [], "x", "y")
    with pytest.raises(ValueError, match="int64"):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64),
                 [], "x", "y")
    s = ImageSet(torch.zeros(2, 3, 4, 5, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"],
                 "folder", "all")
    assert len(s) == 2 and s.num_classes == 2 and s.image_size == (4, 5)
    assert s.to("cpu").images.shape == (2, 3, 4, 5)


def test_channel_stats():
    x = torch.from_numpy(_rng().integers(0, 256, (50, 3, 8, 8), dtype=np.uint8))
    mean, std = channel_stats(x, chunk=7)
    xf = x.double() / 255
    torch.testing.assert_close(mean, xf.mean((0, 2, 3)))
    torch.testing.assert_close(std, xf.permute(1, 0, 2, 3).reshape(3, -1).std(1, correction=0))


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def _write_cifar_pickles(root: Path, n: int = 6, str_keys: bool = False) -> dict:
    """Write a miniature official python release; return the arrays written."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = _rng(1)
    out = {}

    def key(k: str):
        return k if str_keys else k.encode()

    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(d / fname, "wb") as f:
            pickle.dump({key("batch_label"): key(fname), key("labels"): labels,
                         key("data"): data, key("filenames"): [key("x.png")] * n}, f, protocol=2)
        out[fname] = (data, labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [key(c) for c in CIFAR10_CLASSES],
                     key("num_vis"): 3072}, f, protocol=2)
    return out


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_pickles_round_trip(tmp_path, str_keys):
    written = _write_cifar_pickles(tmp_path, str_keys=str_keys)
    train = load_images("cifar10", tmp_path, "train")
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.images.dtype == torch.uint8 and train.images.shape == (30, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    # the first 1024 bytes of a row are the red channel, row-major
    assert train.images[0, 0, 0, 1] == data[0, 1] and train.images[0, 2, 1, 0] == data[0, 2080]
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels
    assert train.classes == list(CIFAR10_CLASSES)
    assert (train.name, train.split) == ("cifar10", "train")
    # root may also be the release folder itself
    test = load_images("cifar10", tmp_path / "cifar-10-batches-py", "test")
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0]).view(-1, 3, 32, 32))
    assert test.labels.tolist() == written["test_batch"][1]


def test_cifar10_pickles_refuse_code(tmp_path):
    _write_cifar_pickles(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="forbidden global"):
        load_images("cifar10", tmp_path, "test")


def test_cifar10_pickles_bad_content(tmp_path):
    _write_cifar_pickles(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="uint8 \\(N, 3072\\)"):
        load_images("cifar10", tmp_path, "test")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="missing .*data_batch_3"):
        load_images("cifar10", tmp_path, "train")


def _write_cifar_tree(root: Path, split: str, per_class: int = 3, classes=CIFAR10_CLASSES):
    rng = _rng(2)
    arrays = {}
    for c in classes:
        for i in range(per_class):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            _save_png(root / split / c / f"{i:04d}.png", img)
            arrays[(c, i)] = img
    return arrays


def test_cifar10_tree_round_trip(tmp_path):
    arrays = _write_cifar_tree(tmp_path, "test")
    s = load_images("cifar10", tmp_path, "test", cache=False)
    assert s.images.shape == (30, 3, 32, 32)
    assert s.labels.tolist() == [k for k in range(10) for _ in range(3)]
    assert s.classes == list(CIFAR10_CLASSES)
    for k, c in enumerate(CIFAR10_CLASSES):
        for i in range(3):
            expected = torch.from_numpy(arrays[(c, i)]).permute(2, 0, 1)
            assert torch.equal(s.images[3 * k + i], expected)
    with pytest.raises(ValueError, match="no CIFAR-10 data"):
        load_images("cifar10", tmp_path, "train")


def test_cifar10_tree_needs_official_classes(tmp_path):
    _write_cifar_tree(tmp_path, "train", per_class=1, classes=CIFAR10_CLASSES[:9] + ("lorry",))
    with pytest.raises(ValueError, match="expected the official"):
        load_images("cifar10", tmp_path, "train")


def test_cifar10_prefers_pickles_over_tree(tmp_path):
    written = _write_cifar_pickles(tmp_path)
    _write_cifar_tree(tmp_path, "test", per_class=1)
    s = load_images("cifar10", tmp_path, "test")
    assert torch.equal(s.images, torch.from_numpy(written["test_batch"][0]).view(-1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------
# STL-10


def _stl_bytes(images: np.ndarray) -> bytes:
    """Encode (N, 3, 96, 96) [n, channel, row, col] in the file layout: per image and channel,
    column after column (byte index channel * 9216 + col * 96 + row)."""
    n = images.shape[0]
    flat = np.empty((n, 3 * 96 * 96), dtype=np.uint8)
    ch, row, col = np.meshgrid(np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    flat[:, (ch * 9216 + col * 96 + row).ravel()] = images.reshape(n, -1)
    return flat.tobytes()


def _write_stl(root: Path, counts=(4, 3, 5)) -> dict:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = _rng(3)
    out = {}
    for part, n in zip(("train", "test", "unlabeled"), counts):
        imgs = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (d / f"{part}_X.bin").write_bytes(_stl_bytes(imgs))
        labels = None
        if part != "unlabeled":
            labels = rng.integers(1, 11, n).astype(np.uint8)
            (d / f"{part}_y.bin").write_bytes(labels.tobytes())
        out[part] = (imgs, labels)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    return out


def test_stl10_round_trip(tmp_path):
    written = _write_stl(tmp_path)
    for split in ("train", "test"):
        s = load_images("stl10", tmp_path, split)
        imgs, labels = written[split]
        assert s.images.shape == (len(imgs), 3, 96, 96)
        assert torch.equal(s.images, torch.from_numpy(imgs))
        assert s.labels.tolist() == (labels.astype(np.int64) - 1).tolist()
        assert s.classes[2] == "car" and len(s.classes) == 10
    s = load_images("stl10", tmp_path / "stl10_binary", "unlabeled")
    assert torch.equal(s.images, torch.from_numpy(written["unlabeled"][0]))
    assert (s.labels == -1).all()
    s = load_images("stl10", tmp_path, "train+unlabeled")
    assert s.images.shape == (9, 3, 96, 96)
    assert torch.equal(s.images[:4], torch.from_numpy(written["train"][0]))
    assert torch.equal(s.images[4:], torch.from_numpy(written["unlabeled"][0]))
    assert s.labels[:4].tolist() == (written["train"][1].astype(np.int64) - 1).tolist()
    assert (s.labels[4:] == -1).all()


def test_stl10_bad_files(tmp_path):
    _write_stl(tmp_path)
    d = tmp_path / "stl10_binary"
    with open(d / "test_X.bin", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ValueError, match="not a multiple of 27648"):
        load_images("stl10", tmp_path, "test")
    (d / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ValueError, match="holds 3 labels for 4 images"):
        load_images("stl10", tmp_path, "train")
    (d / "train_y.bin").write_bytes(bytes([1, 2, 11, 1]))
    with pytest.raises(ValueError, match="1..10"):
        load_images("stl10", tmp_path, "train")
    (d / "unlabeled_X.bin").unlink()
    with pytest.raises(ValueError, match="missing .*unlabeled_X.bin"):
        load_images("stl10", tmp_path, "unlabeled")


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet


_WNIDS = ["n03000000", "n01000000", "n02000000"]  # deliberately not sorted in wnids.txt


def _tiny_color(label: int, i: int) -> tuple[int, int, int]:
    return (40 * label + 20, 17 * i + 10, 200 - 30 * label)


def _write_tiny(root: Path, per_class: int = 3, val: int = 12, test: int = 2) -> Path:
    """A miniature official Tiny ImageNet tree; every image is a solid colour that encodes its
    sorted-wnid label and index, so order and labels survive JPEG compression."""
    t = root / "tiny-imagenet-200"
    t.mkdir(parents=True)
    (t / "wnids.txt").write_text("\n".join(_WNIDS) + "\n")
    (t / "words.txt").write_text(
        "n00000001\tentity\nn01000000\tfirst thing\nn02000000\tsecond, thing\n"
        "n03000000\tthird thing\n"
    )
    order = sorted(_WNIDS)
    for label, w in enumerate(order):
        for i in range(per_class):
            _save_jpeg(t / "train" / w / "images" / f"{w}_{i}.JPEG", _solid(_tiny_color(label, i)))
        (t / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i in range(val):
        label = i % 3
        _save_jpeg(t / "val" / "images" / f"val_{i}.JPEG", _solid(_tiny_color(label, i)))
        lines.append(f"val_{i}.JPEG\t{order[label]}\t0\t0\t15\t15")
    (t / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for i in range(test):
        _save_jpeg(t / "test" / "images" / f"test_{i}.JPEG", _solid((9, 9, 9)))
    return t


def _colors(s: ImageSet) -> np.ndarray:
    return s.images.float().mean((2, 3)).round().numpy()


def test_tiny_imagenet_train_val_test(tmp_path):
    _write_tiny(tmp_path)
    train = load_images("tiny-imagenet", tmp_path, "train", cache=False)
    assert train.images.shape == (9, 3, 16, 16)  # files are read at their own size
    assert train.classes == sorted(_WNIDS)  # labels index the sorted wnids
    assert train.class_descriptions == ["first thing", "second, thing", "third thing"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = np.array([_tiny_color(k, i) for k in range(3) for i in range(3)], dtype=float)
    assert np.abs(_colors(train) - expected).max() <= 3

    val = load_images("tiny-imagenet", tmp_path / "tiny-imagenet-200", "val", cache=False)
    assert len(val) == 12
    # natural order: val_2 comes before val_10
    assert val.labels.tolist() == [i % 3 for i in range(12)]
    expected = np.array([_tiny_color(i % 3, i) for i in range(12)], dtype=float)
    assert np.abs(_colors(val) - expected).max() <= 3

    test = load_images("tiny-imagenet", tmp_path, "test", cache=False)
    assert len(test) == 2 and (test.labels == -1).all()


def test_tiny_imagenet_layout_errors(tmp_path):
    t = _write_tiny(tmp_path)
    ann = t / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn01000000\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="1 annotated val images are missing .*val_99.JPEG"):
        load_images("tiny-imagenet", tmp_path, "val")
    ann.write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="line 1 does not name a file and a wnid"):
        load_images("tiny-imagenet", tmp_path, "val")
    shutil.rmtree(t / "train" / "n02000000")
    with pytest.raises(ValueError, match="missing training folder .*n02000000"):
        load_images("tiny-imagenet", tmp_path, "train")


def test_tiny_imagenet_unannotated_and_mixed_sizes(tmp_path):
    t = _write_tiny(tmp_path)
    _save_jpeg(t / "val" / "images" / "val_50.JPEG", _solid((1, 2, 3)))
    with pytest.raises(ValueError, match="have no line in"):
        load_images("tiny-imagenet", tmp_path, "val")
    (t / "val" / "images" / "val_50.JPEG").unlink()
    _save_jpeg(t / "val" / "images" / "val_7.JPEG", _solid((1, 2, 3), side=20))
    with pytest.raises(ValueError, match="val_7.JPEG is 20x20.*same size"):
        load_images("tiny-imagenet", tmp_path, "val", cache=False)


def test_corrupt_image_is_named(tmp_path):
    t = _write_tiny(tmp_path)
    (t / "val" / "images" / "val_3.JPEG").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*val_3.JPEG"):
        load_images("tiny-imagenet", tmp_path, "val", cache=False)


# ----------------------------------------------------------------------------------------------
# generic folders


def _write_folder(base: Path, classes=("cat", "dog"), per_class=(2, 3)) -> dict:
    rng = _rng(4)
    arrays = {}
    for c, n in zip(classes, per_class):
        for i in range(n):
            img = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # H=8, W=12
            sub = "nested/" if i == n - 1 else ""  # images may sit in sub-folders
            _save_png(base / c / f"{sub}img_{i}.png", img)
            arrays[(c, i)] = img
    return arrays


def test_folder_with_split(tmp_path):
    arrays = _write_folder(tmp_path / "train")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()
    s = load_images("folder", tmp_path, "train", cache=False)
    assert s.classes == ["cat", "dog"]
    assert s.images.shape == (5, 3, 8, 12)
    assert s.labels.tolist() == [0, 0, 1, 1, 1]
    order = [("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1), ("dog", 2)]
    for k, key in enumerate(order):
        assert torch.equal(s.images[k], torch.from_numpy(arrays[key]).permute(2, 0, 1))


def test_folder_without_split(tmp_path):
    _write_folder(tmp_path, classes=("b", "a", "c"), per_class=(1, 1, 2))
    s = load_images("folder", tmp_path, "all", cache=False)
    assert s.classes == ["a", "b", "c"] and s.labels.tolist() == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="no split folder 'train'.*valid splits: a, b, c, all"):
        load_images("folder", tmp_path, "train")


def test_folder_errors(tmp_path):
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        load_images("folder", tmp_path, "train")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_images("folder", tmp_path, "val")


def test_folder_decoding_with_worker_pool(tmp_path, monkeypatch):
    _write_folder(tmp_path / "train", per_class=(7, 9))
    serial = load_images("folder", tmp_path, "train", cache=False, workers=1)
    monkeypatch.setattr(F, "_POOL_MIN_FILES", 1)
    pooled = load_images("folder", tmp_path, "train", cache=False, workers=2)
    assert torch.equal(serial.images, pooled.images)
    assert torch.equal(serial.labels, pooled.labels)


# ----------------------------------------------------------------------------------------------
# cache


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    t = _write_tiny(tmp_path)
    first = load_images("tiny-imagenet", tmp_path, "val")
    cache_dir = t / F.CACHE_DIRNAME
    files = list(cache_dir.glob("tiny-imagenet-val-*.pt"))
    assert len(files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(F, "_decode_files", no_decoding)
    second = load_images("tiny-imagenet", tmp_path, "val")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.class_descriptions is not None
    monkeypatch.undo()

    # changing a file changes the key: the cache is rebuilt and the stale file removed
    _save_jpeg(t / "val" / "images" / "val_0.JPEG", _solid((250, 250, 250)))
    third = load_images("tiny-imagenet", tmp_path, "val")
    assert third.images[0].float().mean() > 240
    files_after = list(cache_dir.glob("tiny-imagenet-val-*.pt"))
    assert len(files_after) == 1 and files_after != files

    # a file replaced by another of the same size and modification time is decoded again
    path = t / "val" / "images" / "val_0.JPEG"
    before = path.stat()
    spare = tmp_path / "spare.JPEG"
    _save_jpeg(spare, _solid((5, 5, 5)))
    assert spare.stat().st_size == before.st_size  # solid colours: the same JPEG size
    os.replace(spare, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    replaced = load_images("tiny-imagenet", tmp_path, "val")
    assert replaced.images[0].float().mean() < 15

    # a corrupt cache file is ignored and rewritten
    third = replaced
    files_after[0].write_bytes(b"garbage")
    fourth = load_images("tiny-imagenet", tmp_path, "val")
    assert torch.equal(fourth.images, third.images)


def test_cache_dir_and_no_cache(tmp_path):
    _write_folder(tmp_path / "data" / "train")
    load_images("folder", tmp_path / "data", "train", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("folder-train-*.pt"))) == 1
    assert not (tmp_path / "data" / "train" / F.CACHE_DIRNAME).exists()
    load_images("folder", tmp_path / "data", "train", cache=False)
    assert not (tmp_path / "data" / "train" / F.CACHE_DIRNAME).exists()
    # the default cache folder is hidden, so it is never taken for a class
    load_images("folder", tmp_path / "data", "train")
    s = load_images("folder", tmp_path / "data", "train")
    assert (tmp_path / "data" / "train" / F.CACHE_DIRNAME).is_dir() and s.classes == ["cat", "dog"]


# ----------------------------------------------------------------------------------------------
# real data (shared/data), verified by SHA256SUMS before use


def _shared_archive(subdir: str, name: str) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    archive = SHARED_DATA / subdir / name
    sums = {}
    for line in (SHARED_DATA / subdir / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, fname = line.split(maxsplit=1)
            sums[fname.strip().lstrip("*")] = digest
    verify(archive, sha256=sums[name])
    return archive


@pytest.mark.realdata
def test_real_cifar10_test_set(tmp_path, monkeypatch):
    archive = _shared_archive("cifar10", "cifar10-test-jpeg.tar.gz")
    extract(archive, tmp_path)
    s = load_images("cifar10", tmp_path, "test")
    assert s.images.shape == (10000, 3, 32, 32) and s.images.dtype == torch.uint8
    assert s.labels.bincount().tolist() == [1000] * 10
    assert s.classes == list(CIFAR10_CLASSES)
    # pixels are those of the files, channel-first RGB
    for k in (0, 4321, 9999):
        label = int(s.labels[k])
        idx = k - 1000 * label
        path = tmp_path / "test" / s.classes[label] / f"{idx:04d}.jpg"
        ref = np.array(Image.open(path).convert("RGB"))
        assert torch.equal(s.images[k], torch.from_numpy(ref).permute(2, 0, 1))
    # the channel means are those of CIFAR-10 (RGB order, not BGR)
    mean, _ = channel_stats(s.images)
    assert torch.allclose(mean.float(), torch.tensor(DATASETS["cifar10"].mean), atol=0.01)
    # the second load reads the cache written by the first: no file is decoded again
    assert len(list(tmp_path.rglob(f"{F.CACHE_DIRNAME}/cifar10-test-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded the JPEGs instead of reading the cache")

    monkeypatch.setattr(F, "_decode_files", no_decoding)
    again = load_images("cifar10", tmp_path, "test")
    assert torch.equal(again.images, s.images)


def _extract_members(archive: Path, dest: Path, members: list[str]) -> None:
    """Extract the named members (folders recursively) of a .tar.gz archive."""
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest), *members], check=True)
        return
    with tarfile.open(archive, "r|gz") as tf:
        for m in tf:
            if any(m.name == p or m.name.startswith(p + "/") for p in members) and (
                m.isfile() or m.isdir()
            ):
                tf.extract(m, dest, filter="data")


@pytest.mark.realdata
def test_real_tiny_imagenet_val_and_two_train_classes(tmp_path):
    # The whole archive (120,000 files) takes about 20 s to extract and decode on two cores,
    # so this test reads the val split (10,000 images) and two training classes.
    archive = _shared_archive("tiny-imagenet-32", "tiny-imagenet-200-32px.tar.gz")
    train_wnids = ["n01443537", "n09428293"]
    root = tmp_path / "full"
    root.mkdir()
    _extract_members(archive, root, [
        "tiny-imagenet-200/wnids.txt", "tiny-imagenet-200/words.txt", "tiny-imagenet-200/val",
        *[f"tiny-imagenet-200/train/{w}" for w in train_wnids],
    ])
    val = load_images("tiny-imagenet", root, "val")
    assert val.images.shape == (10000, 3, 32, 32)
    assert len(val.classes) == 200 and val.classes == sorted(val.classes)
    assert val.labels.bincount(minlength=200).tolist() == [50] * 200
    ann = {}
    for line in (root / "tiny-imagenet-200/val/val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        ann[fields[0]] = fields[1]
    # natural order of file names, labels from the annotations
    for k in (0, 1234, 9999):
        assert val.classes[int(val.labels[k])] == ann[f"val_{k}.JPEG"]
        ref = np.array(Image.open(root / f"tiny-imagenet-200/val/images/val_{k}.JPEG")
                         .convert("RGB"))
        assert torch.equal(val.images[k], torch.from_numpy(ref).permute(2, 0, 1))
    assert val.class_descriptions[val.classes.index("n01443537")].startswith("goldfish")

    # the train split, on a copy whose wnids.txt lists the two extracted classes
    sub = tmp_path / "sub" / "tiny-imagenet-200"
    sub.mkdir(parents=True)
    (sub / "wnids.txt").write_text("\n".join(reversed(train_wnids)) + "\n")
    shutil.move(root / "tiny-imagenet-200" / "train", sub / "train")
    train = load_images("tiny-imagenet", sub.parent, "train")
    assert train.images.shape == (1000, 3, 32, 32)
    assert train.classes == train_wnids and train.labels.bincount().tolist() == [500, 500]
    first = np.array(Image.open(sub / "train/n01443537/images/n01443537_0.JPEG").convert("RGB"))
    assert torch.equal(train.images[0], torch.from_numpy(first).permute(2, 0, 1))
