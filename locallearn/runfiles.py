"""The files of a run's output directory and how they are written (every room may import this).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``checkpoint.pt`` (the last checkpoint) and ``summary.json`` (written when the run ends);
image runs add ``probe.json``, ``locallearn align`` adds ``alignment.json``. Files are written to
a temporary name, flushed to disk and renamed over the old one, so a reader never sees half a
file, not even after a power loss, and a full disk leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:  # POSIX file locks; without them (Windows) nothing guards a folder against a second writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
PROBE = "probe.json"
ALIGNMENT = "alignment.json"
ANALYSIS = "analysis.json"
#: held by the process that trains in a run folder (``locallearn run`` and every sweep worker)
RUN_LOCK = ".run.lock"

__all__ = [
    "ALIGNMENT", "ANALYSIS", "CHECKPOINT", "CONFIG", "METRICS", "PROBE", "RUN_LOCK", "SUMMARY",
    "check_out_dir", "file_lock", "read_metrics",
    "write_durably", "write_json_atomic", "write_text_atomic",
]


def check_out_dir(path: str | Path) -> Path:
    """``path`` as an output directory: a ValueError when it exists and is not a directory, or
    when it cannot be made or written (its nearest existing folder is a file or not writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file, not a directory; give a directory")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {str(path)!r} cannot be made: {str(parent)!r} is a file; give "
                         "a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(path)!r} is not writable ({str(parent)!r} denies it); "
                         "give a directory you can write to")
    return path


@contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` (POSIX ``flock``); yields whether it was taken."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_durably(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` so that a crash or a power loss leaves the old file or the new one, never
    a part: ``write`` fills a temporary file, which is flushed to disk (fsync) and renamed over
    ``path``, and the folder's entry is flushed too. A write that fails (a full disk) removes
    the temporary file and raises an ``OSError`` whose message says what happened."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(err.errno, f"no space left on the disk while writing {str(path)!r} "
                          "(the previous version is kept)") from None
        if isinstance(err, RuntimeError) and "enforce fail" in str(err):  # torch.save's writer
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC if free < 1 << 20 else errno.EIO,
                          f"writing {str(path)!r} failed ({free / 2**20:.0f} MiB free on its "
                          "disk; the previous version is kept)") from None
        raise
    try:  # the rename itself, on file systems that allow a folder to be flushed
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` durably (:func:`write_durably`)."""
    write_durably(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (empty when it has none yet)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
