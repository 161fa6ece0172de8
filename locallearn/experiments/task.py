"""What the training loop needs from a task (data + network + evaluation)."""

from __future__ import annotations

from collections.abc import Iterator
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

    # Optional: ``final_metrics(net, rule, out_dir) -> dict`` runs once when training ends and
    # its result joins ``summary.json`` (the linear probe of image encoders).
