"""Image files on disk: listing them in a fixed order, and decoding them into one tensor.

A tree reader (:mod:`locallearn.data.images`, :mod:`locallearn.data.streaming`) lists class
folders with :func:`list_classes` and their images with :func:`image_files`: hidden entries are
skipped and files are in natural order (``img_2`` before ``img_10``), so the order of images, and
hence of labels, is deterministic. :func:`decode_cached` decodes the listed files into one
``(N, 3, H, W)`` ``uint8`` tensor, in a pool of forked worker processes when there are many, and
caches it as a ``.pt`` file (by default in ``<data folder>/.locallearn-cache/``) whose key hashes
the dataset name, split, classes and every file's relative path, size, modification time and
label, so any change to the files rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CACHE_DIRNAME",
    "IMAGE_EXTENSIONS",
    "DecodeOptions",
    "decode_cached",
    "image_files",
    "list_classes",
    "natural_key",
]

#: Bump when the layout of cache files or the decoding changes, to invalidate old caches.
_CACHE_VERSION = 1
#: Name of the default cache folder, created inside the dataset folder.
CACHE_DIRNAME = ".locallearn-cache"
#: File extensions treated as images by the tree readers (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
)
#: Below this many files, trees are decoded in the calling process (a pool would cost more).
_POOL_MIN_FILES = 2000


@dataclass(frozen=True)
class DecodeOptions:
    """How :func:`decode_cached` works: through the cache or not, where it is kept (``None``:
    inside the data folder), worker processes (``None``: up to 8) and a progress bar."""

    cache: bool
    cache_dir: Path | None
    workers: int | None
    progress: bool


def list_classes(base: Path) -> list[str]:
    """The sub-folders of ``base`` in alphabetical order, hidden ones skipped."""
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders the digit runs of ``text`` as numbers (``img_2`` before ``img_10``)."""
    parts = _DIGITS.split(text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def image_files(folder: Path, recursive: bool) -> list[str]:
    """Image files in ``folder`` (hidden entries skipped) as paths relative to it with ``/``
    separators, in natural order. Plain strings: pathlib is slow for 100,000 files."""
    out: list[str] = []
    if recursive:
        top = str(folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, top).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            out += [prefix + f for f in filenames
                    if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        with os.scandir(folder) as it:
            out = [e.name for e in it
                   if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
                   and e.is_file()]
    return sorted(out, key=natural_key)


# ----------------------------------------------------------------------------------------------
# decoding and caching


def decode_cached(
    name: str,
    base: Path,
    split: str,
    classes: list[str],
    files: Sequence[str],
    labels: Sequence[int],
    opts: DecodeOptions,
) -> torch.Tensor:
    """Decode ``files`` (relative to ``base``) into one ``(N, 3, H, W)`` ``uint8`` tensor,
    through the cache if ``opts.cache``; ``labels`` (one per file) are part of the cache key."""
    cache_file: Path | None = None
    key = ""
    if opts.cache:
        key = _cache_key(name, base, split, classes, files, labels)
        cache_dir = opts.cache_dir if opts.cache_dir is not None else base / CACHE_DIRNAME
        safe_split = re.sub(r"[^A-Za-z0-9_.+-]", "_", split)
        cache_file = cache_dir / f"{name}-{safe_split}-{key[:20]}.pt"
        cached = _read_cache(cache_file, key, len(files))
        if cached is not None:
            return cached
    paths = [os.path.join(base, f) for f in files]
    images = _decode_files(paths, opts.workers, opts.progress, desc=f"{name} {split}")
    if cache_file is not None:
        _write_cache(cache_file, key, images)
    return images


def _cache_key(
    name: str,
    base: Path,
    split: str,
    classes: list[str],
    files: Sequence[str],
    labels: Sequence[int],
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, name, split, classes]).encode())
    top = str(base)
    for rel, label in zip(files, labels):
        st = os.stat(os.path.join(top, rel))
        # ctime and inode too: a file replaced by one of the same size and mtime (a copy with
        # its time kept, a touch -d) is another file, and its pixels are decoded again
        h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\t{st.st_ino}"
                 f"\t{label}".encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str, n: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images = blob["images"]
        ok = (blob.get("key") == key and isinstance(images, torch.Tensor)
              and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[0] == n
              and images.shape[1] == 3)
    except Exception:  # an unreadable cache is rebuilt, never trusted
        return None
    return images if ok else None


def _write_cache(path: Path, key: str, images: torch.Tensor) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "images": images}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write image cache {path}: {exc}", RuntimeWarning, stacklevel=4)
        return
    # Remove stale caches of the same dataset and split (older file listings).
    prefix = path.name[: path.name.rfind("-") + 1]
    stale = re.compile(re.escape(prefix) + r"[0-9a-f]{20}\.pt")
    for old in path.parent.glob(f"{prefix}*.pt"):
        if old != path and stale.fullmatch(old.name):
            old.unlink(missing_ok=True)


def _decode_one(path: str) -> np.ndarray:
    from PIL import Image  # Pillow is a dependency of matplotlib

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # Pillow raises several types for broken files
        raise ValueError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    return arr


def _decode_chunk(paths: list[str], shape: tuple[int, int]) -> np.ndarray:
    """Decode ``paths`` into ``(n, 3, H, W)`` uint8, all of spatial size ``shape``."""
    out = np.empty((len(paths), 3, shape[0], shape[1]), dtype=np.uint8)
    for i, p in enumerate(paths):
        arr = _decode_one(p)
        if arr.shape[:2] != shape:
            raise ValueError(
                f"image {p} is {arr.shape[1]}x{arr.shape[0]}, but the first image of the set is "
                f"{shape[1]}x{shape[0]}; all images must have the same size"
            )
        out[i] = arr.transpose(2, 0, 1)
    return out


def _decode_files(
    paths: Sequence[str], workers: int | None, progress: bool, desc: str
) -> torch.Tensor:
    """Decode image files into one ``(N, 3, H, W)`` uint8 tensor."""
    from tqdm.auto import tqdm

    paths = list(paths)
    first = _decode_one(paths[0])
    shape = (int(first.shape[0]), int(first.shape[1]))
    out = np.empty((len(paths), 3, shape[0], shape[1]), dtype=np.uint8)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    use_pool = (workers > 1 and len(paths) >= _POOL_MIN_FILES
                and "fork" in _mp_start_methods())
    n_chunks = max(1, workers * 8) if use_pool else max(1, len(paths) // 1000)
    size = -(-len(paths) // n_chunks)
    chunks = [(i, paths[i:i + size]) for i in range(0, len(paths), size)]
    bar = tqdm(total=len(paths), desc=f"decoding {desc}", unit="img", disable=not progress)
    try:
        if use_pool:
            import multiprocessing as mp

            # Workers are forked: they inherit the loaded modules and only run Pillow and numpy,
            # so no module is imported again (spawned workers would each import torch).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
                    results = ex.map(_decode_chunk, [c for _, c in chunks],
                                     [shape] * len(chunks))
                    for (start, chunk), arr in zip(chunks, results):
                        out[start:start + len(chunk)] = arr
                        bar.update(len(chunk))
        else:
            for start, chunk in chunks:
                out[start:start + len(chunk)] = _decode_chunk(chunk, shape)
                bar.update(len(chunk))
    finally:
        bar.close()
    return torch.from_numpy(out)


def _mp_start_methods() -> list[str]:
    import multiprocessing as mp

    return mp.get_all_start_methods()
