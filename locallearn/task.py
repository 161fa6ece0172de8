"""What the training loop needs from a task (data + network + evaluation).

The loop (:mod:`locallearn.train`) is handed an object with this shape and never asks which task
it is; :mod:`locallearn.experiments.tasks` builds one from a config by ``data.name``. The tasks
subclass :class:`Task`, so the optional hooks (a probe during training) have their defaults here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from locallearn.nets.base import BlockNet
from locallearn.rules.base import Batch, Rule


class Task(Protocol):
    """A dataset with its network and its evaluation, all on one device."""

    chance: float
    #: facts a rule may need (e.g. ``s`` for the RHM), passed to ``build_rule``
    rule_info: dict[str, Any]
    #: facts written to the summary (sizes, P*, ...)
    info: dict[str, Any]
    #: whether :meth:`curve_probe` measures something (``probe_every`` needs it)
    has_curve_probe: bool = False

    def build_net(self) -> BlockNet: ...

    def sample_input(self) -> torch.Tensor: ...

    def check_rule(self, rule: Rule) -> None:
        """Raise ValueError when the rule does not fit this task or its network."""

    def batches(
        self, generator: torch.Generator, batch_size: int, view_kind: str | None
    ) -> Iterator[Batch]: ...

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch (the length of a per-step learning-rate schedule)."""

    def evaluate(self, net: BlockNet, rule: Rule) -> dict[str, float]:
        """Metrics after an epoch (cheap; written to ``metrics.jsonl``)."""

    def final_metrics(self, net: BlockNet, rule: Rule, out_dir: Path) -> dict[str, Any]:
        """Runs once when training ends (the net in eval mode); the result joins
        ``summary.json`` (the linear probe of image encoders; ``{}`` when there is nothing)."""

    def curve_probe(self, net: BlockNet) -> dict[str, float]:
        """A quick probe during training (``probe_every``; :attr:`has_curve_probe`): metrics
        written to ``metrics.jsonl`` with the step and the training seconds."""
        raise NotImplementedError(f"{type(self).__name__} has no probe during training")
