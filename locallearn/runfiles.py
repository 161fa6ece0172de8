"""The files of a run's output directory and how they are written (every room may import this).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``checkpoint.pt`` (the last checkpoint) and ``summary.json`` (written when the run ends);
image runs add ``probe.json``, ``locallearn align`` adds ``alignment.json``. Files are written to
a temporary name and renamed over the old one, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
PROBE = "probe.json"
ALIGNMENT = "alignment.json"
ANALYSIS = "analysis.json"

__all__ = [
    "ALIGNMENT", "ANALYSIS", "CHECKPOINT", "CONFIG", "METRICS", "PROBE", "SUMMARY", "check_out_dir",
    "read_metrics",
    "write_json_atomic", "write_text_atomic",
]


def check_out_dir(path: str | Path) -> Path:
    """``path`` as an output directory: a ValueError when it exists and is not a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file, not a directory; give a directory")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (empty when it has none yet)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
