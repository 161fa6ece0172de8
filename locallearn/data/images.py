"""Image datasets in their official on-disk formats, loaded into one uint8 tensor.

Every reader returns an :class:`ImageSet`: all images of a split in ONE ``uint8`` tensor of shape
``(N, 3, H, W)`` (RGB, channel-first), ``int64`` labels (``-1`` where a split has no labels) and
the class names. The tensors are small enough to live on the accelerator for a whole run
(CIFAR-10 train: 150 MiB; Tiny ImageNet train at 64 px: 1.2 GiB), so the training loop indexes
them directly and builds views with :mod:`locallearn.data.augment`; there is no per-sample Python
in the hot loop.

Formats (``name`` argument of :func:`load_images`):

``cifar10``
    Either the official python release (``cifar-10-batches-py/`` with ``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``, ``batches.meta``; ``root`` may be that folder or its parent)
    or an image tree ``<root>/<split>/<class>/*.jpg`` whose ten class folders carry the official
    class names. Sorted alphabetically, the names are in the official label order 0..9. When both
    are present the pickles (bit-exact official pixels) win. Splits: ``train``, ``test``.
``stl10``
    The official binary release ``stl10_binary/`` (``train_X.bin``, ``train_y.bin``,
    ``test_X.bin``, ``test_y.bin``, ``unlabeled_X.bin``, ``class_names.txt``). Images are stored
    channel by channel in column-major order; labels 1..10 in the files become 0..9. Splits:
    ``train`` (5,000), ``test`` (8,000), ``unlabeled`` (100,000, labels -1) and
    ``train+unlabeled`` (train first, then unlabeled).
``tiny-imagenet``
    The official folder layout ``tiny-imagenet-200/`` (``wnids.txt``, ``words.txt``,
    ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` with ``val/val_annotations.txt``,
    ``test/images/*.JPEG``). **Label ``k`` is the ``k``-th wnid in sorted order** (the order of
    ``wnids.txt`` itself is arbitrary; sorting makes labels independent of it and equal to the
    order of the training folders). Images are read at whatever size the files have (the official
    release is 64x64; a downsampled 32x32 copy works unchanged) but must all be the same size.
    Splits: ``train``, ``val``, ``test`` (labels -1).
``folder``
    A generic tree ``<root>/<split>/<class>/...`` or, with ``split="all"``, ``<root>/<class>/...``.
    Classes are the sub-folders in alphabetical order (hidden folders are skipped); images are all
    files with an image extension below a class folder, searched recursively.

Files within a class are ordered by natural sort (``img_2`` before ``img_10``), so the order of
images, and hence of labels, is deterministic.

Decoding image trees is slow (about 0.1 ms per small JPEG), so the decoded tensor is cached as a
``.pt`` file, by default in ``<data folder>/.locallearn-cache/``, and rebuilt when any file
changes; listing, decoding and the cache are in :mod:`locallearn.data.image_files`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from locallearn.data.image_files import (
    DecodeOptions,
    decode_cached,
    image_files,
    list_classes,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageSet",
    "Resource",
    "STREAM_DATASETS",
    "dataset_info",
    "load_images",
    "channel_stats",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
STL10_CLASSES: tuple[str, ...] = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)
_STL10_SIDE = 96
_STL10_IMAGE_BYTES = 3 * _STL10_SIDE * _STL10_SIDE


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that the rest of the library needs.

    Attributes:
        name: canonical name accepted by :func:`load_images`.
        image_size: side length of the official release in pixels (``None`` for ``folder``).
            The readers accept other sizes (e.g. Tiny ImageNet downsampled to 32 px); this is
            the expected size, not a requirement.
        num_classes: number of classes (``None`` for ``folder``: it depends on the tree).
        splits: valid ``split`` arguments (empty for ``folder``: any sub-folder, or ``"all"``).
        mean: per-channel mean of the pixel values scaled to [0, 1], RGB order.
        std: per-channel standard deviation of the pixel values scaled to [0, 1], RGB order.
        crop_scale: default area range of the self-supervised random resized crop.
        default_splits: the splits a run reads by default: ``(self-supervised training, probe
            test, probe training)``.
        reader: the function that loads one split into memory (``None``: streamed only).
        streaming: ``never`` (decoded into memory), ``optional`` (``data.streaming=true``
            streams it) or ``always`` (too large for memory).
        download: the official archive (``None``: no public download).
        aliases: other spellings of the name.
    """

    name: str
    image_size: int | None
    num_classes: int | None
    splits: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_scale: tuple[float, float]
    default_splits: tuple[str, str, str] = ("train", "test", "train")
    reader: Callable[[Path, str, DecodeOptions], ImageSet] | None = None
    streaming: Literal["never", "optional", "always"] = "never"
    download: Resource | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resource:
    """One downloadable dataset archive.

    Attributes:
        name: dataset name (as in :func:`load_images`).
        url: official address of the archive.
        filename: file name of the archive inside ``root``.
        md5: MD5 checksum of the archive (hex).
        folder: the top-level folder that the archive extracts to.
    """

    name: str
    url: str
    filename: str
    md5: str
    folder: str


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    for info in DATASETS.values():
        if key in info.aliases:
            key = info.name
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset name {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        )
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name`` (``cifar10``, ``stl10``, ``tiny-imagenet``,
    ``folder``; ``_`` and ``-`` and case are interchangeable). Raises ValueError if unknown."""
    return DATASETS[_canonical_name(name)]


@dataclass
class ImageSet:
    """All images of one split of a dataset, in memory.

    Attributes:
        images: ``uint8`` tensor ``(N, 3, H, W)``, RGB.
        labels: ``int64`` tensor ``(N,)``; ``-1`` for unlabelled images.
        classes: class names; ``labels`` index into this list.
        name: canonical dataset name (``cifar10``, ``stl10``, ``tiny-imagenet``, ``folder``).
        split: the split that was loaded.
        class_descriptions: optional human-readable description per class (Tiny ImageNet:
            the ``words.txt`` entry of each wnid).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    split: str
    class_descriptions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be a uint8 tensor (N, 3, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be an int64 tensor ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def to(self, device: torch.device | str) -> ImageSet:
        """Return a copy with ``images`` and ``labels`` on ``device``."""
        return ImageSet(
            images=self.images.to(device),
            labels=self.labels.to(device),
            classes=list(self.classes),
            name=self.name,
            split=self.split,
            class_descriptions=self.class_descriptions,
        )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of a uint8 batch ``(N, 3, H, W)``, in [0, 1] units.

    Computed in float64 over chunks of ``chunk`` images, so memory stays small for large sets.
    """
    if images.dim() != 4:
        raise ValueError(f"expected a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3)).cpu()
        total_sq += x.square().sum(dim=(0, 2, 3)).cpu()
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return mean, std


# ----------------------------------------------------------------------------------------------
# entry point


def load_images(
    name: str,
    root: str | Path,
    split: str,
    cache_dir: str | Path | None = None,
    *,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """Load one split of a dataset into memory.

    Args:
        name: ``cifar10``, ``stl10``, ``tiny-imagenet`` or ``folder``.
        root: folder holding the data (see the module docstring for the accepted layouts; for
            the official releases, either the extracted folder itself or its parent).
        split: the split to load (see :data:`DATASETS`; ``folder`` accepts any sub-folder of
            ``root`` or ``"all"`` for a tree ``root/<class>/...``).
        cache_dir: where to cache decoded image trees; default ``<data folder>/.locallearn-cache``.
            If that cannot be written, a warning is issued and loading continues without a cache.
            Binary formats (CIFAR-10 pickles, STL-10) are read directly and never cached.
        cache: set to False to neither read nor write a cache.
        workers: processes used to decode image trees (default: CPU count, at most 8;
            0 or 1 decodes in the calling process).
        progress: show a progress bar while decoding.

    Returns:
        An :class:`ImageSet`.

    Raises:
        ValueError: unknown name or split, missing root, unrecognised layout, unreadable or
            differently-sized images; the message is one line naming the problem.
    """
    key = _canonical_name(name)
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ValueError(f"{key}: data root {str(root_path)!r} does not exist or is not a folder")
    split = str(split)
    info = DATASETS[key]
    if info.splits and split not in info.splits:
        raise ValueError(
            f"{key}: unknown split {split!r}; valid splits: {', '.join(info.splits)}"
        )
    opts = DecodeOptions(
        cache=cache,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
        workers=workers,
        progress=progress,
    )
    if info.reader is None:
        raise ValueError(
            f"{key}: too large to decode into memory; it is read image by image "
            "(locallearn.data.streaming.open_stream)"
        )
    return info.reader(root_path, split, opts)


# ----------------------------------------------------------------------------------------------
# CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers.

    The CIFAR-10 release is a set of pickles; a pickle can run arbitrary code when loaded, so
    only the globals needed to rebuild numpy arrays are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"cifar10: cannot read {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"cifar10: {path} does not hold a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_pickle_dir(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def _load_cifar10(root: Path, split: str, opts: DecodeOptions) -> ImageSet:
    pdir = _cifar_pickle_dir(root)
    if pdir is not None:
        return _load_cifar10_pickles(pdir, split)
    tree = root / split
    if tree.is_dir() and any(p.is_dir() for p in tree.iterdir()):
        classes = list_classes(tree)
        if tuple(classes) != CIFAR10_CLASSES:
            raise ValueError(
                f"cifar10: class folders of {tree} are {classes}, expected the official "
                f"{list(CIFAR10_CLASSES)}"
            )
        return _load_tree("cifar10", tree, split, classes, None, opts)
    raise ValueError(
        f"cifar10: no CIFAR-10 data under {root}; expected cifar-10-batches-py/ "
        f"(data_batch_1..5, test_batch, batches.meta) or an image tree {split}/<class>/*.jpg"
    )


def _load_cifar10_pickles(pdir: Path, split: str) -> ImageSet:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for fname in files:
        path = pdir / fname
        if not path.is_file():
            raise ValueError(f"cifar10: missing {path} in the official python release")
        batch = _read_pickle(path)
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"cifar10: {path} lacks the 'data' or 'labels' entry")
        data = np.asarray(batch["data"])
        lab = np.asarray(batch["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(
                f"cifar10: {path} data must be uint8 (N, 3072), got {data.dtype} {data.shape}"
            )
        if lab.shape != (data.shape[0],) or (lab.size and (lab.min() < 0 or lab.max() > 9)):
            raise ValueError(f"cifar10: {path} labels must be {data.shape[0]} values in 0..9")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    classes = list(CIFAR10_CLASSES)
    meta_path = pdir / "batches.meta"
    if meta_path.is_file():
        meta = _read_pickle(meta_path)
        names = meta.get("label_names")
        if names is not None:
            classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
            if len(classes) != 10:
                raise ValueError(f"cifar10: {meta_path} lists {len(classes)} classes, expected 10")
    return ImageSet(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
        name="cifar10",
        split=split,
    )


# ----------------------------------------------------------------------------------------------
# STL-10


def _stl_dir(root: Path) -> Path | None:
    for cand in (root, root / "stl10_binary"):
        if (cand / "train_X.bin").is_file() or (cand / "unlabeled_X.bin").is_file():
            return cand
    return None


def _stl_count(path: Path) -> int:
    if not path.is_file():
        raise ValueError(f"stl10: missing {path} in the official binary release")
    size = path.stat().st_size
    if size % _STL10_IMAGE_BYTES:
        raise ValueError(
            f"stl10: {path} has {size} bytes, not a multiple of {_STL10_IMAGE_BYTES} "
            f"(3x{_STL10_SIDE}x{_STL10_SIDE}); the file is truncated or not an STL-10 image file"
        )
    return size // _STL10_IMAGE_BYTES


def _load_stl10(root: Path, split: str, opts: DecodeOptions | None = None) -> ImageSet:
    sdir = _stl_dir(root)
    if sdir is None:
        raise ValueError(
            f"stl10: no STL-10 data under {root}; expected stl10_binary/ with train_X.bin, "
            "train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin"
        )
    parts = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"],
             "train+unlabeled": ["train", "unlabeled"]}[split]
    counts = [_stl_count(sdir / f"{p}_X.bin") for p in parts]
    total = sum(counts)
    images = torch.empty((total, 3, _STL10_SIDE, _STL10_SIDE), dtype=torch.uint8)
    labels = torch.full((total,), -1, dtype=torch.int64)
    out = images.numpy()
    start = 0
    for part, n in zip(parts, counts):
        if n:
            raw = np.memmap(sdir / f"{part}_X.bin", dtype=np.uint8, mode="r",
                            shape=(n, 3, _STL10_SIDE, _STL10_SIDE))
            # The file stores each channel column-major: axis 2 is the column, axis 3 the row.
            step = 4096
            for i in range(0, n, step):
                out[start + i:start + min(i + step, n)] = raw[i:i + step].transpose(0, 1, 3, 2)
            del raw
        if part != "unlabeled":
            ypath = sdir / f"{part}_y.bin"
            if not ypath.is_file():
                raise ValueError(f"stl10: missing {ypath} in the official binary release")
            y = np.fromfile(ypath, dtype=np.uint8).astype(np.int64)
            if y.shape != (n,):
                raise ValueError(f"stl10: {ypath} holds {y.size} labels for {n} images")
            if n and (y.min() < 1 or y.max() > 10):
                raise ValueError(f"stl10: {ypath} labels must lie in 1..10")
            labels[start:start + n] = torch.from_numpy(y - 1)
        start += n
    classes = list(STL10_CLASSES)
    names_path = sdir / "class_names.txt"
    if names_path.is_file():
        names = [ln.strip() for ln in names_path.read_text().splitlines() if ln.strip()]
        if len(names) != 10:
            raise ValueError(f"stl10: {names_path} lists {len(names)} classes, expected 10")
        classes = names
    return ImageSet(images=images, labels=labels, classes=classes, name="stl10", split=split)


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet


def _tiny_dir(root: Path) -> Path | None:
    for cand in (root, root / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    return None


def _load_tiny_imagenet(root: Path, split: str, opts: DecodeOptions) -> ImageSet:
    tdir = _tiny_dir(root)
    if tdir is None:
        raise ValueError(
            f"tiny-imagenet: no Tiny ImageNet data under {root}; expected tiny-imagenet-200/ "
            "with wnids.txt, train/<wnid>/images/, val/images/ and val/val_annotations.txt"
        )
    wnids_raw = [ln.strip() for ln in (tdir / "wnids.txt").read_text().splitlines() if ln.strip()]
    wnids = sorted(set(wnids_raw))
    if len(wnids) != len(wnids_raw) or not wnids:
        raise ValueError(f"tiny-imagenet: {tdir / 'wnids.txt'} is empty or lists a wnid twice")
    index = {w: i for i, w in enumerate(wnids)}
    descriptions = _tiny_descriptions(tdir, wnids)

    files: list[str] = []  # paths relative to tdir
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            idir = tdir / "train" / w / "images"
            if not idir.is_dir():
                raise ValueError(f"tiny-imagenet: missing training folder {idir}")
            found = image_files(idir, recursive=False)
            if not found:
                raise ValueError(f"tiny-imagenet: training folder {idir} holds no images")
            files += [f"train/{w}/images/{f}" for f in found]
            labels += [index[w]] * len(found)
    elif split == "val":
        ann_path = tdir / "val" / "val_annotations.txt"
        idir = tdir / "val" / "images"
        if not ann_path.is_file() or not idir.is_dir():
            raise ValueError(
                f"tiny-imagenet: the val split needs {ann_path} and the folder {idir}"
            )
        ann: dict[str, int] = {}
        for lineno, line in enumerate(ann_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 2 or fields[1].strip() not in index:
                raise ValueError(
                    f"tiny-imagenet: {ann_path} line {lineno} does not name a file and a wnid "
                    "from wnids.txt"
                )
            ann[fields[0].strip()] = index[fields[1].strip()]
        found = image_files(idir, recursive=False)
        names = set(found)
        missing = sorted(set(ann) - names)
        extra = sorted(names - set(ann))
        if missing:
            raise ValueError(
                f"tiny-imagenet: {len(missing)} annotated val images are missing from {idir} "
                f"(first: {missing[0]})"
            )
        if extra:
            raise ValueError(
                f"tiny-imagenet: {len(extra)} images in {idir} have no line in {ann_path} "
                f"(first: {extra[0]})"
            )
        files = [f"val/images/{f}" for f in found]
        labels = [ann[f] for f in found]
    else:  # test: images without labels
        idir = tdir / "test" / "images"
        if not idir.is_dir():
            raise ValueError(f"tiny-imagenet: missing test folder {idir}")
        files = [f"test/images/{f}" for f in image_files(idir, recursive=False)]
        labels = [-1] * len(files)
    if not files:
        raise ValueError(f"tiny-imagenet: split {split!r} under {tdir} holds no images")
    return _image_set("tiny-imagenet", tdir, split, wnids, files, labels, opts, descriptions)


def _tiny_descriptions(tdir: Path, wnids: list[str]) -> list[str] | None:
    words = tdir / "words.txt"
    if not words.is_file():
        return None
    wanted = set(wnids)
    found: dict[str, str] = {}
    with open(words, encoding="utf-8", errors="replace") as f:
        for line in f:
            wnid, _, text = line.rstrip("\n").partition("\t")
            if wnid in wanted:
                found[wnid] = text.strip()
    return [found.get(w, w) for w in wnids]


# ----------------------------------------------------------------------------------------------
# generic trees


def _load_folder(root: Path, split: str, opts: DecodeOptions) -> ImageSet:
    if (root / split).is_dir() and not split.startswith("."):
        base = root / split
    elif split == "all":
        base = root
    else:
        subs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise ValueError(
            f"folder: no split folder {split!r} in {root}; valid splits: "
            f"{', '.join(subs + ['all'])} ('all' reads {root}/<class>/...)"
        )
    classes = list_classes(base)
    if not classes:
        raise ValueError(f"folder: {base} has no class sub-folders (expected <class>/<images>)")
    return _load_tree("folder", base, split, classes, None, opts)


def _load_tree(
    name: str,
    base: Path,
    split: str,
    classes: list[str],
    descriptions: list[str] | None,
    opts: DecodeOptions,
) -> ImageSet:
    files: list[str] = []  # paths relative to base
    labels: list[int] = []
    for i, c in enumerate(classes):
        found = image_files(base / c, recursive=True)
        if not found:
            raise ValueError(f"{name}: class folder {base / c} holds no images")
        files += [f"{c}/{f}" for f in found]
        labels += [i] * len(found)
    return _image_set(name, base, split, classes, files, labels, opts, descriptions)


def _image_set(
    name: str,
    base: Path,
    split: str,
    classes: list[str],
    files: Sequence[str],
    labels: Sequence[int],
    opts: DecodeOptions,
    descriptions: list[str] | None,
) -> ImageSet:
    """The :class:`ImageSet` of ``files`` (relative to ``base``), decoded through the cache."""
    images = decode_cached(name, base, split, classes, files, labels, opts)
    return ImageSet(images=images, labels=torch.tensor(labels, dtype=torch.int64),
                    classes=list(classes), name=name, split=split,
                    class_descriptions=descriptions)


def subset_indices(n: int, size: int | None, seed: int, salt: int) -> torch.Tensor | None:
    """Sorted indices of a random subset of ``size`` out of ``n`` (``None``: everything); the
    generator is seeded from ``seed`` and ``salt`` so each split draws its own subset."""
    if size is None or size >= n:
        return None
    gen = torch.Generator().manual_seed(seed * 1000 + salt)
    return torch.randperm(n, generator=gen)[:size].sort().values


# ----------------------------------------------------------------------------------------------
# the table of datasets

# Normalisation constants. CIFAR-10: per-channel mean and standard deviation over all pixels of
# the official training set. STL-10 and Tiny ImageNet: the values in common use for these
# datasets (official releases; on the 32x32 Tiny ImageNet copy the means agree to 0.001 while the
# standard deviations are about 9% lower, 0.252/0.245/0.259, because downsampling smooths the
# pixels). ``folder``: the ImageNet constants, a neutral default for natural
# images; pass explicit mean/std to the augmentation module for other data, or compute them with
# :func:`channel_stats`.
#: ``data.name`` -> everything the library knows of an image dataset: the one table of them
#: (the config's names and default splits, the readers, streaming, downloads and constants).
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10",
        image_size=32,
        num_classes=10,
        splits=("train", "test"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_scale=(0.25, 1.0),
        reader=_load_cifar10,
        download=Resource(
            name="cifar10",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            filename="cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
            folder="cifar-10-batches-py",
        ),
        aliases=("cifar-10",),
    ),
    "stl10": DatasetInfo(
        name="stl10",
        image_size=96,
        num_classes=10,
        splits=("train", "test", "unlabeled", "train+unlabeled"),
        mean=(0.4467, 0.4398, 0.4066),
        std=(0.2603, 0.2566, 0.2713),
        crop_scale=(0.08, 1.0),
        default_splits=("train+unlabeled", "test", "train"),
        reader=_load_stl10,
        download=Resource(
            name="stl10",
            url="http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
            filename="stl10_binary.tar.gz",
            md5="91f7769df0f17e558f3565bffb0c7dfb",
            folder="stl10_binary",
        ),
        aliases=("stl-10",),
    ),
    "tiny-imagenet": DatasetInfo(
        name="tiny-imagenet",
        image_size=64,
        num_classes=200,
        splits=("train", "val", "test"),
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
        crop_scale=(0.08, 1.0),
        default_splits=("train", "val", "train"),
        reader=_load_tiny_imagenet,
        download=Resource(
            name="tiny-imagenet",
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            filename="tiny-imagenet-200.zip",
            md5="90528d7ca1a48142e341f4ef8d21d0de",
            folder="tiny-imagenet-200",
        ),
        aliases=("tinyimagenet", "tiny-imagenet-200"),
    ),
    "imagenet": DatasetInfo(
        name="imagenet",
        image_size=224,
        num_classes=1000,
        splits=("train", "val"),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_scale=(0.08, 1.0),
        default_splits=("train", "val", "train"),
        streaming="always",
        aliases=("ilsvrc2012",),
    ),
    "folder": DatasetInfo(
        name="folder",
        image_size=None,
        num_classes=None,
        splits=(),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_scale=(0.08, 1.0),
        reader=_load_folder,
        streaming="optional",
    ),
}

#: the datasets that can be read image by image
STREAM_DATASETS = tuple(n for n, info in DATASETS.items() if info.streaming != "never")
