"""The image task's streamed data: ImageNet and large folders, decoded batch by batch.

:class:`StreamSource` is the data of one split seen by the task: a
:class:`locallearn.data.streaming.StreamSet` decoded in worker processes, batches moved to the
task's device. The run's generator draws each epoch's permutation, so the batches, and therefore
a resumed run, are those of an uninterrupted one. Under ``torchrun`` every rank decodes only its
part of each global batch and the parts are gathered (:func:`locallearn.distributed.gather_rows`),
so every rank holds the same global batch, draws the same views from the same random state and the
loop shards it as for in-memory data: the result is that of one process with the global batch.

The task-side functions here (:func:`init_stream`, :func:`stream_batches`, :func:`stream_probe`,
:func:`stream_probe_data`) are called by :class:`locallearn.experiments.image_task.ImageTask`
when ``data.streaming`` is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from locallearn import distributed as ddp
from locallearn.data.augment import SSLViews, center_crop
from locallearn.data.images import subset_indices
from locallearn.data.streaming import StreamLoader, StreamSet, open_stream
from locallearn.eval.image_probe import ProbeResult, ProbeSettings
from locallearn.eval.stream_probe import run_stream_probe
from locallearn.rules.base import Batch

__all__ = ["StreamSource", "init_stream", "stream_batches", "stream_probe", "stream_probe_data"]


class StreamSource:
    """One split on disk, batched onto ``device`` (see the module docstring)."""

    def __init__(self, dataset: StreamSet, device: torch.device, workers: int, prefetch: int,
                 persistent: bool = True):
        self.dataset = dataset
        self.device = device
        self.rank, self.world = ddp.rank(), ddp.world_size()
        self.loader = StreamLoader(dataset, workers, prefetch, pin_memory=device.type == "cuda",
                                   persistent=persistent)
        self.labelled = bool((dataset.labels >= 0).all())

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` images, decoded here (``uint8``, on the device)."""
        return torch.stack([self.dataset[i][0] for i in range(min(n, len(self)))]).to(self.device)

    def batches(self, order: torch.Tensor | None, batch_size: int, min_batch: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, labels)`` of the global batches of ``order`` (``None``: file
        order), on the device; batches smaller than ``min_batch`` are left out."""
        n = len(self)
        order = torch.arange(n) if order is None else order.cpu()
        chunks = [order[s:s + batch_size] for s in range(0, n, batch_size)]
        chunks = [c for c in chunks if c.numel() >= min_batch]
        mine = [ddp.shard(c, self.rank, self.world).tolist() for c in chunks]
        # a chunk smaller than the number of ranks leaves some ranks nothing to decode: they
        # take part in the gather with no rows (the loader is given only non-empty parts)
        decoded = iter(self.loader.batches([part for part in mine if part]))
        side = self.dataset.load_size
        nothing = (torch.empty(0, 3, side, side, dtype=torch.uint8),
                   torch.empty(0, dtype=torch.int64))
        for chunk, part in zip(chunks, mine):
            images, labels = next(decoded) if part else nothing
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.world > 1:
                counts = [ddp.shard(chunk, r, self.world).numel() for r in range(self.world)]
                images = ddp.gather_rows(images, counts)
                labels = ddp.gather_rows(labels, counts)
            yield images, labels


def _sizes(d: Any, dataset_side: int | None) -> tuple[int, int]:
    side = d.image_size or dataset_side or 224
    load = d.load_size or int(round(1.1 * side))
    return side, load


def open_source(task: Any, split: str, persistent: bool) -> StreamSource:
    d = task.data
    side, load = _sizes(d, None if d.name == "folder" else 224)
    data = open_stream(d.name, d.root, split, load)
    if data.classes != task.classes:
        raise ValueError(
            f"{d.name}: the classes of the {split} split differ from those of {task.split}"
        )
    return StreamSource(data, task.device, *d.decoding(), persistent)


def init_stream(task: Any) -> None:
    """Set the task's streamed training data, views and facts (the in-memory path's
    counterpart in ``ImageTask.__init__``)."""

    d, cfg = task.data, task.cfg
    side, load = _sizes(d, None if d.name == "folder" else 224)
    if load < side:
        raise ValueError(f"data.load_size={load} is invalid: must be >= data.image_size={side}")
    full = open_stream(d.name, d.root, task.split, load)
    keep = subset_indices(len(full), d.subset, task.subset_seed, 1)
    data = full.subset(keep)
    if len(data) < 2:
        raise ValueError(f"{d.name}: the {task.split} split has fewer than 2 images")
    task.side = side
    task.stream = StreamSource(data, task.device, *d.decoding(), persistent=True)
    task.classes = list(full.classes)
    task.views = SSLViews(d.name, mean=task.mean, std=task.std, size=side,
                         **d.views.kwargs()).to(task.device)
    task.chance = 1.0 / max(len(task.classes), 1)
    task.rule_info = {}
    task._curve_data = None
    task.info = {
        "dataset": d.name,
        "train_split": task.split,
        "train_size": len(data),
        "image_size": side,
        "load_size": load,
        "streaming": True,
        "decode_workers": d.decoding()[0],
        "num_classes": len(task.classes),
        "width_mult": cfg.net.width_mult,
    }


def stream_batches(task: Any, generator: torch.Generator, batch_size: int,
                   view_kind: str | None) -> Iterator[Batch]:
    """The task's batches from the stream: the generator draws the epoch's order."""
    src: StreamSource = task.stream
    order = torch.randperm(len(src), generator=generator)
    for images, labels in src.batches(order, batch_size, task.min_batch()):
        views = task.views.two_views(images) if view_kind is not None else None
        y = labels if src.labelled else None
        yield Batch(task.transform(center_crop(images, task.side)), y, views, generator)


def _probe_source(task: Any, d: Any, split: str, size: int | None, salt: int) -> StreamSource:
    """``split`` on disk, cut to the fixed random subset of ``size`` images drawn with ``salt``
    (all of it for ``None``), as the in-memory probe draws it."""
    src = open_source(task, split, persistent=False)
    keep = subset_indices(len(src), size, task.subset_seed, salt)
    if keep is None:
        return src
    return StreamSource(src.dataset.subset(keep), task.device, *d.decoding(), persistent=False)


def stream_probe(task: Any, net: Any, settings: ProbeSettings, augment: bool,
                 progress: bool, d: Any) -> ProbeResult:
    """The linear probe on streamed probe-training and test splits."""

    _, test_split, probe_split = d.splits()
    train = _probe_source(task, d, probe_split, d.probe_subset, 2)
    test = _probe_source(task, d, test_split, d.test_subset, 3)
    return run_stream_probe(
        net, train.batches, len(train), test.batches, len(task.classes), task.side,
        task.transform, settings, augment=augment, progress=progress,
        description=f"{d.name} {probe_split} -> {test_split}",
    )


def stream_probe_data(task: Any, d: Any, salt: int, batch_size: int = 256
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train images, train labels, test images, test labels)``: the fixed subsets of ``d``
    (``probe_subset``, ``test_subset``) decoded once, centre-cropped, ``uint8`` on the device.

    Only those images are decoded, never a whole split: the learning curve's small subsets
    (``probe.curve_train``, ``probe.curve_test``) of ImageNet fit in memory where the splits do
    not. The final probe streams instead (:func:`stream_probe`).
    """
    _, test_split, probe_split = d.splits()
    out: list[torch.Tensor] = []
    for split, size, s in ((probe_split, d.probe_subset, salt), (test_split, d.test_subset,
                                                                  salt + 1)):
        src = _probe_source(task, d, split, size, s)
        parts = list(src.batches(None, batch_size))
        if not parts:
            raise ValueError(f"{d.name}: the {split} subset is empty; use a larger "
                             "probe.curve_train/curve_test")
        out.append(torch.cat([center_crop(x, task.side) for x, _ in parts]))
        out.append(torch.cat([y for _, y in parts]))
    return out[0], out[1], out[2], out[3]
