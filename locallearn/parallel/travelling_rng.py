"""The run's generator when blocks above stage 0 of a pipeline draw from it."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TravellingGenerator"]


class TravellingGenerator:
    """The run's generator when blocks above stage 0 draw from it (a rule whose carry holds
    ``generator``, e.g. a module placing its prototypes): its state travels with the carry.

    Each stage counts the steps at which its copy changed, starting from the count it adopted;
    a carry holds the newest ``(count, state)`` a stage has seen, and a stage adopts a newer one
    when it receives it. When one stage at a time draws, in the order of the batches, every
    draw starts from the state a one-process run has at that point. At each epoch's start
    every stage adopts the newest state (the next permutation is drawn from it)."""

    def __init__(self, generator: torch.Generator, rank: int, world: int):
        self.generator, self.rank, self.world = generator, rank, world
        self.count = 0
        self.seen = generator.get_state()

    def _note(self) -> None:
        state = self.generator.get_state()
        if not torch.equal(state, self.seen):
            self.count, self.seen = self.count + 1, state

    def sync(self) -> None:
        """Every stage takes the newest state (ties: the lowest rank's)."""
        self._note()
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (self.count, -self.rank, self.seen))
        count, _, state = max(parts, key=lambda p: (p[0], p[1]))
        self.generator.set_state(state)
        self.count, self.seen = count, state

    def adopt(self, carry: dict[str, Any]) -> dict[str, Any]:
        """The carry as this stage's rule reads it: the generator is this stage's, newest."""
        if "rng" not in carry:
            return carry
        count, state = carry["rng"]
        if count > self.count:
            self.generator.set_state(state)
            self.count, self.seen = count, state
        return {**{k: v for k, v in carry.items() if k != "rng"}, "generator": self.generator}

    def stamp(self, carry: dict[str, Any]) -> dict[str, Any]:
        """The carry as it travels: the generator replaced by its newest count and state."""
        if "generator" not in carry:
            return carry
        self._note()
        out = {k: v for k, v in carry.items() if k != "generator"}
        return {**out, "rng": (self.count, self.seen)}
