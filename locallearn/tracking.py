"""Following a run live in TensorBoard or Weights & Biases (``log.tensorboard=true``,
``log.wandb=PROJECT``).

Every row the loop writes to ``metrics.jsonl`` (an epoch's training metrics and evaluation, a
probe during training) is also logged to the trackers, each number under its key at the row's
optimiser step (``seconds`` too, so a curve can be drawn against time); the summary's final
numbers (the probe of the frozen encoder, ...) are logged once at the end, under ``final/``.
``metrics.jsonl`` stays the record; tracking is a view of it and never changes the run, so it is
a runtime key (a run resumes with it on or off).

- ``log.tensorboard=true``: event files in ``OUT/tensorboard/`` (``tensorboard --logdir OUT``),
  written by ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
- ``log.wandb=PROJECT``: one W&B run per run folder in that project (its id derived from the
  folder, so a resumed run continues the same W&B run), the resolved config as its config, files
  in ``OUT/wandb/``; ``WANDB_MODE=offline`` keeps it on the machine (needs ``wandb``).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "open_trackers", "require"]


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a row (lists and text are not scalars)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def require(name: str) -> None:
    """A one-line ValueError when the package of tracker ``name`` (the package's own name) is
    not installed."""
    try:
        importlib.import_module(name)
    except ImportError:
        raise ValueError(
            f"log.{name} needs the {name} package, which is not installed; "
            f"pip install {name} (or pip install 'locallearn[tracking]')"
        ) from None


class Tracker:
    """The trackers of one run (none: every call does nothing); their packages are checked
    before (:func:`require`, when the run is set up)."""

    def __init__(self, names: list[str], out: Path, label: str, config: dict[str, Any],
                 project: str | None = None):
        self._writers: list[Any] = []
        self._wandb: Any = None
        for name in names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._writers.append(SummaryWriter(log_dir=str(out / "tensorboard")))
            else:
                import wandb

                self._wandb = wandb.init(project=project or "locallearn",
                                         name=label, id=self.run_id(out), resume="allow",
                                         dir=str(out), config=config)

    @staticmethod
    def run_id(out: Path) -> str:
        """The W&B run id of a run folder (the same folder, the same W&B run)."""
        return hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]

    def log(self, row: dict[str, Any], step: int, prefix: str = "") -> None:
        """Every number of ``row`` at optimiser step ``step``."""
        values = {prefix + k: v for k, v in _numbers(row).items() if k != "step"}
        for writer in self._writers:
            for key, value in values.items():
                writer.add_scalar(key, value, global_step=step)
            writer.flush()
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._writers, self._wandb = [], None


def open_trackers(log: Any, out: Path, label: str, config: dict[str, Any]) -> Tracker:
    """The run's :class:`Tracker` (``log``: the config's ``log`` section)."""
    return Tracker(log.trackers(), Path(out), label, config, log.wandb)
