"""The task registry: ``data.name`` -> the task that trains and evaluates on that data.

The training loop never imports a task; it is handed one built here. Each entry is a function
``(cfg, device) -> Task``; task modules are imported when their task is built (an RHM run does
not load the image pipeline). The data section of each name is in
:data:`locallearn.schema.DATA_CONFIGS`. To add a task: write a class with the
:class:`locallearn.task.Task` shape, add its data config class to ``DATA_CONFIGS`` and its
builder here (or call :func:`register_task`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from locallearn import distributed as ddp
from locallearn.schema import IMAGE_DATASETS, RunConfig
from locallearn.task import Task
from locallearn.train import resolve_device

TaskBuilder = Callable[[RunConfig, torch.device], Task]


def _rhm(cfg: RunConfig, device: torch.device) -> Task:
    from locallearn.experiments.rhm_task import RHMTask

    return RHMTask(cfg, device)


def _image(cfg: RunConfig, device: torch.device) -> Task:
    from locallearn.experiments.image_task import ImageTask

    return ImageTask(cfg, device)


TASKS: dict[str, TaskBuilder] = {"rhm": _rhm, **{name: _image for name in IMAGE_DATASETS}}


def register_task(name: str, builder: TaskBuilder) -> None:
    """Make ``data.name=<name>`` build its task with ``builder(cfg, device)``."""
    TASKS[name] = builder


def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg.data.name`` on the config's device (this rank's, under torchrun)."""
    name = cfg.data.name
    if name not in TASKS:
        raise ValueError(f"data.name={name!r} has no task; valid: {', '.join(TASKS)}")
    return TASKS[name](cfg, resolve_device(ddp.local_device(cfg.device)))
