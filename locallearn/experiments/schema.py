"""The typed config of one run (``locallearn run``).

Sections: ``data`` (chosen by ``data.name``), ``net``, ``rule``, ``optim``, ``probe``, and
top-level training keys. Every preset in ``configs/`` is an instance of :class:`RunConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locallearn.experiments.config import deep_merge, from_dict, load_yaml, parse_overrides

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


#: ``data.name`` -> its config class; the image datasets register theirs.
DATA_CONFIGS: dict[str, type] = {"rhm": RHMDataConfig}


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
    """Optimiser and schedule (see :mod:`locallearn.optim`).

    ``schedule=cosine``: per optimiser step, a linear warm-up over ``warmup_epochs`` epochs, then
    a cosine decay to zero at the last step. ``lars``: SGD momentum wrapped in LARS with
    ``trust_coefficient``; biases and norm parameters are left out of the trust ratio and decay.
    """

    name: Literal["adam", "adamw", "sgd", "lars"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["none", "cosine"] = "none"
    warmup_epochs: float = 0.0
    trust_coefficient: float | None = None  # LARS only; None: 0.001
    fused: bool = False  # one fused kernel for all parameters (same update, faster)

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} is invalid: must be > 0")
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
        _load_data_configs()
    if name not in DATA_CONFIGS:
        raise ValueError(f"data.name={name!r} is unknown; valid: {', '.join(DATA_CONFIGS)}")
    cfg = from_dict(RunConfig, raw)
    cfg.data = from_dict(DATA_CONFIGS[name], data, "data.")
    return cfg


def _load_data_configs() -> None:
    """Import the data modules that register config classes (late: they import this one)."""
    import locallearn.experiments.image_task  # noqa: F401


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw = load_yaml(path) if path is not None else {}
    deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw)
