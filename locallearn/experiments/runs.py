"""Training one run (:func:`run`: builds the task and hands it to the loop) and reading finished
(or interrupted) runs back from their output directories (:func:`load_run`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from locallearn import distributed as ddp
from locallearn.config import load_yaml
from locallearn.experiments.tasks import build_task
from locallearn.nets.base import BlockNet
from locallearn.parallel.checks import check_rule, check_settings
from locallearn.parallel.stage_trainer import PipelineTrainer
from locallearn.rules import build_rule
from locallearn.rules.base import Rule
from locallearn.runfiles import CHECKPOINT, CONFIG, SUMMARY, check_out_dir, read_metrics
from locallearn.runtime import tune_cpu_allocator
from locallearn.schema import RunConfig, build_config, migrate_config
from locallearn.task import Task
from locallearn.train import Trainer

__all__ = ["LoadedRun", "load_run", "read_metrics", "run"]


def run(cfg: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (resuming a checkpoint there) and return the summary.

    Under ``torchrun`` every rank calls this; the process group is set up and torn down here.
    It also tunes the process's memory allocator for speed, for the rest of the process
    (:func:`locallearn.runtime.tune_cpu_allocator`).
    """
    check_out_dir(out_dir)
    tune_cpu_allocator()
    started = ddp.world_size_from_env() > 1 and not ddp.is_initialized()
    ddp.init_from_env(cfg.device, cfg.parallel.timeout)
    try:
        with torch.random.fork_rng(devices=[]):
            rule = build_rule(cfg.rule, cfg.seed)  # bad rule options fail before the data loads
        trainer_class = Trainer
        if cfg.parallel.stages > 1:  # blocks on separate processes, pipelined
            trainer_class = PipelineTrainer
            check_rule(cfg, rule)  # before the data loads too
            check_settings(cfg)
        torch.manual_seed(cfg.seed)
        task = build_task(cfg)
        return trainer_class(cfg, task, out_dir).run()
    finally:
        if started:
            ddp.cleanup()


@dataclass
class LoadedRun:
    """A run rebuilt from its directory: config, task (with its data), network and rule."""

    path: Path
    cfg: RunConfig
    task: Task
    net: BlockNet
    rule: Rule
    epoch: int
    summary: dict[str, Any] | None

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``."""
        return read_metrics(self.path)


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """Rebuild a run from ``run_dir`` (its config and last checkpoint).

    Raises ValueError when the directory holds no run.
    """
    path = Path(run_dir)
    if not (path / CONFIG).is_file() or not (path / CHECKPOINT).is_file():
        raise ValueError(
            f"{str(path)!r} is not a run directory (needs {CONFIG} and {CHECKPOINT}; "
            "made by locallearn run)"
        )
    raw = load_yaml(path / CONFIG)
    migrate_config(raw)
    if device is not None:
        raw["device"] = device
    raw["progress"] = False
    cfg = build_config(raw)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    trainer = Trainer(cfg, task, path)
    trainer.load_checkpoint()
    trainer.net.eval()
    summary = None
    if (path / SUMMARY).is_file():
        summary = json.loads((path / SUMMARY).read_text())
    return LoadedRun(path, cfg, task, trainer.net, trainer.rule, trainer.epoch, summary)
