"""The linear probe of image encoders (the protocol of arXiv 2601.21683).

The encoder is frozen. Every block's output is average-pooled onto its grid (the paper's 8, 4, 4,
4, 2, 2 cells per side for VGG-6: pool sizes 4-4-4-2-2-1 on CIFAR-10), flattened, and the six
blocks concatenated (32,768 values per image at full width). Features are standardised with the
mean and standard deviation of the clean (un-augmented) training features, a fixed affine map, so
the probe stays linear in the features. One linear layer (initialised at zero) is trained with
Adam on the cross-entropy for ``epochs`` epochs of minibatches; the test accuracy of the final
layer is reported: the test set never selects an epoch or a checkpoint.

Two modes:

* without augmentation the features are computed once (fast; the CPU presets);
* with augmentation (``augment``, e.g. :class:`locallearn.data.augment.ProbeAugment`: padded random
  crop and flip, as in the paper) every training minibatch is augmented and encoded anew.

With ``epochs = 0`` the probe is fitted by full-batch L-BFGS instead
(:func:`locallearn.eval.probe.fit_linear_probe`, ``steps`` iterations), on clean features.

Per-block probes (one linear layer on each block's pooled features) are trained in the same loop
as the concatenated probe: their parameters and losses are separate, so with Adam this is exactly
a separate training of each, on the same minibatches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from locallearn.eval.probe import fit_linear_probe
from locallearn.nets.base import BlockNet
from locallearn.nets.vgg import feature_shapes, pool_sizes_for_grid, probe_grid
from locallearn.rules.image_grid import pool_flat

__all__ = ["ProbeLayout", "ProbeResult", "ProbeSettings", "encoder_features", "probe_layout",
           "probe_pools", "run_probe", "silent_fractions"]

Transform = Callable[[torch.Tensor], torch.Tensor]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class ProbeSettings:
    """How the probe is trained.

    Attributes:
        epochs: epochs of minibatch Adam; 0: full-batch L-BFGS on clean features.
        lr: Adam learning rate.
        weight_decay: L2 penalty (Adam's ``weight_decay``; for L-BFGS, the penalty weight).
        steps: L-BFGS iterations (``epochs = 0`` only).
        batch_size: minibatch size.
        per_block: also probe each block alone.
        grid: cells per side of each block's pooling grid (default: the paper's).
        seed: seed of the minibatch order and the augmentation.
        feature_batch: images per forward pass when computing features.
        bf16: compute the encoder's features under bf16 autocast (the linear layer stays in
            float32).
        blocks: the blocks whose features the probe reads (0-based; ``None``: all).
        standardize: ``feature`` (each feature by its mean and deviation over the clean
            training features), ``sample`` (each image's features of each block by their own
            mean and unbiased deviation, plus 1e-10) or ``none``.
        dropout: dropout on the features while the probe trains.
        schedule: ``none``, or ``halving``: the rate halves after 20, 35, 50, 60, 70, 80 and
            90 % of the epochs.
        flip: train on features of images flipped at random (probability 0.5), both versions
            computed once (without the crop+flip ``augment``).
        init: the linear layer starts at ``zero``, ``uniform`` (weights ``init_scale * U(0,
            1)``, biases ``U(-1/sqrt(D), 1/sqrt(D))``) or ``default`` (weights and biases
            ``U(-1/sqrt(D), 1/sqrt(D))``, a linear layer's own).
        init_scale: see ``init``.
    """

    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 100
    batch_size: int = 256
    per_block: bool = False
    grid: tuple[int, ...] | None = None
    seed: int = 0
    feature_batch: int = 512
    bf16: bool = False
    blocks: tuple[int, ...] | None = None
    standardize: str = "feature"
    dropout: float = 0.0
    schedule: str = "none"
    flip: bool = False
    init: str = "zero"
    init_scale: float = 0.11048543456039805

    def describe(self) -> str:
        """The options beyond Adam's rate, decay, epochs and batch, in words (for the protocol
        string)."""
        parts = []
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        if self.schedule == "halving":
            parts.append("rate halved at 20/35/50/60/70/80/90 % of the epochs")
        if self.init != "zero":
            parts.append(f"{self.init} init (scale {self.init_scale:g})")
        return ", ".join(parts)


#: Share of the epochs after which ``schedule=halving`` halves the probe's rate.
HALVING_POINTS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class ProbeResult:
    """Accuracies of the probe (fractions in [0, 1]) and how they were obtained."""

    accuracy: float
    train_accuracy: float
    protocol: str
    block_accuracies: list[float] | None
    feature_dims: list[int]
    pools: list[int]
    n_train: int
    n_test: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: per block, the share of its pooled features that are zero on every probe-training image
    #: (units that never fire there: dead ReLUs give the probe nothing)
    silent_fractions: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)


def silent_fractions(energy: torch.Tensor, slices: list[slice]) -> list[float]:
    """Per block, the share of features whose ``energy`` (any non-negative per-feature sum or
    maximum of magnitudes over the probe-training images) is zero."""
    return [round(float((energy[sl] == 0).float().mean()), 6) for sl in slices]


@dataclass(frozen=True)
class ProbeLayout:
    """How the probe reads a network: per block, the pool size, the grid's cells per side and
    the block's columns of the concatenated features."""

    pools: list[int]
    cells: list[int]
    slices: list[slice]


def probe_layout(net: BlockNet, side: int, grid: tuple[int, ...] | None = None) -> ProbeLayout:
    """The probe's layout for square inputs of side ``side`` (default grid: the paper's), from
    one forward pass of a blank image."""
    shapes = feature_shapes(net, side)
    sides = [s for _, s in shapes]
    pools = pool_sizes_for_grid(sides, grid if grid is not None else probe_grid(len(sides)))
    cells = [s // p for s, p in zip(sides, pools)]
    slices, start = [], 0
    for (channels, _), n in zip(shapes, cells):
        slices.append(slice(start, start + channels * n * n))
        start += channels * n * n
    return ProbeLayout(pools, cells, slices)


def probe_pools(net: BlockNet, side: int, grid: tuple[int, ...] | None = None) -> list[int]:
    """Pool size of every block for square inputs of side ``side`` (default grid: the paper's)."""
    return probe_layout(net, side, grid).pools


@torch.no_grad()
def encoder_features(
    net: BlockNet,
    images: torch.Tensor,
    transform: Transform,
    pools: list[int],
    batch_size: int = 512,
    blocks: tuple[int, ...] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Concatenated pooled features ``(N, D)`` of ``transform(images)``, in chunks, no gradients
    (of the ``blocks`` listed, 0-based; ``None``: all; ``flip``: of the images flipped
    horizontally, chunk by chunk).

    Written chunk by chunk into one tensor: the peak is the features and one chunk (at full
    width, CIFAR-10's 50,000 training images have 6.1 GiB of features)."""
    n = images.shape[0]
    out: torch.Tensor | None = None
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        x = transform(chunk.flip(-1) if flip else chunk)
        feats = block_features(net, x, pools, blocks)
        if out is None:
            out = feats.new_empty((n, feats.shape[1]))
        out[start : start + feats.shape[0]] = feats
    return out if out is not None else images.new_zeros((0, 0), dtype=torch.float32)


def block_features(net: BlockNet, x: torch.Tensor, pools: list[int],
                   blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """The pooled, flattened features of ``blocks`` (0-based; ``None``: all) for the input
    batch ``x``, concatenated (float32)."""
    upto = len(pools) if blocks is None else max(blocks) + 1
    outs = net.features(x, upto=upto)
    keep = range(len(outs)) if blocks is None else blocks
    return torch.cat([pool_flat(outs[k], pools[k]).float() for k in keep], 1)


def standardize_samples(feats: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """In place: each row's values of each block (``slices``) minus their mean, divided by
    1e-10 plus their unbiased standard deviation."""
    for sl in slices:
        part = feats[:, sl]
        mean = part.mean(1, keepdim=True)
        std = part.std(1, keepdim=True)
        part.sub_(mean).div_(std.add_(1e-10))
    return feats


def keep_mask(shape: torch.Size, keep_p: float, generator: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """A dropout mask: each entry kept with probability ``keep_p`` rounded to a multiple of
    1/65536, from 16 random bits per entry (a quarter of a 64-bit draw: drawing one number per
    entry is several times slower on a CPU, and the probe draws a mask per minibatch)."""
    n = math.prod(shape)
    if round(keep_p * 65536) >= 65536:
        return torch.ones(shape, dtype=torch.bool, device=device)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2 ** 63, None, generator=generator)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over -32768..32767
    return bits < round(keep_p * 65536) - 32768


def _linear_layers(groups: list[slice], n_classes: int, device: torch.device,
                   settings: ProbeSettings, gen: torch.Generator) -> list[torch.Tensor]:
    """Weights and biases of one linear layer per group of features (``settings.init``)."""
    params = []
    for sl in groups:
        d = sl.stop - sl.start
        w = torch.zeros(n_classes, d)
        b = torch.zeros(n_classes)
        if settings.init == "uniform":
            w = settings.init_scale * torch.rand(n_classes, d, generator=gen)
            b = (torch.rand(n_classes, generator=gen) * 2 - 1) / d ** 0.5
        elif settings.init == "default":  # a linear layer's own: U(-1/sqrt(D), 1/sqrt(D))
            w = (torch.rand(n_classes, d, generator=gen) * 2 - 1) / d ** 0.5
            b = (torch.rand(n_classes, generator=gen) * 2 - 1) / d ** 0.5
        params.append(w.to(device).requires_grad_())
        params.append(b.to(device).requires_grad_())
    return params


def _check_labels(labels: torch.Tensor, n_classes: int, what: str) -> None:
    if labels.numel() == 0:
        raise ValueError(f"probe: the {what} split has no images")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(
            f"probe: the {what} split has images without a label in 0..{n_classes - 1}"
        )


def run_probe(
    net: BlockNet,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    transform: Transform,
    settings: ProbeSettings,
    augment: Augment | None = None,
    progress: bool = False,
    description: str = "",
) -> ProbeResult:
    """Fit the linear probe on the frozen ``net`` and measure its test accuracy.

    Args:
        net: the encoder (left in eval mode, unchanged).
        train_images, test_images: ``uint8`` batches ``(N, 3, S, S)`` on the encoder's device.
        train_labels, test_labels: ``int64`` labels in ``0 .. n_classes - 1``.
        n_classes: number of classes.
        transform: clean preprocessing (normalisation) of a ``uint8`` batch.
        settings: the probe's hyper-parameters.
        augment: training-time augmentation ``augment(images, generator) -> normalised batch``,
            or ``None`` to compute the training features once.
        progress: show a progress bar over epochs.
        description: words naming the data, appended to the protocol string.
    """
    t0 = time.perf_counter()
    _check_labels(train_labels, n_classes, "probe training")
    _check_labels(test_labels, n_classes, "test")
    if settings.epochs < 0 or settings.batch_size < 1:
        raise ValueError("probe: epochs must be >= 0 and batch_size >= 1")
    net.eval()
    plan = _FeaturePlan.of(net, int(train_images.shape[-1]), settings)
    autocast = torch.autocast(train_images.device.type, dtype=torch.bfloat16,
                              enabled=settings.bf16)

    use_flip = settings.flip and augment is None and settings.epochs > 0
    clean, test, flipped, silent = _cached_features(net, plan, train_images, test_images,
                                                    transform, settings, autocast, use_flip)
    cached = (clean, test) + ((flipped,) if flipped is not None else ())
    feature_seconds = time.perf_counter() - t0
    groups = [slice(0, clean.shape[1])] + (plan.slices if settings.per_block else [])
    if settings.epochs == 0:
        logits_of, how = _fit_full_batch(clean, train_labels, n_classes, groups, settings)
    else:
        logits_of, how = _fit_minibatch(
            net, plan, clean, flipped, cached, train_images, train_labels, n_classes, groups,
            settings, augment, autocast, progress)

    with torch.no_grad():
        accs = [float((logits_of(test, k).argmax(1) == test_labels).float().mean())
                for k in range(len(groups))]
        train_acc = float((logits_of(clean, 0).argmax(1) == train_labels).float().mean())
    protocol = (f"{plan.describe(settings)}, {how}; {clean.shape[0]} training and "
                f"{test.shape[0]} test images{'; ' + description if description else ''}")
    return ProbeResult(
        accuracy=accs[0],
        train_accuracy=train_acc,
        protocol=protocol,
        block_accuracies=accs[1:] if settings.per_block else None,
        feature_dims=plan.dims,
        pools=[plan.pools[k] for k in plan.keep],
        n_train=int(clean.shape[0]),
        n_test=int(test.shape[0]),
        seconds=round(time.perf_counter() - t0, 3),
        silent_fractions=silent,
        extra={"blocks": [k + 1 for k in plan.keep], "n_blocks": len(plan.layout.pools),
               "feature_seconds": round(feature_seconds, 3),
               "fit_seconds": round(time.perf_counter() - t0 - feature_seconds, 3)},
    )


def _cached_features(
    net: BlockNet, plan: _FeaturePlan, train_images: torch.Tensor, test_images: torch.Tensor,
    transform: Transform, settings: ProbeSettings, autocast: Any, flip: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[float]]:
    """The clean training and test features (and the flipped training images' with ``flip``),
    standardised per image where asked, and each block's share of silent units."""
    def features(images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        with autocast:
            return encoder_features(net, images, transform, plan.pools, settings.feature_batch,
                                    plan.keep, flip)

    clean = features(train_images)
    # the largest |feature| per column without a temporary of the features' size (before any
    # standardisation: a unit that never fires is zero there)
    silent = silent_fractions(torch.maximum(clean.amax(0), clean.amin(0).neg()), plan.slices)
    test = features(test_images)
    flipped = features(train_images, flip=True) if flip else None
    if settings.standardize == "sample":
        for t in (clean, test) + ((flipped,) if flipped is not None else ()):
            standardize_samples(t, plan.slices)
    return clean, test, flipped, silent


@dataclass
class _FeaturePlan:
    """Which blocks the probe reads and where each one's features sit in the concatenation."""

    layout: Any
    keep: tuple[int, ...]
    pools: list[int]
    dims: list[int]
    slices: list[slice]

    @classmethod
    def of(cls, net: BlockNet, side: int, settings: ProbeSettings) -> _FeaturePlan:
        layout = probe_layout(net, side, settings.grid)
        keep = tuple(range(len(layout.pools))) if settings.blocks is None else settings.blocks
        if any(not 0 <= k < len(layout.pools) for k in keep):
            raise ValueError(f"probe.blocks={[k + 1 for k in keep]} is invalid for a network "
                             f"of {len(layout.pools)} blocks; valid: 1..{len(layout.pools)}")
        dims = [layout.slices[k].stop - layout.slices[k].start for k in keep]
        slices, at = [], 0
        for d in dims:
            slices.append(slice(at, at + d))
            at += d
        return cls(layout, keep, list(layout.pools), dims, slices)

    def describe(self, settings: ProbeSettings) -> str:
        """The features' half of the protocol string."""
        grid = [self.layout.cells[k] for k in self.keep]
        names = ("blocks " + ", ".join(str(k + 1) for k in self.keep)
                 if settings.blocks is not None else f"blocks 1-{len(self.dims)}")
        standard = {"feature": "standardised", "sample": "standardised per image and block",
                    "none": "not standardised"}[settings.standardize]
        return (
            f"linear probe on the concatenated average-pooled features of {names} "
            f"(grids {'-'.join(map(str, grid))}, pool sizes "
            f"{'-'.join(str(self.pools[k]) for k in self.keep)}, "
            f"{sum(self.dims)} values, {standard}{', bf16 encoder' if settings.bf16 else ''})"
        )


Logits = Callable[[torch.Tensor, int], torch.Tensor]


def _fit_full_batch(clean: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    groups: list[slice], settings: ProbeSettings) -> tuple[Logits, str]:
    """One full-batch L-BFGS probe per group of features (``probe.epochs=0``)."""
    weights = [fit_linear_probe(clean[:, sl], labels, n_classes, settings.weight_decay,
                                settings.steps) for sl in groups]

    def logits_of(feats: torch.Tensor, k: int) -> torch.Tensor:
        w, b = weights[k]
        return feats[:, groups[k]] @ w.t() + b

    return logits_of, (f"full-batch L-BFGS ({settings.steps} iterations, L2 "
                       f"{settings.weight_decay:g})")


def _fit_minibatch(
    net: BlockNet, plan: _FeaturePlan, clean: torch.Tensor, flipped: torch.Tensor | None,
    cached: tuple[torch.Tensor, ...], images: torch.Tensor, labels: torch.Tensor,
    n_classes: int, groups: list[slice], settings: ProbeSettings, augment: Augment | None,
    autocast: Any, progress: bool,
) -> tuple[Logits, str]:
    """Minibatch Adam on the cached features (flipped ones drawn at random with
    ``probe.augment=flip``) or on augmented images' features; standardises ``cached`` in place
    (``probe.standardize=feature``)."""
    device = clean.device
    if settings.standardize == "feature":
        mean = clean.mean(0)
        std = clean.std(0, unbiased=False).clamp_min(1e-6)
    else:
        mean = torch.zeros(clean.shape[1], device=device)
        std = torch.ones(clean.shape[1], device=device)
    gen = torch.Generator().manual_seed(settings.seed)
    drop_gen = torch.Generator(device=device).manual_seed(settings.seed + 1)
    params = _linear_layers(groups, n_classes, device, settings, gen)
    opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    halve_after = {int(settings.epochs * r) for r in HALVING_POINTS}

    def logits_of(z: torch.Tensor, k: int) -> torch.Tensor:
        return z[:, groups[k]] @ params[2 * k].t() + params[2 * k + 1]

    # standardise once, in place (clean features); augmented batches as they come
    if settings.standardize == "feature":
        for t in cached:
            t.sub_(mean).div_(std)
    n = clean.shape[0]
    bar = tqdm(range(settings.epochs), desc="probe", unit="epoch", disable=not progress,
               leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen).to(device)
        flips = (torch.rand(n, generator=gen) < 0.5).to(device) if flipped is not None \
            else None
        for start in range(0, n, settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            if augment is not None:
                x = augment(images[idx], gen)
                with torch.no_grad(), autocast:
                    feats = block_features(net, x, plan.pools, plan.keep)
                if settings.standardize == "sample":
                    standardize_samples(feats, plan.slices)
                feats = (feats - mean) / std
            elif flips is not None:
                feats = torch.where(flips[start : start + len(idx), None], flipped[idx],
                                    clean[idx])
            else:
                feats = clean[idx]
            if settings.dropout:
                keep_p = 1.0 - settings.dropout
                mask = keep_mask(feats.shape, keep_p, drop_gen, device)
                feats = torch.where(mask, feats * (1.0 / keep_p), 0.0)
            y = labels[idx]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = sum(F.cross_entropy(logits_of(feats, k), y) for k in range(len(groups)))
                loss.backward()
            opt.step()
        if settings.schedule == "halving" and epoch + 1 in halve_after:
            for group in opt.param_groups:
                group["lr"] *= 0.5
    bar.close()
    aug = ("train-time crop + flip" if augment is not None
           else "train-time flip" if flipped is not None else "no augmentation")
    extra = settings.describe()
    return logits_of, (f"Adam lr {settings.lr:g}, weight decay {settings.weight_decay:g}, "
                       f"{settings.epochs} epochs, batch {settings.batch_size}, {aug}"
                       f"{', ' + extra if extra else ''}")
