"""Batched image augmentations on the device: self-supervised views, probe crops, normalisation.

All transforms take a whole batch ``(B, 3, H, W)`` of ``uint8`` images (as stored by
:class:`locallearn.data.images.ImageSet`; float input in [0, 1] is accepted too) on any device
and return ``float32`` ``(B, 3, H, W)`` on the same device, normalised with the dataset's
per-channel mean and standard deviation. Every random parameter is drawn per image, in one
tensor operation for the whole batch: there is no Python loop over images.

:class:`SSLViews` makes the two views of the self-supervised objectives: random resized crop (output
size = input size unless ``size`` is given, e.g. 224 px views of 246 px streamed squares; area scale
0.25-1 for CIFAR-10 and 0.08-1 otherwise, aspect ratio 3/4-4/3), horizontal flip (p 0.5), colour
jitter (brightness, contrast, saturation 0.8, hue 0.2) with p 0.8, grayscale with p 0.2, Gaussian
blur (kernel about 10% of the image side, odd, at least 3; sigma uniform in 0.1-2.0) with p 0.5,
then normalisation. Each image gets its own crop box, flip, jitter factors, grayscale and blur
draws; only the order in which the four jitter adjustments are applied is drawn once per batch (per
image in a per-image pipeline).

Seeding. The view pipeline is built from kornia augmentations, which draw their random
parameters from torch's global CPU generator (also when the images are on an accelerator). So:

* a training run that calls ``torch.manual_seed(seed)`` once at its start draws the same views
  on every rerun (the training loop does this);
* ``two_views(x, seed=s)`` draws from a private generator state seeded with ``s`` and leaves the
  global generator untouched: the same ``s`` and input give the same views.

Bitwise equality across different devices is not promised (the pixel arithmetic differs), only
across reruns on the same device and software.

:class:`ProbeAugment` (see :func:`probe_transform`) is the training-time augmentation of the
linear probe: zero-padded random crop and horizontal flip, written directly in torch with two
``gather`` operations; it accepts an explicit ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from locallearn.data.images import dataset_info

__all__ = ["ProbeAugment", "SSLViews", "blur_kernel_size", "center_crop", "normalize",
           "probe_transform", "random_crop_flip", "random_flip",
           "to_unit_float"]


def to_unit_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert a ``uint8`` batch to ``dtype`` in [0, 1]; a floating batch is only cast."""
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255.0)
    if x.is_floating_point():
        return x.to(dtype)
    raise ValueError(f"expected uint8 or floating images, got dtype {x.dtype}")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (drawn on the CPU) on ``device``; to a GPU through pinned memory, so that the copy
    does not wait for the work queued on the device (a copy from pageable memory does)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch (B, 3, H, W), got {shape}")


def _stats(
    dataset: str | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if dataset is None and (mean is None or std is None):
        raise ValueError("give a dataset name or both mean and std")
    info = dataset_info(dataset) if dataset is not None else None
    m = tuple(float(v) for v in (mean if mean is not None else info.mean))
    s = tuple(float(v) for v in (std if std is not None else info.std))
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got mean {m}, std {s}")
    return m, s


def normalize(
    x: torch.Tensor,
    dataset: str | None = "cifar10",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Scale a batch to [0, 1] (if ``uint8``) and normalise it per channel.

    Args:
        x: ``(B, 3, H, W)`` images, ``uint8`` or float in [0, 1].
        dataset: dataset whose constants to use (see :data:`locallearn.data.images.DATASETS`).
        mean, std: explicit per-channel constants; they override the dataset's. Tensors
            ``(1, 3, 1, 1)`` on ``x``'s device are used as they are (no copy to the device).

    Returns:
        ``float32`` tensor ``(x / 255 - mean) / std`` on ``x``'s device.
    """
    _check_batch(x)
    xf = to_unit_float(x)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return (xf - mean) / std  # constants already on the device: no copy per batch
    m, s = _stats(dataset, mean, std)
    mt = torch.tensor(m, dtype=xf.dtype, device=xf.device).view(1, 3, 1, 1)
    st = torch.tensor(s, dtype=xf.dtype, device=xf.device).view(1, 3, 1, 1)
    return (xf - mt) / st


def blur_kernel_size(side: int, fraction: float = 0.1) -> int:
    """Odd Gaussian-blur kernel size of about ``fraction`` of ``side`` pixels, at least 3."""
    k = int(fraction * side)
    if k % 2 == 0:
        k += 1
    return max(k, 3)


class SSLViews(nn.Module):
    """Random views for self-supervised learning, computed for the whole batch at once.

    Args:
        dataset: dataset name; sets the crop scale and the normalisation constants.
        crop_scale: area range of the random resized crop (default from the dataset:
            0.25-1 for CIFAR-10, 0.08-1 otherwise).
        crop_ratio: aspect-ratio range of the crop.
        flip_p: probability of a horizontal flip.
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue).
        jitter_p: probability of applying colour jitter.
        gray_p: probability of converting to grayscale.
        blur_p: probability of Gaussian blur.
        blur_sigma: range of the blur's standard deviation in pixels.
        blur_fraction: kernel size as a fraction of the image side (made odd, at least 3).
        mean, std: explicit normalisation constants (override the dataset's).
        size: side of the square output views; ``None``: the input's size (any ``H, W``).

    ``forward(x)`` returns one view of each image; :meth:`two_views` returns two independent
    views. Pipelines are built per input size.
    """

    def __init__(
        self,
        dataset: str | None = "cifar10",
        *,
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_fraction: float = 0.1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__()
        m, s = _stats(dataset, mean, std)
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        if crop_scale is None:
            if dataset is None:
                raise ValueError("give a dataset name or an explicit crop_scale")
            crop_scale = dataset_info(dataset).crop_scale
        lo, hi = float(crop_scale[0]), float(crop_scale[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        for label, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p),
                         ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{label} must lie in [0, 1], got {p}")
        self.dataset = dataset
        self.crop_scale = (lo, hi)
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(v) for v in jitter)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_fraction = float(blur_fraction)
        self.register_buffer("mean", torch.tensor(m).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(s).view(1, 3, 1, 1), persistent=False)
        self._pipelines: dict[tuple[int, int], nn.Module] = {}

    def _pipeline(self, h: int, w: int) -> nn.Module:
        key = (h, w)
        if key not in self._pipelines:
            import kornia.augmentation as K

            if self.size is not None:
                h = w = self.size

            stages: list[nn.Module] = [
                # "resample" crops the whole batch with one affine warp; the default "slice"
                # mode resizes each crop separately in a Python loop.
                K.RandomResizedCrop((h, w), scale=self.crop_scale, ratio=self.crop_ratio,
                                    cropping_mode="resample"),
            ]
            if self.flip_p > 0:
                stages.append(K.RandomHorizontalFlip(p=self.flip_p))
            if self.jitter_p > 0 and any(self.jitter):
                stages.append(K.ColorJitter(*self.jitter, p=self.jitter_p))
            if self.gray_p > 0:
                stages.append(K.RandomGrayscale(p=self.gray_p))
            if self.blur_p > 0:
                k = blur_kernel_size(min(h, w), self.blur_fraction)
                stages.append(K.RandomGaussianBlur((k, k), self.blur_sigma, p=self.blur_p))
            self._pipelines[key] = nn.Sequential(*stages)
        return self._pipelines[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One random view of every image of ``x`` (``(B, 3, H, W)``, uint8 or float in [0, 1])."""
        _check_batch(x)
        xf = to_unit_float(x)
        if xf.shape[0] == 0:
            return xf
        view = self._pipeline(int(xf.shape[2]), int(xf.shape[3]))(xf)
        view = view.clamp_(0.0, 1.0)
        return (view - self.mean.to(view)) / self.std.to(view)

    def two_views(
        self, x: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent random views of every image of ``x``.

        Both views are drawn in one pass over the doubled batch. With ``seed`` the draw uses a
        private generator state seeded with it (the global one is left as it was); without,
        the global torch generator is used (seed it once per run for reproducibility).
        """
        _check_batch(x)
        if seed is None:
            both = self(torch.cat([x, x]))
        else:
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                both = self(torch.cat([x, x]))
        v1, v2 = both.chunk(2)
        return v1, v2

    def extra_repr(self) -> str:
        return (f"dataset={self.dataset!r}, crop_scale={self.crop_scale}, flip_p={self.flip_p}, "
                f"jitter={self.jitter}, jitter_p={self.jitter_p}, gray_p={self.gray_p}, "
                f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma}")


class ProbeAugment(nn.Module):
    """Training-time augmentation of the linear probe: padded random crop, flip, normalisation.

    Args:
        dataset: dataset name for the normalisation constants.
        padding: zero padding on each side before cropping back to the input size (default:
            one eighth of the image side, i.e. 4 pixels at 32 px).
        flip_p: probability of a horizontal flip.
        mean, std: explicit normalisation constants (override the dataset's).

    The padding is black (zero) in [0, 1] pixel units, i.e. applied before normalisation.
    """

    def __init__(
        self,
        dataset: str | None = "cifar10",
        *,
        padding: int | None = None,
        flip_p: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        m, s = _stats(dataset, mean, std)
        if padding is not None and padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must lie in [0, 1], got {flip_p}")
        self.padding = padding
        self.flip_p = float(flip_p)
        self.register_buffer("mean", torch.tensor(m).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(s).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x``; random offsets and flips come from ``generator`` (a CPU generator;
        default: the global one)."""
        _check_batch(x)
        xf = to_unit_float(x)
        b, c, h, w = xf.shape
        pad = self.padding if self.padding is not None else max(1, min(h, w) // 8)
        dev = xf.device
        oy = _to_device(torch.randint(0, 2 * pad + 1, (b,), generator=generator), dev)
        ox = _to_device(torch.randint(0, 2 * pad + 1, (b,), generator=generator), dev)
        flip = _to_device(torch.rand((b,), generator=generator) < self.flip_p, dev)
        padded = nn.functional.pad(xf, (pad, pad, pad, pad))
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = oy[:, None] + ar_h  # (B, H)
        cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
        out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
        return (out - self.mean.to(out)) / self.std.to(out)


def probe_transform(
    dataset: str | None = "cifar10",
    *,
    padding: int | None = None,
    flip_p: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ProbeAugment:
    """The linear probe's training-time augmentation for ``dataset`` (see :class:`ProbeAugment`)."""
    return ProbeAugment(dataset, padding=padding, flip_p=flip_p, mean=mean, std=std)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` square of every image of ``x`` (a view, no copy)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if size > min(h, w):
        raise ValueError(f"cannot crop {size} pixels out of {h}x{w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def random_crop_flip(
    x: torch.Tensor, size: int, generator: torch.Generator | None = None, flip_p: float = 0.5
) -> torch.Tensor:
    """A random ``size`` x ``size`` crop of every image, flipped horizontally with ``flip_p``.

    Offsets and flips are drawn per image from ``generator`` (a CPU generator; default: the
    global one), the crop taken with two ``gather`` operations for the whole batch.
    """
    _check_batch(x)
    b, c, h, w = x.shape
    if size > min(h, w):
        raise ValueError(f"cannot crop {size} pixels out of {h}x{w} images")
    dev = x.device
    oy = _to_device(torch.randint(0, h - size + 1, (b,), generator=generator), dev)
    ox = _to_device(torch.randint(0, w - size + 1, (b,), generator=generator), dev)
    flip = _to_device(torch.rand((b,), generator=generator) < flip_p, dev)
    ar = torch.arange(size, device=dev)
    rows = oy[:, None] + ar
    cols = ox[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)
    out = x.gather(2, rows[:, None, :, None].expand(b, c, size, w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, size, size))


def random_flip(
    x: torch.Tensor, flip_p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Every image of ``x`` flipped horizontally with probability ``flip_p``, drawn per image
    from ``generator`` (a CPU generator; default: the global one, as the SSL views draw)."""
    _check_batch(x)
    flip = _to_device(torch.rand((x.shape[0],), generator=generator) < flip_p, x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
