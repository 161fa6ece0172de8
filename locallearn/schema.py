"""The typed config of one run (``locallearn run``).

Sections: ``data`` (chosen by ``data.name``), ``net``, ``rule``, ``optim``, ``probe``, and
top-level training keys. Every preset in ``configs/`` is an instance of :class:`RunConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locallearn.config import deep_merge, from_dict, load_yaml, parse_overrides

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


IMAGE_DATASETS = ("cifar10", "stl10", "tiny-imagenet", "folder")
#: Default (SSL training split, test split, probe training split) of each dataset.
DEFAULT_SPLITS: dict[str, tuple[str, str, str]] = {
    "cifar10": ("train", "test", "train"),
    "stl10": ("train+unlabeled", "test", "train"),
    "tiny-imagenet": ("train", "val", "train"),
    "folder": ("train", "test", "train"),
}


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

    How the probe trains (epochs, augmentation, per-block probes, pooling grid) is set in the
    ``probe`` section (:class:`ProbeConfig`); the data section says which images it sees.
    """

    name: Literal["cifar10", "stl10", "tiny-imagenet", "folder"] = "cifar10"
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

    def validate(self) -> None:
        for key in ("subset", "probe_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ValueError(f"data.{key}={value} is invalid: must be >= 2 (or null: all)")
        if self.download and self.name == "folder":
            raise ValueError("data.download=true is invalid for data.name=folder (no release)")

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
    """The network. ``width``: channels of every block (one number or one per block)."""

    width: int | list[int] = 256
    bias: bool = False
    seed: int | None = None  # initial weights; None: the run's seed
    kind: str = "hier-cnn"
    width_mult: float = 1.0  # image encoders: multiplier of the paper's widths
    channels_last: bool = True  # image encoders: channels-last layout (faster convolutions)


@dataclass
class RuleConfig:
    """The learning rule and its options (``loss``, ``view``, ``f``... for layer-wise rules)."""

    name: str = "backprop"
    loss: str = "clapp"
    view: str = "synonyms"
    f: str = "hinge"
    negatives: str = "next"
    temperature: float = 0.1
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from locallearn.rules import registered

        if self.name not in registered():
            raise ValueError(
                f"rule.name={self.name!r} is unknown; valid: {', '.join(registered())}"
            )


@dataclass
class OptimConfig:
    """Optimiser and schedule."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["none", "cosine"] = "none"
    fused: bool = False  # one fused kernel for all parameters (same update, faster)

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} is invalid: must be > 0")


@dataclass
class ProbeConfig:
    """Linear read-out fitted on frozen features (rules whose encoder never sees labels).

    Attributes:
        steps: L-BFGS iterations of a full-batch probe.
        weight_decay, lr: of the probe's optimiser.
        epochs: image probes: epochs of minibatch Adam; 0: full-batch L-BFGS.
        augment: image probes: train on padded random crops and flips (the paper's protocol;
            features are recomputed every epoch) instead of fixed clean features.
        per_block: image probes: also probe every block on its own.
        batch_size: image probes: minibatch size.
        grid: image probes: cells per side of each block's pooling grid (default: the paper's
            8-4-4-4-2-2, as the losses).
    """

    steps: int = 100
    weight_decay: float = 1e-4
    lr: float = 1e-3
    epochs: int = 0
    augment: bool = False
    per_block: bool = False
    batch_size: int = 256
    grid: list[int] | None = None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"probe.batch_size={self.batch_size} is invalid: must be >= 1")
        if self.grid is not None and any(g < 1 for g in self.grid):
            raise ValueError(f"probe.grid={self.grid} is invalid: cells must be >= 1")


@dataclass
class RunConfig:
    """Everything one run needs; the output directory holds a copy."""

    data: Any = field(default_factory=RHMDataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    epochs: int = 60
    batch_size: int = 128
    stop_train_loss: float | None = None
    eval_every: int = 1
    align_every: int = 0  # log per-block gradient alignment every N epochs (0: never)
    align_batches: int = 4
    checkpoint_every: int = 5
    device: str = "cpu"
    threads: int = 0  # CPU threads of torch (0: torch's default); 1 is fastest on a busy machine
    progress: bool = True

    def validate(self) -> None:
        for key in ("epochs", "seed", "align_every", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: must be >= 0")
        for key in ("batch_size", "eval_every", "checkpoint_every", "align_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: must be >= 1")
        if self.device != "cpu" and not self.device.startswith(("cuda", "mps", "auto")):
            raise ValueError(f"device={self.device!r} is invalid; valid: cpu, cuda[:N], auto")


def build_config(raw: dict[str, Any]) -> RunConfig:
    """A checked :class:`RunConfig` from a mapping (the data section by its ``name``)."""
    raw = dict(raw)
    data = raw.pop("data", None) or {}
    if not isinstance(data, dict):
        raise ValueError(f"data must be a mapping, got {data!r}")
    name = data.get("name", "rhm")
    if name not in DATA_CONFIGS:
        raise ValueError(f"data.name={name!r} is unknown; valid: {', '.join(DATA_CONFIGS)}")
    cfg = from_dict(RunConfig, raw)
    cfg.data = from_dict(DATA_CONFIGS[name], data, "data.")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw = load_yaml(path) if path is not None else {}
    deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw)
