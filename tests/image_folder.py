"""Shared by the image tests: a tiny image-folder dataset (16x16 PNGs, two classes: blue and red
with a random bright line) and a small run config for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def write_dataset(root: Path, per_class: dict[str, int], side: int = 16) -> None:
    rng = np.random.default_rng(0)
    colors = {"blue": (40, 60, 200), "red": (200, 50, 40)}
    for split, n in per_class.items():
        for cls, color in colors.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.asarray(color) + rng.integers(-40, 40, (side, side, 3))
                img[rng.integers(0, side), :, :] = 255  # a random bright line
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def folder_config(tmp_path: Path, root: Path, **extra) -> Path:
    raw = {
        "data": {"name": "folder", "root": str(root)},
        "net": {"kind": "vgg6", "width_mult": 1 / 32, "bias": True},
        "rule": {"name": "clapp-image", "options": {"context": "both"}},
        "optim": {"name": "adamw", "lr": 2e-4},
        "probe": {"epochs": 2, "per_block": True},
        "epochs": 1,
        "batch_size": 8,
        "checkpoint_every": 1,
        "progress": False,
    }
    for key, value in extra.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
