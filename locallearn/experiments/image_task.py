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

Per epoch nothing is evaluated beyond the training loss. With ``probe_every`` the loop calls
:meth:`ImageTask.curve_probe` on its schedule: a weighted k-NN read-out
(:mod:`locallearn.eval.knn`) of the concatenated pooled features of all blocks, from a fixed
labelled subset of the probe's training split (``probe.curve_train`` images) to a fixed subset of
its test split (``probe.curve_test``), both drawn once with ``subset_seed``; the accuracy is
logged as ``probe_accuracy`` with the step and the training seconds. When training ends,
:meth:`ImageTask.final_metrics` runs the linear probe (:mod:`locallearn.eval.image_probe`) on the
frozen encoder and writes ``probe.json``; its accuracy joins ``summary.json`` as
``probe_accuracy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from locallearn import distributed as ddp
from locallearn.data.augment import ProbeAugment, SSLViews, normalize, random_flip
from locallearn.data.images import ImageSet, dataset_info, load_images, subset_indices
from locallearn.eval.image_probe import ProbeResult, ProbeSettings, run_probe
from locallearn.nets.base import BlockNet
from locallearn.nets.image_nets import IMAGE_NETS
from locallearn.rules.base import Batch, Rule
from locallearn.runfiles import PROBE, write_json_atomic
from locallearn.schema import ImageDataConfig, ProbeConfig, RunConfig
from locallearn.task import Task

NET_KINDS = tuple(IMAGE_NETS)
#: What an image rule may ask for (``Rule.view_kind``): two augmented views of each image
#: (``ssl``), or the image itself, flipped at random with ``data.views.flip_p`` (``image``).
IMAGE_VIEW_KINDS = ("ssl", "image")


class ImageTask(Task):
    """Self-supervised training of an image encoder, evaluated by a linear probe."""

    has_curve_probe = True

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
        keep = subset_indices(len(train), d.subset, self.subset_seed, 1)
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
        if len(self.classes) < 2:
            raise ValueError(
                f"{d.name}: the {self.split} split of {str(d.root)!r} holds {len(self.classes)} "
                f"class ({', '.join(map(str, self.classes)) or 'none'}); the linear probe needs at "
                "least 2 (one class folder per class)"
            )
        self.train_images = images.to(device)
        self.train_labels = labels.to(device)
        # the probe's splits, read now: missing or unreadable data fails before training
        _, test_split, probe_split = d.splits()
        self._sets = {self.split: train}
        for split in (probe_split, test_split):
            if split not in self._sets:
                self._sets[split] = self._load(split)
        self.views = SSLViews(d.name, mean=self.mean, std=self.std, **d.views.kwargs()).to(device)
        self.chance = 1.0 / max(len(self.classes), 1)
        self.rule_info: dict[str, Any] = {}
        self._curve_data: tuple[torch.Tensor, ...] | None = None
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

    def autocast(self):
        """bf16 autocast on the task's device when ``precision=bf16`` (else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16")

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Clean preprocessing: scale to [0, 1] and normalise with the dataset's constants (the
        views' device copies: a tensor made from a list per batch is a copy the host waits for)."""
        return normalize(images, None, self.views.mean, self.views.std)

    # ------------------------------------------------------------------ the Task protocol
    def build_net(self) -> BlockNet:
        c = self.cfg
        if c.net.kind not in NET_KINDS:
            raise ValueError(
                f"net.kind={c.net.kind!r} does not fit data.name={self.data.name}; "
                f"valid: {', '.join(NET_KINDS)}"
            )
        seed = c.seed if c.net.seed is None else c.net.seed
        build = IMAGE_NETS[c.net.kind]
        net = build(c.net.width_mult, bias=c.net.bias, seed=seed).to(self.device)
        if c.net.channels_last:
            net = net.to(memory_format=torch.channels_last)
        n = len(net.blocks)
        if c.probe.blocks is not None and max(c.probe.blocks) > n:
            raise ValueError(f"probe.blocks={c.probe.blocks} is invalid for net.kind={c.net.kind} "
                             f"({n} blocks); valid: 1..{n}")
        return net

    def sample_input(self) -> torch.Tensor:
        if self.stream is not None:
            from locallearn.data.augment import center_crop

            return self.transform(center_crop(self.stream.sample(2), self.side))
        return self.transform(self.train_images[:2])

    @staticmethod
    def min_batch() -> int:
        """The smallest batch trained on: two images (a negative each) for every rank."""
        return 2 * ddp.world_size()

    def steps_per_epoch(self, batch_size: int) -> int:
        n = len(self.stream) if self.stream is not None else self.train_images.shape[0]
        return n // batch_size + (1 if n % batch_size >= self.min_batch() else 0)

    def check_rule(self, rule: Rule) -> None:
        kind = getattr(rule, "view_kind", None)
        if rule.uses_labels or kind not in IMAGE_VIEW_KINDS:
            from locallearn.rules import image_rule_names

            raise ValueError(
                f"rule.name={rule.name!r} does not fit image encoders (no read-out, no labels "
                f"during training); valid: {', '.join(image_rule_names(IMAGE_VIEW_KINDS))}"
            )
        if kind == "image":
            extra = [k for k in self.data.views.kwargs() if k != "flip_p"]
            if extra:
                raise ValueError(
                    f"data.views.{extra[0]} does not apply to rule.name={rule.name} (it sees each "
                    "image itself; of data.views only flip_p applies); remove it"
                )
            if self.stream is not None:
                raise ValueError(f"rule.name={rule.name} does not run on streamed data yet; "
                                 "valid: data.streaming=false")

    def batches(
        self, generator: torch.Generator, batch_size: int, view_kind: str | None
    ) -> Iterator[Batch]:
        if view_kind not in (None, *IMAGE_VIEW_KINDS):
            raise ValueError(f"image tasks supply views of kind {', '.join(IMAGE_VIEW_KINDS)}, "
                             f"not {view_kind!r}")
        if batch_size < self.min_batch():
            raise ValueError(f"batch_size={batch_size} leaves some of the {ddp.world_size()} "
                             f"ranks fewer than 2 images (no negative); valid: batch_size >= "
                             f"{self.min_batch()}")
        if self.stream is not None:
            from locallearn.experiments.image_stream import stream_batches

            yield from stream_batches(self, generator, batch_size, view_kind)
            return
        n = self.train_images.shape[0]
        perm = torch.randperm(n, generator=generator).to(self.device)
        labelled = bool((self.train_labels >= 0).all())
        flip_p = self.data.views.flip_p or 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < self.min_batch():  # a lone image (per rank) has no negative
                break
            images = self.train_images[idx]
            views = None
            if view_kind == "ssl":
                views = self.views.two_views(images)
            elif view_kind == "image" and flip_p > 0:
                images = random_flip(images, flip_p)
            y = self.train_labels[idx] if labelled else None
            yield Batch(self.transform(images), y, views, generator)

    def evaluate(self, net: BlockNet, rule: Rule) -> dict[str, float]:
        """Nothing beyond the training loss per epoch: the probe runs once, at the end."""
        return {}

    def curve_probe(self, net: BlockNet) -> dict[str, float]:
        """The cheap probe of learning curves (see the module docstring): ``probe_accuracy``."""
        from locallearn.eval.image_probe import encoder_features, probe_pools
        from locallearn.eval.knn import knn_accuracy

        if self._curve_data is None:
            p = self.cfg.probe
            d = replace(self.data, probe_subset=p.curve_train, test_subset=p.curve_test)
            self._curve_data = self.probe_data(d, salt=4)
        tr_x, tr_y, te_x, te_y = self._curve_data
        p = self.cfg.probe
        pools = probe_pools(net, int(tr_x.shape[-1]), tuple(p.grid) if p.grid else None)
        with self.autocast():
            ref = encoder_features(net, tr_x, self.transform, pools)
            query = encoder_features(net, te_x, self.transform, pools)
        acc = knn_accuracy(ref, tr_y, query, te_y, len(self.classes), k=p.curve_k)
        return {"probe_accuracy": acc}

    # ------------------------------------------------------------------ the probe
    def _split_set(self, split: str) -> ImageSet:
        """A split of the data, read once (the probe's were read before training)."""
        if split not in self._sets:
            self._sets[split] = self._load(split)
        return self._sets[split]

    def probe_data(
        self, d: ImageDataConfig | None = None, salt: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train images, train labels, test images, test labels)`` of the probe, on device.

        ``salt`` picks the subsets' random draw (the final probe's: 2 and 3; the curve's: 4, 5).
        Streamed data decodes only the two subsets.
        """
        d = d or self.data
        if self.stream is not None:
            from locallearn.experiments.image_stream import stream_probe_data

            return stream_probe_data(self, d, salt)
        _, test_split, probe_split = d.splits()
        train = self._split_set(probe_split)
        test = self._split_set(test_split)
        keep = subset_indices(len(train), d.probe_subset, self.subset_seed, salt)
        tr_x = train.images if keep is None else train.images[keep]
        tr_y = train.labels if keep is None else train.labels[keep]
        keep = subset_indices(len(test), d.test_subset, self.subset_seed, salt + 1)
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
            seed=self.cfg.seed, bf16=self.cfg.precision == "bf16",
            blocks=None if p.blocks is None else tuple(sorted(b - 1 for b in p.blocks)),
            standardize=p.standardize, dropout=p.dropout, schedule=p.schedule,
            flip=p.augment == "flip", init=p.init, init_scale=p.init_scale,
        )
        if self.stream is not None:
            from locallearn.experiments.image_stream import stream_probe

            return stream_probe(self, net, settings, p.augment is True,
                                self.cfg.progress if progress is None else progress, d)
        augment = None
        if p.augment is True:
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
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        write_json_atomic(out_dir / PROBE, result.as_dict())
    keys: dict[str, Any] = {
        "probe_accuracy": result.accuracy,
        "probe_train_accuracy": result.train_accuracy,
        "probe_protocol": result.protocol,
        "probe_seconds": result.seconds,
    }
    blocks, n_blocks = result.extra.get("blocks"), result.extra.get("n_blocks")
    top = blocks is None or n_blocks is None or blocks[-1] == n_blocks  # the top block probed
    if blocks is not None and n_blocks is not None and len(blocks) < n_blocks:
        keys["probe_blocks"] = blocks
    if result.block_accuracies is not None:
        keys["probe_block_accuracies"] = result.block_accuracies
        if top:
            keys["probe_top_accuracy"] = result.block_accuracies[-1]  # the top block alone
    if result.silent_fractions is not None:
        keys["probe_block_silent"] = result.silent_fractions
        if top:
            keys["probe_top_silent"] = result.silent_fractions[-1]
    return keys
