"""Self-supervised learning on images: data on the device, VGG encoder, linear probe at the end.

``data.name`` is ``cifar10``, ``stl10``, ``tiny-imagenet``, ``imagenet`` or ``folder`` (a tree
``<root>/<split>/<class>/<images>``); the data section is :class:`ImageDataConfig`. ImageNet, and
folders with ``data.streaming=true``, are not loaded into memory but decoded batch by batch in
worker processes (:mod:`locallearn.experiments.image_stream`); everything below holds for them too,
and the probe reads them in batches as well. The images of
the training split are loaded once, as ``uint8``, onto the run's device; every batch is a random
draw without replacement (the run's generator) whose two SSL views are computed on the device for
the whole batch (:class:`locallearn.data.augment.SSLViews`). The view pipeline draws from torch's
global generator, which the training loop seeds at the start and restores on resume, so runs are
reproducible and resumable.

Per epoch nothing is evaluated beyond the training loss. When training ends,
:meth:`ImageTask.final_metrics` runs the linear probe (:mod:`locallearn.eval.image_probe`) on the
frozen encoder and writes ``probe.json``; its accuracy joins ``summary.json`` as
``probe_accuracy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from locallearn.data.augment import ProbeAugment, SSLViews, normalize
from locallearn.data.images import ImageSet, dataset_info, load_images
from locallearn.eval.image_probe import ProbeResult, ProbeSettings, run_probe
from locallearn.experiments import schema
from locallearn.experiments.schema import ProbeConfig, RunConfig
from locallearn.nets.base import BlockNet
from locallearn.nets.vgg import VGG_KINDS
from locallearn.rules.base import Batch, Rule

IMAGE_DATASETS = ("cifar10", "stl10", "tiny-imagenet", "imagenet", "folder")
#: Default (SSL training split, test split, probe training split) of each dataset.
DEFAULT_SPLITS: dict[str, tuple[str, str, str]] = {
    "cifar10": ("train", "test", "train"),
    "stl10": ("train+unlabeled", "test", "train"),
    "tiny-imagenet": ("train", "val", "train"),
    "imagenet": ("train", "val", "train"),
    "folder": ("train", "test", "train"),
}
NET_KINDS = tuple(VGG_KINDS)
PROBE_FILE = "probe.json"


@dataclass
class ImageDataConfig:
    """An image dataset for self-supervised training and its linear probe.

    Attributes:
        name: ``cifar10``, ``stl10``, ``tiny-imagenet`` or ``folder``.
        root: the data folder (see :func:`locallearn.data.images.load_images` for layouts).
        split: split of the self-supervised training (default: ``train``; STL-10:
            ``train+unlabeled``, the 100k unlabelled images and the 5k labelled ones).
        test_split: split the probe is tested on (default ``test``; Tiny ImageNet ``val``).
        probe_split: labelled split the probe is trained on (default ``train``).
        subset: number of SSL training images (a random subset drawn with ``subset_seed``);
            ``None``: all.
        probe_subset: number of probe training images (random subset); ``None``: all.
        test_subset: number of test images (random subset); ``None``: all.
        subset_seed: seed of the three subsets (``None``: the run's seed).
        cache_dir: where decoded image trees are cached (default: inside the data folder).
        download: download the official release into ``root`` when it is not there.
        streaming: decode the images batch by batch in worker processes instead of holding the
            split in memory (``None``: on for ``imagenet``, off otherwise; ``folder`` may use it).
        image_size: streamed data: side of the network's input (default 224).
        load_size: streamed data: side of the decoded centre square the views and probe crops
            are cut from (default ``round(1.1 * image_size)``: the probe's test images are
            resized x1.1 and centre-cropped).
        workers: streamed data: decoding worker processes (0: the training process decodes;
            default 4).
        prefetch: streamed data: batches each worker decodes ahead (default 2).

    How the probe trains (epochs, augmentation, per-block probes, pooling grid) is set in the
    ``probe`` section (:class:`~locallearn.experiments.schema.ProbeConfig`); the data section
    says which images it sees.
    """

    name: Literal["cifar10", "stl10", "tiny-imagenet", "imagenet", "folder"] = "cifar10"
    root: str = "data/cifar10"
    split: str | None = None
    test_split: str | None = None
    probe_split: str | None = None
    subset: int | None = None
    probe_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int | None = None
    cache_dir: str | None = None
    download: bool = False
    streaming: bool | None = None
    image_size: int | None = None
    load_size: int | None = None
    workers: int | None = None
    prefetch: int | None = None

    def streams(self) -> bool:
        """Whether the images are decoded batch by batch (``streaming``, default per dataset)."""
        return self.name == "imagenet" if self.streaming is None else bool(self.streaming)

    def validate(self) -> None:
        for key in ("subset", "probe_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ValueError(f"data.{key}={value} is invalid: must be >= 2 (or null: all)")
        if self.download and self.name in ("folder", "imagenet"):
            raise ValueError(
                f"data.download=true is invalid for data.name={self.name} (no public download)"
            )
        if self.streams() and self.name not in ("imagenet", "folder"):
            raise ValueError(
                f"data.streaming=true is invalid for data.name={self.name}; valid: imagenet, folder"
            )
        if self.name == "imagenet" and not self.streams():
            raise ValueError("data.streaming=false is invalid for data.name=imagenet (too large "
                             "for memory)")
        for key in ("image_size", "load_size", "workers", "prefetch"):
            if getattr(self, key) is not None and not self.streams():
                raise ValueError(f"data.{key} applies to streamed data only (data.streaming=true)")
        for key in ("image_size", "load_size"):
            value = getattr(self, key)
            if value is not None and value < 8:
                raise ValueError(f"data.{key}={value} is invalid: must be >= 8")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"data.workers={self.workers} is invalid: must be >= 0")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"data.prefetch={self.prefetch} is invalid: must be >= 1")

    def decoding(self) -> tuple[int, int]:
        """``(workers, prefetch)`` of streamed data, defaults filled in."""
        return (4 if self.workers is None else self.workers,
                2 if self.prefetch is None else self.prefetch)

    def splits(self) -> tuple[str, str, str]:
        """``(training split, test split, probe training split)`` with defaults filled in."""
        train, test, probe = DEFAULT_SPLITS[self.name]
        return (self.split or train, self.test_split or test, self.probe_split or probe)


for _name in IMAGE_DATASETS:
    schema.DATA_CONFIGS[_name] = ImageDataConfig


def _subset(n: int, size: int | None, seed: int, salt: int) -> torch.Tensor | None:
    """Sorted indices of a random subset of ``size`` out of ``n`` (``None``: everything)."""
    if size is None or size >= n:
        return None
    gen = torch.Generator().manual_seed(seed * 1000 + salt)
    return torch.randperm(n, generator=gen)[:size].sort().values


class ImageTask:
    """Self-supervised training of an image encoder, evaluated by a linear probe."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        d = cfg.data
        if not isinstance(d, ImageDataConfig):
            raise ValueError(f"data.name={getattr(d, 'name', d)!r} is not an image dataset")
        self.cfg = cfg
        self.device = device
        self.data = d
        self.split = d.splits()[0]
        self.subset_seed = cfg.seed if d.subset_seed is None else d.subset_seed
        info = dataset_info(d.name)
        self.mean, self.std = info.mean, info.std
        self.stream = None
        if d.streams():  # decoded batch by batch (ImageNet, large folders)
            from locallearn.experiments.image_stream import init_stream

            init_stream(self)
            return
        train = self._load(self.split)
        keep = _subset(len(train), d.subset, self.subset_seed, 1)
        images = train.images if keep is None else train.images[keep]
        labels = train.labels if keep is None else train.labels[keep]
        if images.shape[0] < 2:
            raise ValueError(f"{d.name}: the {self.split} split has fewer than 2 images")
        if images.shape[2] != images.shape[3]:
            raise ValueError(
                f"{d.name}: images are {images.shape[3]}x{images.shape[2]}; the VGG encoder "
                "needs square images"
            )
        self.classes = list(train.classes)
        self.train_images = images.to(device)
        self.train_labels = labels.to(device)
        self._full_train = train  # kept for the probe when it uses the same split
        self.views = SSLViews(d.name, mean=self.mean, std=self.std).to(device)
        self.chance = 1.0 / max(len(self.classes), 1)
        self.rule_info: dict[str, Any] = {}
        side = int(images.shape[-1])
        self.info: dict[str, Any] = {
            "dataset": d.name,
            "train_split": self.split,
            "train_size": int(images.shape[0]),
            "image_size": side,
            "num_classes": len(self.classes),
            "width_mult": cfg.net.width_mult,
        }

    # ------------------------------------------------------------------ data
    def _load(self, split: str) -> ImageSet:
        d = self.data
        try:
            return load_images(d.name, d.root, split, cache_dir=d.cache_dir)
        except ValueError:
            if not d.download:
                raise
        from locallearn.data.download import download

        try:
            download(d.name, d.root)
        except RuntimeError as err:
            msg = str(err).replace("\n", " ")
            raise ValueError(f"{d.name}: download into {d.root!r} failed: {msg}") from None
        return load_images(d.name, d.root, split, cache_dir=d.cache_dir)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Clean preprocessing: scale to [0, 1] and normalise with the dataset's constants."""
        return normalize(images, None, self.mean, self.std)

    # ------------------------------------------------------------------ the Task protocol
    def build_net(self) -> BlockNet:
        c = self.cfg
        if c.net.kind not in NET_KINDS:
            raise ValueError(
                f"net.kind={c.net.kind!r} does not fit data.name={self.data.name}; "
                f"valid: {', '.join(NET_KINDS)}"
            )
        seed = c.seed if c.net.seed is None else c.net.seed
        build = VGG_KINDS[c.net.kind]
        net = build(c.net.width_mult, bias=c.net.bias, seed=seed).to(self.device)
        if c.net.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def sample_input(self) -> torch.Tensor:
        if self.stream is not None:
            from locallearn.data.augment import center_crop

            return self.transform(center_crop(self.stream.sample(2), self.side))
        return self.transform(self.train_images[:2])

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.stream is not None:
            return self.stream.steps(batch_size)
        n = self.train_images.shape[0]
        return n // batch_size + (1 if n % batch_size >= 2 else 0)

    def check_rule(self, rule: Rule) -> None:
        from locallearn.rules.image_ssl import RULES, VIEW_KIND

        if getattr(rule, "view_kind", None) != VIEW_KIND:
            raise ValueError(
                f"rule.name={rule.name!r} does not fit image encoders (no read-out, no labels "
                f"during training); valid: {', '.join(RULES)}"
            )

    def batches(
        self, generator: torch.Generator, batch_size: int, view_kind: str | None
    ) -> Iterator[Batch]:
        from locallearn.rules.image_ssl import VIEW_KIND

        if view_kind not in (None, VIEW_KIND):
            raise ValueError(f"image tasks supply views of kind {VIEW_KIND!r}, not {view_kind!r}")
        if self.stream is not None:
            from locallearn.experiments.image_stream import stream_batches

            yield from stream_batches(self, generator, batch_size, view_kind)
            return
        n = self.train_images.shape[0]
        perm = torch.randperm(n, generator=generator).to(self.device)
        labelled = bool((self.train_labels >= 0).all())
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < 2:  # a lone image has no negative
                break
            images = self.train_images[idx]
            views = self.views.two_views(images) if view_kind is not None else None
            y = self.train_labels[idx] if labelled else None
            yield Batch(self.transform(images), y, views, generator)

    def evaluate(self, net: BlockNet, rule: Rule) -> dict[str, float]:
        """Nothing beyond the training loss per epoch: the probe runs once, at the end."""
        return {}

    # ------------------------------------------------------------------ the probe
    def probe_data(
        self, d: ImageDataConfig | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train images, train labels, test images, test labels)`` of the probe, on device."""
        d = d or self.data
        _, test_split, probe_split = d.splits()
        train = self._full_train if probe_split == self.split else self._load(probe_split)
        test = self._load(test_split)
        keep = _subset(len(train), d.probe_subset, self.subset_seed, 2)
        tr_x = train.images if keep is None else train.images[keep]
        tr_y = train.labels if keep is None else train.labels[keep]
        keep = _subset(len(test), d.test_subset, self.subset_seed, 3)
        te_x = test.images if keep is None else test.images[keep]
        te_y = test.labels if keep is None else test.labels[keep]
        if tr_x.shape[1:] != te_x.shape[1:]:
            raise ValueError(
                f"{d.name}: probe training images {tuple(tr_x.shape[1:])} and test images "
                f"{tuple(te_x.shape[1:])} differ in size"
            )
        dev = self.device
        return tr_x.to(dev), tr_y.to(dev), te_x.to(dev), te_y.to(dev)

    def probe(
        self,
        net: BlockNet,
        probe_cfg: ProbeConfig | None = None,
        data_cfg: ImageDataConfig | None = None,
        progress: bool | None = None,
    ) -> ProbeResult:
        """Run the linear probe on the frozen ``net`` (settings default to the run's config)."""
        p = probe_cfg or self.cfg.probe
        d = data_cfg or self.data
        settings = ProbeSettings(
            epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay, steps=p.steps,
            batch_size=p.batch_size, per_block=p.per_block,
            grid=tuple(p.grid) if p.grid is not None else None,
            seed=self.cfg.seed,
        )
        if self.stream is not None:
            from locallearn.experiments.image_stream import stream_probe

            return stream_probe(self, net, settings, p.augment,
                                self.cfg.progress if progress is None else progress, d)
        augment = None
        if p.augment:
            aug = ProbeAugment(None, mean=self.mean, std=self.std).to(self.device)

            def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return aug(x, g)

        tr_x, tr_y, te_x, te_y = self.probe_data(d)
        _, test_split, probe_split = d.splits()
        return run_probe(
            net, tr_x, tr_y, te_x, te_y, len(self.classes), self.transform, settings,
            augment=augment, progress=self.cfg.progress if progress is None else progress,
            description=f"{d.name} {probe_split} -> {test_split}",
        )

    def final_metrics(self, net: BlockNet, rule: Rule, out_dir: str | Path) -> dict[str, Any]:
        """Probe the final encoder; write ``probe.json``; return the summary's probe keys."""
        result = self.probe(net)
        return write_probe(Path(out_dir), result)


def write_probe(out_dir: Path, result: ProbeResult) -> dict[str, Any]:
    """Write ``probe.json`` into ``out_dir``; return the keys that go into ``summary.json``.

    Under data parallelism every rank probes (the same result); only rank 0 writes.
    """
    from locallearn.train import write_json_atomic

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        write_json_atomic(out_dir / PROBE_FILE, result.as_dict())
    keys: dict[str, Any] = {
        "probe_accuracy": result.accuracy,
        "probe_train_accuracy": result.train_accuracy,
        "probe_protocol": result.protocol,
        "probe_seconds": result.seconds,
    }
    if result.block_accuracies is not None:
        keys["probe_block_accuracies"] = result.block_accuracies
    return keys
