"""The optimiser of one stage of a pipeline, whose state dict is that of the whole run."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StageOptimizer"]


class StageOptimizer:
    """The optimiser of one stage, whose state dict is that of the whole run.

    ``load_state_dict`` takes a one-process optimiser state (every trained parameter, in the
    rule's order) and keeps this stage's part; ``state_dict`` returns the whole run's state once
    :meth:`set_gathered` has been given every stage's part (rank 0, at checkpoints).
    """

    def __init__(self, opt: torch.optim.Optimizer, index: list[int], total: int,
                 per_block: bool = False):
        self.opt = opt
        self.index = index  # global position of each of this stage's parameters
        self.total = total
        #: one parameter group per block (per-block optimiser settings), else one group
        self.per_block = per_block
        self._gathered: list[tuple[list[int], dict]] | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.opt.step()

    def local_state_dict(self) -> dict:
        return self.opt.state_dict()

    def set_gathered(self, parts: list[tuple[list[int], dict]]) -> None:
        """Every stage's ``(index, local state dict)``, in stage order."""
        self._gathered = parts

    def state_dict(self) -> dict:
        if self._gathered is None:
            raise RuntimeError("the stages' optimiser states have not been gathered")
        state: dict[int, Any] = {}
        for index, part in self._gathered:
            for i, value in part["state"].items():
                state[index[i]] = value
        if self.per_block:  # the stages' groups, in block order: the one-process layout
            groups = [{**g, "params": [index[i] for i in g["params"]]}
                      for index, part in self._gathered for g in part["param_groups"]]
        else:
            groups = [{**g, "params": list(range(self.total))}
                      for g in self._gathered[0][1]["param_groups"]]
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, full: dict) -> None:
        where = {g: i for i, g in enumerate(self.index)}
        state = {where[g]: v for g, v in full["state"].items() if g in where}
        if self.per_block:  # this stage's blocks' groups
            groups = [{**g, "params": [where[i] for i in g["params"] if i in where]}
                      for g in full["param_groups"]]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{**g, "params": list(range(len(self.index)))}
                      for g in full["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
