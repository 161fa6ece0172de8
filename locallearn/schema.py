"""The typed config of one run (``locallearn run``).

Sections: ``data`` (chosen by ``data.name``), ``net``, ``rule``, ``optim``, ``probe``, and
top-level training keys. Every preset in ``configs/`` is an instance of :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from locallearn.config import deep_merge, from_dict, load_yaml, parse_overrides, to_dict
from locallearn.data.images import DATASETS, STREAM_DATASETS

_P_STAR = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*?\s*P\*\s*$")


def resolve_size(value: int | str, p_star: int, key: str) -> int:
    """An integer size, or a multiple of ``P*`` written like ``4P*`` or ``0.5P*``."""
    if isinstance(value, int):
        return value
    match = _P_STAR.match(str(value))
    if not match:
        raise ValueError(
            f"{key}={value!r} is invalid: expected an integer or a multiple of P* such as 4P*"
        )
    return int(round(float(match.group(1)) * p_star))


@dataclass
class RHMDataConfig:
    """An RHM task: the grammar, the sample sizes and the views."""

    #: keys of other sections that only this kind of data reads, with their defaults (an RHM
    #: run given a key that another kind of data owns, e.g. ``net.channels_last``, is an error)
    run_keys: ClassVar[dict[str, dict[str, Any]]] = {"net": {"width": 256}}

    name: Literal["rhm"] = "rhm"
    v: int = 8
    n_classes: int = 8
    m: int = 4
    s: int = 2
    L: int = 3
    seed_rules: int = 0
    seed_sample: int | None = None  # None: the run's seed
    train_size: int | str = "4P*"
    test_size: int = 2000
    whiten: bool = False
    mask_fraction: float = 0.25  # share of positions hidden in each view of the "mask" view

    def validate(self) -> None:
        if not 0.0 < self.mask_fraction <= 0.5:
            raise ValueError(
                f"data.mask_fraction={self.mask_fraction} is invalid: must be in (0, 0.5]"
            )
        if self.test_size < 0:
            raise ValueError(f"data.test_size={self.test_size} is invalid: must be >= 0")


#: the image datasets' names (from the one table of datasets, :data:`DATASETS`)
IMAGE_DATASETS = tuple(DATASETS)
#: Default (SSL training split, test split, probe training split) of each dataset.
DEFAULT_SPLITS: dict[str, tuple[str, str, str]] = {
    name: info.default_splits for name, info in DATASETS.items()
}


@dataclass
class ImageViewsConfig:
    """The augmentations that make the two SSL views of an image (``data.views``).

    Every key left ``null`` takes the paper's value (:class:`locallearn.data.augment.SSLViews`):
    random resized crop of area ``crop_scale`` (CIFAR-10 0.25-1, other datasets 0.08-1) and
    aspect ratio ``crop_ratio`` (3/4-4/3), horizontal flip (``flip_p`` 0.5), colour jitter of
    strengths ``jitter`` (brightness, contrast, saturation, hue: 0.8, 0.8, 0.8, 0.2) with
    probability ``jitter_p`` (0.8), grayscale (``gray_p`` 0.2), Gaussian blur (``blur_p`` 0.5,
    ``blur_sigma`` 0.1-2 pixels, kernel ``blur_fraction`` 0.1 of the side). A probability of 0
    removes its stage, e.g. ``data.views.blur_p=0``.
    """

    crop_scale: list[float] | None = None
    crop_ratio: list[float] | None = None
    flip_p: float | None = None
    jitter: list[float] | None = None
    jitter_p: float | None = None
    gray_p: float | None = None
    blur_p: float | None = None
    blur_sigma: list[float] | None = None
    blur_fraction: float | None = None

    def validate(self) -> None:
        for key, n in (("crop_scale", 2), ("crop_ratio", 2), ("jitter", 4), ("blur_sigma", 2)):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"data.views.{key}={value} is invalid: give {n} numbers")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.views.crop_scale={self.crop_scale} is invalid: must satisfy "
                             "0 < min <= max <= 1")
        for key in ("crop_ratio", "blur_sigma"):
            value = getattr(self, key)
            if value is not None and not 0 < value[0] <= value[1]:
                raise ValueError(f"data.views.{key}={value} is invalid: must satisfy "
                                 "0 < min <= max")
        for key in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"data.views.{key}={value} is invalid: must lie in [0, 1]")
        if self.jitter is not None and not (all(0 <= v < math.inf for v in self.jitter)
                                            and self.jitter[3] <= 0.5):
            raise ValueError(f"data.views.jitter={self.jitter} is invalid: brightness, contrast, "
                             "saturation >= 0 and hue in [0, 0.5]")
        if self.blur_fraction is not None and not 0 < self.blur_fraction <= 1:
            raise ValueError(f"data.views.blur_fraction={self.blur_fraction} is invalid: must "
                             "lie in (0, 1]")

    def kwargs(self) -> dict[str, Any]:
        """The keys that are set, as keyword arguments of ``SSLViews``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = tuple(value) if isinstance(value, list) else value
        return out


@dataclass
class ImageDataConfig:
    """An image dataset for self-supervised training and its linear probe.

    Attributes:
        name: ``cifar10``, ``stl10``, ``tiny-imagenet``, ``imagenet`` or ``folder``.
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
        views: the augmentations of the SSL views (:class:`ImageViewsConfig`; default: the
            paper's).

    How the probe trains (epochs, augmentation, per-block probes, pooling grid) is set in the
    ``probe`` section (:class:`ProbeConfig`); the data section says which images it sees.
    """

    #: keys of other sections that only image runs read, with their defaults
    run_keys: ClassVar[dict[str, dict[str, Any]]] = {
        "net": {"width_mult": 1.0, "channels_last": True},
        "probe": {"lr": 1e-3, "epochs": 0, "augment": False, "per_block": False,
                  "batch_size": 256, "grid": None, "curve_train": 5000, "curve_test": 1000,
                  "curve_k": 20, "blocks": None, "standardize": "feature", "dropout": 0.0,
                  "schedule": "none", "init": "zero", "init_scale": 0.11048543456039805},
    }

    name: Literal[IMAGE_DATASETS] = "cifar10"  # type: ignore[valid-type]
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
    views: ImageViewsConfig = field(default_factory=ImageViewsConfig)

    def streams(self) -> bool:
        """Whether the images are decoded batch by batch (``streaming``, default per dataset)."""
        if self.streaming is None:
            return DATASETS[self.name].streaming == "always"
        return bool(self.streaming)

    def validate(self) -> None:
        for key in ("subset", "probe_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ValueError(f"data.{key}={value} is invalid: must be >= 2 (or null: all)")
        info = DATASETS[self.name]
        if self.download and info.download is None:
            raise ValueError(
                f"data.download=true is invalid for data.name={self.name} (no public download)"
            )
        if self.streams() and info.streaming == "never":
            raise ValueError(f"data.streaming=true is invalid for data.name={self.name}; valid: "
                             f"{', '.join(STREAM_DATASETS)}")
        if info.streaming == "always" and not self.streams():
            raise ValueError(f"data.streaming=false is invalid for data.name={self.name} (too "
                             "large for memory)")
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


#: ``data.name`` -> the class of its data section (the one list of data configs; the task of
#: each name is in :mod:`locallearn.experiments.tasks`).
DATA_CONFIGS: dict[str, type] = {
    "rhm": RHMDataConfig, **{name: ImageDataConfig for name in IMAGE_DATASETS}
}


@dataclass
class NetConfig:
    """The network. Keys that only one kind of data reads are ``None`` until the config is built
    (then they hold that data's default); given for another kind of data, they are an error.

    Attributes:
        width: RHM: channels of every block (one number or one per block; default 256).
        width_mult: images: multiplier of the paper's widths (default 1).
        channels_last: images: channels-last layout, faster convolutions (default true).
    """

    width: int | list[int] | None = None
    bias: bool = False
    seed: int | None = None  # initial weights; None: the run's seed
    kind: str = "hier-cnn"
    width_mult: float | None = None
    channels_last: bool | None = None


@dataclass
class RuleConfig:
    """The learning rule and its options: ``options`` are checked against the rule's typed
    ``Options`` dataclass (:attr:`locallearn.rules.base.Rule.Options`), the one place of every
    setting a rule reads, and hold all of them once the config is built (defaults included).
    Keys of earlier versions (``rule.loss``, ``view``, ``f``, ``negatives``, ``temperature`` and
    ``rule.options.negatives``) are translated (:func:`translate_rule_keys`).
    """

    name: str = "backprop"
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from locallearn.rules import check_rule_config

        check_rule_config(self)


@dataclass
class OptimConfig:
    """Optimiser and schedule (see :mod:`locallearn.optim`).

    ``schedule=cosine``: per optimiser step, a linear warm-up over ``warmup_epochs`` epochs, then
    a cosine decay to zero at the last step. ``lars``: SGD momentum wrapped in LARS with
    ``trust_coefficient``; biases and norm parameters are left out of the trust ratio and decay.
    """

    name: Literal["adam", "adamw", "sgd", "lars"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["none", "cosine", "exponential"] = "none"
    warmup_epochs: float = 0.0
    trust_coefficient: float | None = None  # LARS only; None: 0.001
    fused: bool = False  # one fused kernel for all parameters (same update, faster)
    #: per block of the network: its learning rate and weight decay (``None``: ``lr``,
    #: ``weight_decay`` for all)
    block_lr: list[float] | None = None
    block_weight_decay: list[float] | None = None
    #: ``schedule=exponential``: per block, the factor and the steps between decays
    gamma: list[float] | None = None
    period: list[int] | None = None

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} is invalid: must be > 0")
        if self.block_lr is not None and not all(v > 0 for v in self.block_lr):
            raise ValueError(f"optim.block_lr={self.block_lr} is invalid: rates must be > 0")
        if self.block_weight_decay is not None and not all(v >= 0
                                                           for v in self.block_weight_decay):
            raise ValueError(f"optim.block_weight_decay={self.block_weight_decay} is invalid: "
                             "must be >= 0")
        for key in ("gamma", "period"):
            value = getattr(self, key)
            if value is not None and self.schedule != "exponential":
                raise ValueError(f"optim.{key} needs optim.schedule=exponential")
            if value is not None and not all(v > 0 for v in value):
                raise ValueError(f"optim.{key}={value} is invalid: must be > 0")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs={self.warmup_epochs} is invalid: must be >= 0")
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError(
                f"optim.warmup_epochs={self.warmup_epochs} needs optim.schedule=cosine"
            )
        if self.trust_coefficient is not None and self.name != "lars":
            raise ValueError(
                f"optim.trust_coefficient applies to optim.name=lars only (got {self.name!r})"
            )
        if self.trust_coefficient is not None and not self.trust_coefficient > 0:
            raise ValueError(
                f"optim.trust_coefficient={self.trust_coefficient} is invalid: must be > 0"
            )


@dataclass
class ProbeConfig:
    """Linear read-out fitted on frozen features (rules whose encoder never sees labels).

    Attributes:
        steps: L-BFGS iterations of a full-batch probe.
        weight_decay: of the probe's optimiser.
        lr: image probes: learning rate of minibatch Adam (default 1e-3).
        epochs: image probes: epochs of minibatch Adam; 0 (default): full-batch L-BFGS.
        augment: image probes: ``true`` trains on padded random crops and flips (the CLAPP
            paper's protocol; features are recomputed every epoch) instead of fixed clean
            features; ``flip``: on images flipped at random (probability 0.5), the features of
            both versions computed once (the SCFF paper's probe).
        per_block: image probes: also probe every block on its own.
        batch_size: image probes: minibatch size (default 256).
        grid: image probes: cells per side of each block's pooling grid (default: the paper's
            8-4-4-4-2-2, as the losses).
        curve_train, curve_test: image runs with ``probe_every``: sizes of the fixed labelled
            subsets (of the probe's training and test splits) that the probe during training
            reads (default 5000 and 1000). They are decoded once and kept on the device, also
            for streamed data (6,000 images of 224 px: about 0.9 GB of ``uint8``).
        curve_k: neighbours of that probe (a weighted k-NN read-out, :mod:`locallearn.eval.knn`;
            default 20).
        blocks: image probes: the blocks the probe reads, numbered from 1 (default: all).
        standardize: image probes: ``feature`` (default: each feature by its mean and deviation
            over the training images), ``sample`` (each image's features of each block by their
            own mean and unbiased deviation: the SCFF paper's probe) or ``none`` (the SoftHebb
            paper's).
        dropout: image probes: dropout on the features while the probe trains (default 0).
        schedule: image probes: ``none`` (default) or ``halving`` (the rate halves after 20, 35,
            50, 60, 70, 80 and 90 % of the epochs: the SoftHebb and SCFF papers' probes).
        init: image probes: the linear layer starts at ``zero`` (default), ``uniform``
            (weights ``init_scale * U(0, 1)``, biases ``U(-1/sqrt(D), 1/sqrt(D))``: the SoftHebb
            paper's read-out, whose scale is the default ``init_scale``) or ``default`` (weights
            and biases ``U(-1/sqrt(D), 1/sqrt(D))``: a linear layer's own, the SCFF paper's).

    The image-only keys are ``None`` until the config is built (see :class:`NetConfig`); RHM
    runs read ``steps`` and ``weight_decay`` (the read-out of label-free rules).
    """

    steps: int = 100
    weight_decay: float = 1e-4
    lr: float | None = None
    epochs: int | None = None
    augment: bool | Literal["flip"] | None = None
    per_block: bool | None = None
    batch_size: int | None = None
    grid: list[int] | None = None
    curve_train: int | None = None
    curve_test: int | None = None
    curve_k: int | None = None
    blocks: list[int] | None = None
    standardize: Literal["feature", "sample", "none"] | None = None
    dropout: float | None = None
    schedule: Literal["none", "halving"] | None = None
    init: Literal["zero", "uniform", "default"] | None = None
    init_scale: float | None = None

    def validate(self) -> None:
        if self.blocks is not None and (not self.blocks or any(b < 1 for b in self.blocks)
                                        or len(set(self.blocks)) != len(self.blocks)):
            raise ValueError(f"probe.blocks={self.blocks} is invalid: give distinct block "
                             "numbers from 1 (or null: all)")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"probe.dropout={self.dropout} is invalid: must lie in [0, 1)")
        for key in ("curve_train", "curve_test", "curve_k"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"probe.{key}={value} is invalid: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"probe.batch_size={self.batch_size} is invalid: must be >= 1")
        if self.grid is not None and any(g < 1 for g in self.grid):
            raise ValueError(f"probe.grid={self.grid} is invalid: cells must be >= 1")


@dataclass
class LayerwiseConfig:
    """A layer-wise schedule: each block trains for its own number of epochs.

    Attributes:
        epochs: epochs of each block (``None``: every block trains for the whole run).
        mode: ``greedy``: block 1 trains first, then block 2 with block 1 frozen, and so on
            (each block's epochs follow the ones below); ``together``: every block trains from
            the first epoch for its own number of epochs, then is frozen (the counts must not
            decrease from block to block).

    The run's ``epochs`` must be at least the schedule's length (the sum in ``greedy`` mode,
    the last block's count in ``together`` mode), or 0 (the
    untrained network); beyond the schedule the last block trains on, so a finished run
    extended with more ``epochs`` trains its last block longer, as a run started with that many
    epochs would. The rule must learn block by block (as for ``parallel.stages``); the frozen
    blocks below the trained ones only pass their output up.
    """

    epochs: list[int] | None = None
    mode: Literal["greedy", "together"] = "greedy"

    def validate(self) -> None:
        if self.epochs is not None and (not self.epochs or any(e < 1 for e in self.epochs)):
            raise ValueError(f"layerwise.epochs={self.epochs} is invalid: give one count >= 1 "
                             "per block (or null: every block trains the whole run)")
        if self.epochs is not None and self.mode == "together" and (
                self.epochs != sorted(self.epochs)):
            raise ValueError(f"layerwise.epochs={self.epochs} is invalid with layerwise.mode="
                             "together: the counts must not decrease from block to block (a "
                             "frozen block may not sit below one that trains)")

    def length(self) -> int:
        """The schedule's length in epochs (0: no schedule)."""
        if self.epochs is None:
            return 0
        return sum(self.epochs) if self.mode == "greedy" else max(self.epochs)

    def windows(self) -> list[tuple[int, float]]:
        """``(first epoch, end epoch)`` of each block's training; the last block's has no end."""
        assert self.epochs is not None
        out: list[tuple[int, float]] = []
        start = 0
        for e in self.epochs:
            out.append((start, start + e) if self.mode == "greedy" else (0, e))
            start += e if self.mode == "greedy" else 0
        out[-1] = (out[-1][0], float("inf"))
        return out


@dataclass
class ParallelConfig:
    """Blocks on separate processes, pipelined (:mod:`locallearn.parallel`).

    Attributes:
        stages: processes that each train a contiguous group of blocks (1: one process); launch
            with ``torchrun --nproc_per_node=<stages>``.
        split: blocks per stage, in order (must add up to the network's blocks); ``None``:
            balanced from measured per-block step times.
        timeout: seconds a process of a multi-process run (pipelined or data-parallel) waits for
            another before it stops with one line naming the wait (a frozen or dead peer);
            raise it when one rank works alone for longer (rank 0's evaluations of large data).
        feedback_delay: batches by which a signal from the top (CLAPP++DFB's top context, the
            DFA family's output error) reaches the blocks: each block applies its update for a
            batch ``feedback_delay`` batches after that batch passed it, on the input it kept,
            with the weights it has then (:mod:`locallearn.delay`). 0: the signal of the same
            step (no pipeline for these rules). It changes the result, so unlike the other
            ``parallel`` keys it is part of a run's identity.
    """

    stages: int = 1
    split: list[int] | None = None
    timeout: float = 600.0
    feedback_delay: int = 0

    def validate(self) -> None:
        if self.stages < 1:
            raise ValueError(f"parallel.stages={self.stages} is invalid: must be >= 1")
        if self.feedback_delay < 0:
            raise ValueError(f"parallel.feedback_delay={self.feedback_delay} is invalid: must "
                             "be a number of batches >= 0")
        if not 0 < self.timeout < float("inf"):
            raise ValueError(f"parallel.timeout={self.timeout} is invalid: must be a number of "
                             "seconds > 0")
        if self.split is not None:
            if len(self.split) != self.stages:
                raise ValueError(
                    f"parallel.split={self.split} lists {len(self.split)} stages but "
                    f"parallel.stages={self.stages}; give one block count per stage"
                )
            if any(k < 1 for k in self.split):
                raise ValueError(
                    f"parallel.split={self.split} is invalid: every stage needs >= 1 block"
                )


@dataclass
class LogConfig:
    """Where a run's scalars go besides ``metrics.jsonl`` (:mod:`locallearn.tracking`).

    Attributes:
        tensorboard: event files in ``OUT/tensorboard/`` (``tensorboard --logdir OUT``).
        wandb: a Weights & Biases project name (``None``: off); ``WANDB_MODE=offline`` keeps
            the run on the machine.
    """

    tensorboard: bool = False
    wandb: str | None = None

    def validate(self) -> None:
        if self.wandb is not None and not str(self.wandb).strip():
            raise ValueError("log.wandb='' is invalid: give a project name (or null: off)")

    def trackers(self) -> list[str]:
        """The trackers this section turns on."""
        return [name for name, on in (("tensorboard", self.tensorboard),
                                      ("wandb", self.wandb is not None)) if on]


@dataclass
class RunConfig:
    """Everything one run needs; the output directory holds a copy."""

    data: Any = field(default_factory=RHMDataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    seed: int = 0
    epochs: int = 60
    batch_size: int = 128
    stop_train_loss: float | None = None
    #: a budget of training seconds (probes excluded): the run ends at the end of the first epoch
    #: at which its training time reaches it (the equal-wall-time tables); ``None``: no budget
    max_seconds: float | None = None
    #: stop with an error when a batch's loss exceeds this multiple of the run's first batch
    #: loss (a diverging run); ``None`` trains on whatever the loss does
    stop_loss_factor: float | None = 100.0
    eval_every: int = 1
    probe_every: float = 0.0  # epochs between probes during training (fractions too; 0: never)
    align_every: int = 0  # log per-block gradient alignment every N epochs (0: never)
    align_batches: int = 4
    checkpoint_every: int = 5
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast of the rule's step and probes
    compile: bool = False  # torch.compile every block of the network (same results, faster)
    threads: int = 0  # CPU threads of torch (0: torch's default); 1 is fastest on a busy machine
    progress: bool = True
    label: str | None = None  # shown in progress bars, summaries and plots (default: rule.name)
    #: follow the run live in TensorBoard and/or W&B (:mod:`locallearn.tracking`)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        for key in ("epochs", "seed", "align_every", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: must be >= 0")
        for key in ("batch_size", "eval_every", "checkpoint_every", "align_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: must be >= 1")
        if not (self.probe_every >= 0 and self.probe_every < float("inf")):
            raise ValueError(
                f"probe_every={self.probe_every} is invalid: must be a number of epochs >= 0 "
                "(fractions allowed; 0: never)"
            )
        if self.device != "cpu" and not self.device.startswith(("cuda", "mps", "auto")):
            raise ValueError(f"device={self.device!r} is invalid; valid: cpu, cuda[:N], auto")
        if self.layerwise.length() > self.epochs > 0:  # epochs=0: the untrained network
            raise ValueError(
                f"epochs={self.epochs} is shorter than the layer-wise schedule "
                f"(layerwise.epochs={self.layerwise.epochs}, mode {self.layerwise.mode}: "
                f"{self.layerwise.length()} epochs); give epochs >= {self.layerwise.length()}"
            )
        if self.max_seconds is not None and not 0 < self.max_seconds < float("inf"):
            raise ValueError(
                f"max_seconds={self.max_seconds} is invalid: must be a number of seconds > 0 "
                "(or null: no budget)"
            )
        if self.stop_loss_factor is not None and not self.stop_loss_factor > 1:
            raise ValueError(
                f"stop_loss_factor={self.stop_loss_factor} is invalid: must be > 1 (or null: off)"
            )


#: The image probe's protocol settings beyond the CLAPP paper's, with the value that leaves
#: them off (the full-batch probe and the streamed probe read none of them).
PROBE_PROTOCOL_OFF = {"blocks": None, "standardize": "feature", "dropout": 0.0,
                      "schedule": "none", "init": "zero"}


def check_probe_protocol(cfg: RunConfig) -> None:
    """One-line ValueError for probe settings the chosen probe would not apply: the protocol
    settings of the minibatch probe (``probe.standardize``, ``dropout``, ``schedule``,
    ``init``, ``augment=flip``; ``blocks`` too on streamed data) with the full-batch probe
    (``probe.epochs=0``) or on streamed data."""
    p, d = cfg.probe, cfg.data
    streamed = d.streams()
    off = {k: v for k, v in PROBE_PROTOCOL_OFF.items() if not (k == "blocks" and not streamed)}
    given = [k for k, v in off.items() if getattr(p, k) != v]
    if p.augment == "flip":
        given.append("augment")
    if not given:
        return
    if streamed:
        raise ValueError(f"probe.{given[0]}={getattr(p, given[0])!r} does not apply to streamed "
                         "data (its probe reads every block, standardised, without these "
                         f"settings); remove it")
    if p.epochs == 0:
        raise ValueError(f"probe.{given[0]}={getattr(p, given[0])!r} applies to the minibatch "
                         "probe only; give probe.epochs > 0 (probe.epochs=0 fits a full-batch "
                         "probe on standardised clean features)")


#: keys of the rule section of earlier versions -> their place in ``rule.options`` today
LEGACY_RULE_KEYS = {"loss": "loss", "view": "view", "f": "f", "negatives": "negative_image",
                    "temperature": "temperature"}


def translate_rule_keys(raw: dict[str, Any]) -> list[str]:
    """Move the rule keys of earlier versions into ``rule.options``, in place: ``rule.loss``,
    ``view``, ``f``, ``temperature`` keep their names, ``rule.negatives`` (which image is the
    negative) becomes ``negative_image`` and ``rule.options.negatives`` (which view of it)
    ``negative_view``. A value the config also gives under the new name is kept. Returns the
    new names of the keys that moved."""
    rule = raw.get("rule")
    if not isinstance(rule, dict):
        return []
    options = rule.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return []
    moved = []
    if "negatives" in options:
        value = options.pop("negatives")
        if value is not None:
            options.setdefault("negative_view", value)
            moved.append("negative_view")
    for old, new in LEGACY_RULE_KEYS.items():
        if old in rule:
            value = rule.pop(old)
            if value is not None:
                options.setdefault(new, value)
                moved.append(new)
    rule["options"] = options
    return moved


def build_config(raw: dict[str, Any]) -> RunConfig:
    """A checked :class:`RunConfig` from a mapping (the data section by its ``name``).

    Keys that only another kind of data reads (``net.channels_last`` on an RHM run) are errors;
    those this data reads get its defaults when unset. Rule keys of earlier versions are
    translated (:func:`translate_rule_keys`).
    """
    raw = dict(raw)
    if isinstance(raw.get("rule"), dict):
        raw["rule"] = {**raw["rule"], "options": dict(raw["rule"].get("options") or {})}
        translate_rule_keys(raw)
    data = raw.pop("data", None) or {}
    if not isinstance(data, dict):
        raise ValueError(f"data must be a mapping, got {data!r}")
    name = data.get("name", "rhm")
    if name not in DATA_CONFIGS:
        raise ValueError(f"data.name={name!r} is unknown; valid: {', '.join(DATA_CONFIGS)}")
    cfg = from_dict(RunConfig, raw)
    cfg.data = from_dict(DATA_CONFIGS[name], data, "data.")
    _apply_run_keys(cfg)
    if isinstance(cfg.data, ImageDataConfig):
        check_probe_protocol(cfg)
    return cfg


def _foreign_keys(data_cls: type) -> dict[str, dict[str, list[str]]]:
    """``section -> key -> data names that read it``, for keys that ``data_cls`` does not read."""
    own = data_cls.run_keys
    out: dict[str, dict[str, list[str]]] = {}
    for data_name, cls in DATA_CONFIGS.items():
        for section, keys in cls.run_keys.items():
            for key in keys:
                if key not in own.get(section, {}):
                    out.setdefault(section, {}).setdefault(key, []).append(data_name)
    return out


def _apply_run_keys(cfg: RunConfig) -> None:
    data_cls = type(cfg.data)
    for section, keys in _foreign_keys(data_cls).items():
        for key, owners in keys.items():
            value = getattr(getattr(cfg, section), key)
            if value is not None:
                raise ValueError(
                    f"{section}.{key}={value!r} does not apply to data.name={cfg.data.name} "
                    f"(only {', '.join(owners)} read it); remove it"
                )
    for section, keys in data_cls.run_keys.items():
        sec = getattr(cfg, section)
        for key, default in keys.items():
            if getattr(sec, key) is None:
                setattr(sec, key, default)


#: Probe settings that image runs kept in the data section before they moved to ``probe``.
LEGACY_PROBE_KEYS = {"probe_augment": "augment", "probe_per_block": "per_block",
                     "probe_batch_size": "batch_size", "probe_grid": "grid"}


#: config keys that change how a run is shown or scheduled, never its result
#: (``parallel`` too: a pipelined run ends bit-identical to a one-process run, and its
#: checkpoint has the one-process layout, so it may resume with another split or in one
#: process)
#: (``compile`` too: compiled blocks give the same results)
RUNTIME_KEYS = ("progress", "threads", "device", "label", "parallel", "compile", "log")

#: keys inside a runtime section that do change the result (``parallel.feedback_delay``)
RESULT_SUBKEYS = {"parallel": ("feedback_delay",)}


def without_runtime_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A config mapping without :data:`RUNTIME_KEYS` (what two configs of one run may differ
    in), keeping their :data:`RESULT_SUBKEYS`."""
    out = {k: v for k, v in raw.items() if k not in RUNTIME_KEYS}
    for section, keys in RESULT_SUBKEYS.items():
        kept = {k: v for k, v in (raw.get(section) or {}).items() if k in keys}
        if kept:
            out[section] = kept
    return out


def migrate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring the config a run saved (``config.yaml``) to today's layout, in place; returns it.

    Runs saved by earlier versions wrote every key: the keys that do not apply to their data or
    rule (read by nothing then) are dropped, and image runs' probe settings move from the data
    section to ``probe``. A config saved by this version is unchanged.
    """
    data = raw.get("data")
    if isinstance(data, dict) and any(k in data for k in LEGACY_PROBE_KEYS):
        probe = raw.get("probe") or {}
        raw["probe"] = probe
        for old, new in LEGACY_PROBE_KEYS.items():
            if old in data:
                probe.setdefault(new, data.pop(old))
    name = data.get("name", "rhm") if isinstance(data, dict) else "rhm"
    if DATA_CONFIGS.get(name) is ImageDataConfig and isinstance(data, dict):
        # saved before data.views existed: those runs used the paper's views (every key null)
        data.setdefault("views", to_dict(ImageViewsConfig()))
    if name in DATA_CONFIGS:
        for section, keys in _foreign_keys(DATA_CONFIGS[name]).items():
            if isinstance(raw.get(section), dict):
                for key in keys:
                    raw[section].pop(key, None)
    moved = translate_rule_keys(raw)
    rule = raw.get("rule")
    if moved and isinstance(rule, dict):
        from dataclasses import fields

        from locallearn.rules import registered, rule_class

        if rule.get("name", "backprop") in registered():  # defaults written for other rules
            own = {f.name for f in fields(rule_class(rule.get("name", "backprop")).Options)}
            for key in moved:
                if key not in own:
                    rule["options"].pop(key, None)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw = load_yaml(path) if path is not None else {}
    merge_layer(raw, parse_overrides(overrides or []))
    return build_config(raw)


def merge_layer(raw: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Merge a later layer of settings (overrides, a sweep's settings or grid point) into
    ``raw``, each with the rule keys of earlier versions translated first, so that a later
    layer wins whichever spelling each uses."""
    translate_rule_keys(raw)
    translate_rule_keys(layer)
    return deep_merge(raw, layer)
