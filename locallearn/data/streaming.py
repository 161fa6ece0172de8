"""Image datasets read from disk as they are needed: ImageNet and large class-per-folder trees.

:func:`open_stream` lists a split's files (no pixel is read) and returns a :class:`StreamSet`,
a :class:`torch.utils.data.Dataset` whose item ``i`` is image ``i`` decoded, its centre square
resized to ``load_size`` x ``load_size`` (``uint8``, ``(3, L, L)``), and its label.
:class:`StreamLoader` decodes those items in DataLoader worker processes, in the batches it is
given (the caller's generator decides the order), and hands back ``uint8`` batches; the random
views are made afterwards, batched on the device (:mod:`locallearn.data.augment`).

Memory. Pixels exist only for the batches in flight: at most ``workers * prefetch`` batches of
``B x 3 x L x L`` bytes in the workers' shared memory, plus the batch being used; this does not
grow with the dataset. The file list is kept as one packed byte buffer with offsets (about 40
bytes per ImageNet image, 50 MB for the 1.28 M training images), shared by the forked workers
without copies (no per-file Python objects).

Layouts (``name``):

``imagenet``
    The official ILSVRC-2012 classification folders: ``<root>/train/<wnid>/*.JPEG`` (also under
    ``<root>/ILSVRC/Data/CLS-LOC/``). **Label ``k`` is the ``k``-th wnid in sorted order** (the
    order of the training folders, as in every common loader). The ``val`` split is either
    sorted into ``val/<wnid>/`` folders, or flat (``val/*.JPEG``) with its labels from
    ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the first word of the prediction
    string is the wnid) or from the development kit (``ILSVRC2012_validation_ground_truth.txt``,
    one ILSVRC2012 id per image in file-name order, and ``meta.mat`` mapping ids to wnids),
    searched in ``<root>``, its parent and ``<root>/ILSVRC2012_devkit_t12/data``.
``folder``
    ``<root>/<split>/<class>/...`` (``split="all"``: ``<root>/<class>/...``), classes sorted,
    image files found recursively, as :func:`locallearn.data.images.load_images` reads them.

Decoding: the JPEG decoder is asked for the smallest power-of-two reduction that keeps both
sides at least ``L`` (``draft``), then the centre square is resized (bilinear, antialiased) to
``L``. Non-RGB images (grayscale, CMYK) are converted to RGB.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from locallearn.data.image_files import image_files, list_classes, natural_key
from locallearn.data.images import STREAM_DATASETS

__all__ = ["StreamLoader", "StreamSet", "decode_square", "open_stream"]




class PathList:
    """A list of strings stored as one byte buffer and offsets (no per-item Python object)."""

    def __init__(self, items: Sequence[str]):
        encoded = [s.encode() for s in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(
            0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def take(self, indices: np.ndarray) -> PathList:
        return PathList([self[int(i)] for i in indices])

    @property
    def nbytes(self) -> int:
        return int(self.blob.nbytes + self.offsets.nbytes)


def decode_square(path: str, size: int) -> np.ndarray:
    """Decode ``path``, resize its centre square to ``size`` x ``size``; ``uint8`` ``(3, S, S)``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is larger
            if im.mode != "RGB":
                im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # Pillow raises several types for broken files
        raise ValueError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class StreamSet(Dataset):
    """One split of a dataset on disk, decoded item by item (see the module docstring).

    Attributes:
        base: folder the paths are relative to.
        paths: the image files, relative to ``base``.
        labels: ``int64`` array, ``-1`` where unlabelled.
        classes: class names (wnids for ImageNet); labels index into it.
        load_size: side of the decoded square.
    """

    def __init__(self, name: str, split: str, base: Path, paths: PathList, labels: np.ndarray,
                 classes: list[str], load_size: int):
        if load_size < 1:
            raise ValueError(f"load size must be >= 1, got {load_size}")
        self.name, self.split, self.base = name, split, str(base)
        self.paths, self.labels, self.classes = paths, labels, classes
        self.load_size = int(load_size)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, i: int) -> str:
        return os.path.join(self.base, self.paths[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode_square(self.path(i), self.load_size)
        return torch.from_numpy(image), int(self.labels[i])

    def subset(self, indices: torch.Tensor | None) -> StreamSet:
        """The images at ``indices`` (in that order); ``None``: this set."""
        if indices is None:
            return self
        idx = np.asarray(indices, dtype=np.int64)
        return StreamSet(self.name, self.split, Path(self.base), self.paths.take(idx),
                         self.labels[idx], self.classes, self.load_size)


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([im for im, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)
    return images, labels


class _Batches:
    """A batch sampler whose batches are set before each pass (by the caller's generator)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader:
    """Decodes batches of a :class:`StreamSet` in ``workers`` worker processes.

    ``batches(index_batches)`` yields ``(uint8 images (B, 3, L, L), int64 labels (B,))`` on the
    CPU (pinned when ``pin_memory``), in the order given. With ``workers = 0`` the calling
    process decodes. ``prefetch``: batches decoded ahead by each worker. Worker processes are
    kept between passes when ``persistent``.
    """

    def __init__(self, dataset: StreamSet, workers: int = 4, prefetch: int = 2,
                 pin_memory: bool = False, persistent: bool = True):
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers}, {prefetch}")
        self.dataset = dataset
        self.workers = workers
        self.prefetch = prefetch
        self._sampler = _Batches()
        self._loader = DataLoader(
            dataset, batch_sampler=self._sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=pin_memory,
            prefetch_factor=prefetch if workers else None,
            persistent_workers=persistent and workers > 0,
            # a private generator: starting a pass must not draw from the global random state
            # (the views do), or a resumed run would see other views than an uninterrupted one
            generator=torch.Generator().manual_seed(0),
        )

    def batches(self, index_batches: Sequence[Sequence[int]]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.batches = [list(map(int, b)) for b in index_batches]
        try:
            yield from self._loader
        except ValueError as err:  # a worker's error arrives with its traceback: keep the cause
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            last = lines[-1] if lines else str(err)
            raise ValueError(last.removeprefix("ValueError: ")) from None

    def bytes_in_flight(self, batch_size: int) -> int:
        """Upper bound of the pixel bytes held by the loader at once (decoded, not yet used)."""
        side = self.dataset.load_size
        per_batch = batch_size * 3 * side * side
        return per_batch * (max(self.workers, 1) * (self.prefetch if self.workers else 1) + 1)


# ----------------------------------------------------------------------------------------------
# listing the files


def open_stream(name: str, root: str | Path, split: str, load_size: int) -> StreamSet:
    """List one split of ``name`` (``imagenet`` or ``folder``) under ``root``; nothing is
    decoded. Raises ValueError (one line) for a missing or malformed layout."""
    key = str(name).strip().lower()
    if key not in STREAM_DATASETS:
        raise ValueError(f"unknown streamed dataset {name!r}; valid: {', '.join(STREAM_DATASETS)}")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ValueError(f"{key}: data root {str(root_path)!r} does not exist or is not a folder")
    if key == "imagenet":
        return _imagenet(root_path, split, load_size)
    return _folder(root_path, split, load_size)


def _tree(name: str, split: str, base: Path, classes: list[str], load_size: int,
          recursive: bool = True) -> StreamSet:
    files: list[str] = []
    counts: list[int] = []
    for c in classes:
        found = image_files(base / c, recursive=recursive)
        if not found:
            raise ValueError(f"{name}: class folder {base / c} holds no images")
        files += [f"{c}/{f}" for f in found]
        counts.append(len(found))
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return StreamSet(name, split, base, PathList(files), labels, classes, load_size)


def _folder(root: Path, split: str, load_size: int) -> StreamSet:
    if (root / split).is_dir() and not split.startswith("."):
        base = root / split
    elif split == "all":
        base = root
    else:
        subs = list_classes(root)
        raise ValueError(
            f"folder: no split folder {split!r} in {root}; valid splits: "
            f"{', '.join(subs + ['all'])}"
        )
    classes = list_classes(base)
    if not classes:
        raise ValueError(f"folder: {base} has no class sub-folders (expected <class>/<images>)")
    return _tree("folder", split, base, classes, load_size)


def imagenet_dir(root: Path) -> Path | None:
    """The folder holding ``train/`` (``root`` or ``root/ILSVRC/Data/CLS-LOC``), if any."""
    for cand in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        if (cand / "train").is_dir():
            return cand
    return None


def _imagenet(root: Path, split: str, load_size: int) -> StreamSet:
    if split not in ("train", "val"):
        raise ValueError(f"imagenet: unknown split {split!r}; valid splits: train, val")
    idir = imagenet_dir(root)
    if idir is None:
        raise ValueError(
            f"imagenet: no ImageNet data under {root}; expected train/<wnid>/*.JPEG and val/ "
            "(or ILSVRC/Data/CLS-LOC/train and val)"
        )
    wnids = list_classes(idir / "train")
    if not wnids:
        raise ValueError(f"imagenet: {idir / 'train'} has no class folders")
    if split == "train":
        return _tree("imagenet", split, idir / "train", wnids, load_size, recursive=False)
    vdir = idir / "val"
    if not vdir.is_dir():
        raise ValueError(f"imagenet: missing validation folder {vdir}")
    subs = list_classes(vdir)
    if subs:
        unknown = sorted(set(subs) - set(wnids))
        if unknown:
            raise ValueError(
                f"imagenet: val folder {vdir / unknown[0]} names no training class "
                f"({len(unknown)} such folders)"
            )
        files: list[str] = []
        labels: list[int] = []
        index = {w: i for i, w in enumerate(wnids)}
        for w in subs:
            found = image_files(vdir / w, recursive=False)
            files += [f"{w}/{f}" for f in found]
            labels += [index[w]] * len(found)
        if not files:
            raise ValueError(f"imagenet: {vdir} holds no images")
        return StreamSet("imagenet", split, vdir, PathList(files),
                         np.asarray(labels, dtype=np.int64), wnids, load_size)
    found = image_files(vdir, recursive=False)
    if not found:
        raise ValueError(f"imagenet: {vdir} holds no images")
    by_stem = _val_labels(root, idir, found)
    index = {w: i for i, w in enumerate(wnids)}
    labels = []
    for f in found:
        wnid = by_stem.get(os.path.splitext(f)[0])
        if wnid is None:
            raise ValueError(f"imagenet: validation image {vdir / f} has no label")
        if wnid not in index:
            raise ValueError(
                f"imagenet: validation image {f} is labelled {wnid}, not a training class"
            )
        labels.append(index[wnid])
    return StreamSet("imagenet", split, vdir, PathList(found), np.asarray(labels, np.int64),
                     wnids, load_size)


def _candidates(root: Path, idir: Path, name: str) -> list[Path]:
    places = [root, root.parent, idir, idir.parent, root / "ILSVRC2012_devkit_t12" / "data",
              idir / "ILSVRC2012_devkit_t12" / "data"]
    return [p / name for p in places if (p / name).is_file()]


def _val_labels(root: Path, idir: Path, files: list[str]) -> dict[str, str]:
    """Validation file stem -> wnid, from ``LOC_val_solution.csv`` or the development kit."""
    csvs = _candidates(root, idir, "LOC_val_solution.csv")
    if csvs:
        out: dict[str, str] = {}
        with open(csvs[0], newline="") as f:
            for row in csv.DictReader(f):
                words = (row.get("PredictionString") or "").split()
                if row.get("ImageId") and words:
                    out[row["ImageId"].strip()] = words[0]
        return out
    truth = _candidates(root, idir, "ILSVRC2012_validation_ground_truth.txt")
    meta = _candidates(root, idir, "meta.mat")
    if truth and meta:
        ids = [int(x) for x in truth[0].read_text().split()]
        id_to_wnid = _devkit_wnids(meta[0])
        stems = sorted((os.path.splitext(f)[0] for f in files), key=natural_key)
        if len(ids) != len(stems):
            raise ValueError(
                f"imagenet: {truth[0]} lists {len(ids)} labels for {len(stems)} validation images"
            )
        try:
            return {s: id_to_wnid[i] for s, i in zip(stems, ids)}
        except KeyError as err:
            raise ValueError(
                f"imagenet: {truth[0]} holds id {err.args[0]}, not in {meta[0]}"
            ) from None
    raise ValueError(
        f"imagenet: the flat val/ folder under {idir} needs its labels: val/<wnid>/ folders, "
        "LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat"
    )


def _devkit_wnids(path: Path) -> dict[int, str]:
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except Exception as exc:  # a malformed .mat raises several types
        raise ValueError(f"imagenet: cannot read the synsets of {path}: {exc}") from None
