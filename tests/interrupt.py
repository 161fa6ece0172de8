"""Shared by the resume tests: run a config to the end, and run it again with a crash in the
middle of training followed by a restart in the same folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from locallearn.experiments.runs import run
from locallearn.train import Trainer


def full_and_resumed(cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     crash_at: int = 3) -> tuple[dict, dict]:
    """Summaries of an uninterrupted run (``tmp_path/full``) and of one killed at the start of
    its ``crash_at``-th epoch and resumed (``tmp_path/cut``)."""
    full = run(cfg, tmp_path / "full")
    original = Trainer.train_epoch
    calls = {"n": 0}

    def crash(self):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_epoch", original)
    return full, run(cfg, tmp_path / "cut")
