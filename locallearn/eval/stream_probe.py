"""The linear probe on data too large for memory: features recomputed from streamed batches.

The protocol is that of :mod:`locallearn.eval.image_probe` (frozen encoder, every block pooled
onto its grid and concatenated, features standardised with the mean and standard deviation of the
clean training features, one zero-initialised linear layer trained with Adam on the
cross-entropy, the final layer tested), with the images read batch by batch:

1. one pass over the training images, centre-cropped, accumulates the feature mean and standard
   deviation (float64);
2. ``epochs`` passes in an order drawn from the probe's generator; every minibatch is cropped
   (random crop of the network's side out of the decoded square and a horizontal flip when
   ``augment``, else the centre crop), encoded and standardised;
3. one pass over the test images, centre-cropped (the decoded square is ``load_size`` =
   1.1 x the side for ImageNet: resized x1.1 and centre-cropped).

Nothing of size ``N x D`` is ever held. The training accuracy reported is that of the last
epoch's minibatches (augmented inputs, the layer as it was at each step). Full-batch L-BFGS
(``epochs = 0``) needs all features at once and is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from locallearn.data.augment import center_crop, random_crop_flip
from locallearn.eval.image_probe import (
    ProbeResult,
    ProbeSettings,
    probe_layout,
    silent_fractions,
)
from locallearn.nets.base import BlockNet
from locallearn.rules.image_grid import pool_flat

__all__ = ["run_stream_probe"]

#: ``batches(order, batch_size)``: ``(uint8 images (B, 3, L, L), labels)`` on the encoder's
#: device, in ``order`` (a permutation tensor; ``None``: file order).
Batches = Callable[[torch.Tensor | None, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def _features(net: BlockNet, x: torch.Tensor, pools: list[int], bf16: bool) -> torch.Tensor:
    """Pooled features of all blocks (the encoder under bf16 autocast with ``bf16``), fp32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        feats = [pool_flat(h, p) for h, p in zip(net.features(x), pools)]
    return torch.cat(feats, 1).float()


def run_stream_probe(
    net: BlockNet,
    train_batches: Batches,
    n_train: int,
    test_batches: Batches,
    n_classes: int,
    side: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
    settings: ProbeSettings,
    augment: bool = True,
    progress: bool = False,
    description: str = "",
) -> ProbeResult:
    """Fit the linear probe on the frozen ``net`` from streamed batches (module docstring).

    Args:
        net: the encoder (left in eval mode, unchanged).
        train_batches, test_batches: the labelled training images and the test images.
        n_train: number of training images (the length of an order).
        n_classes: number of classes.
        side: side of the network's input; the batches' squares are cropped to it.
        transform: clean preprocessing (normalisation) of a ``uint8`` batch.
        settings: the probe's hyper-parameters (``epochs`` >= 1).
        augment: random crop + flip for training (else centre crops).
    """
    if settings.epochs < 1:
        raise ValueError(
            "probe.epochs=0 (full-batch L-BFGS) needs every feature in memory; streamed data "
            "needs probe.epochs >= 1"
        )
    t0 = time.perf_counter()
    net.eval()
    device = next(net.parameters()).device
    layout = probe_layout(net, side, settings.grid)
    pools, slices = layout.pools, layout.slices
    dims = [s.stop - s.start for s in slices]

    def features(images: torch.Tensor) -> torch.Tensor:
        return _features(net, transform(images), pools, settings.bf16)

    mean, std, total_sq, count = _feature_stats(features, train_batches, side,
                                                settings.batch_size)
    silent = silent_fractions(total_sq, slices)
    groups = [slice(0, sum(dims))] + (slices if settings.per_block else [])
    params = [p for sl in groups for p in (
        torch.zeros(n_classes, sl.stop - sl.start, device=device, requires_grad=True),
        torch.zeros(n_classes, device=device, requires_grad=True))]

    def logits_of(z: torch.Tensor, k: int) -> torch.Tensor:
        return z[:, groups[k]] @ params[2 * k].t() + params[2 * k + 1]

    def standardised(images: torch.Tensor) -> torch.Tensor:
        return (features(images) - mean) / std

    train_acc = _train(standardised, logits_of, params, len(groups), train_batches, n_train,
                       n_classes, side, settings, augment, progress)
    accs, n_test = _test(standardised, logits_of, len(groups), test_batches, n_classes, side,
                         settings.batch_size, device)
    aug = "train-time random crop + flip" if augment else "centre crops"
    protocol = (
        f"linear probe on the concatenated average-pooled features of blocks 1-{len(dims)} "
        f"(grids {'-'.join(map(str, layout.cells))}, pool sizes {'-'.join(map(str, pools))}, "
        f"{sum(dims)} values, standardised{', bf16 encoder' if settings.bf16 else ''}), "
        f"Adam lr {settings.lr:g}, weight decay "
        f"{settings.weight_decay:g}, {settings.epochs} epochs, batch {settings.batch_size}, {aug}; "
        f"streamed: {count} training and {n_test} test images (test: centre crops); training "
        f"accuracy of the last epoch's minibatches{'; ' + description if description else ''}"
    )
    return ProbeResult(
        accuracy=accs[0],
        train_accuracy=train_acc,
        protocol=protocol,
        block_accuracies=accs[1:] if settings.per_block else None,
        feature_dims=dims,
        pools=pools,
        n_train=count,
        n_test=n_test,
        seconds=round(time.perf_counter() - t0, 3),
        silent_fractions=silent,
    )


def _check_labels(y: torch.Tensor, n_classes: int, what: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"probe: the {what} split has images without a label in "
                         f"0..{n_classes - 1}")


def _feature_stats(features: Callable[[torch.Tensor], torch.Tensor], batches: Batches,
                   side: int, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Mean, standard deviation (at least 1e-6) and sum of squares of the clean training
    features, and the number of training images: one pass over the centre crops."""
    total = total_sq = None
    count = 0
    for images, _ in batches(None, bs):
        f = features(center_crop(images, side)).double()
        total = f.sum(0) if total is None else total + f.sum(0)
        total_sq = f.square().sum(0) if total_sq is None else total_sq + f.square().sum(0)
        count += f.shape[0]
    if count == 0 or total is None or total_sq is None:
        raise ValueError("probe: the probe training split has no images")
    mean = (total / count).float()
    std = (total_sq / count - (total / count).square()).clamp_min(0).sqrt().float()
    return mean, std.clamp_min(1e-6), total_sq, count


def _train(standardised: Callable[[torch.Tensor], torch.Tensor], logits_of: Callable,
           params: list[torch.Tensor], n_groups: int, batches: Batches, n_train: int,
           n_classes: int, side: int, settings: ProbeSettings, augment: bool,
           progress: bool) -> float:
    """The probe's Adam epochs over the streamed training images; returns the accuracy of the
    last epoch's minibatches."""
    opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    correct = torch.zeros((), dtype=torch.long, device=params[0].device)  # read once, at the end
    seen = 0
    bar = tqdm(range(settings.epochs), desc="probe", unit="epoch", disable=not progress,
               leave=False)
    for epoch in bar:
        order = torch.randperm(n_train, generator=gen)
        last = epoch == settings.epochs - 1
        for images, y in batches(order, settings.batch_size):
            if epoch == 0:  # the labels are the same every epoch: checked once
                _check_labels(y, n_classes, "probe training")
            crops = (random_crop_flip(images, side, gen) if augment
                     else center_crop(images, side))
            feats = standardised(crops)
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                outs = [logits_of(feats, k) for k in range(n_groups)]
                loss = sum(F.cross_entropy(o, y) for o in outs)
                loss.backward()
            opt.step()
            if last:
                correct += (outs[0].detach().argmax(1) == y).sum()
                seen += int(y.numel())
    bar.close()
    return int(correct) / max(seen, 1)


def _test(standardised: Callable[[torch.Tensor], torch.Tensor], logits_of: Callable,
          n_groups: int, batches: Batches, n_classes: int, side: int, bs: int,
          device: torch.device) -> tuple[list[float], int]:
    """Each probe's accuracy on the streamed test images (centre crops), and their number."""
    hits = torch.zeros(n_groups, dtype=torch.long, device=device)
    n_test = 0
    with torch.no_grad():
        for images, y in batches(None, bs):
            _check_labels(y, n_classes, "test")
            feats = standardised(center_crop(images, side))
            for k in range(n_groups):
                hits[k] += (logits_of(feats, k).argmax(1) == y).sum()
            n_test += int(y.numel())
    if n_test == 0:
        raise ValueError("probe: the test split has no images")
    return [h / n_test for h in hits.tolist()], n_test
