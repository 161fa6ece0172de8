"""Positive pairs (two views of each sample) for the theory cases, in float64.

Synthetic Gaussian data: a shared signal ``s`` plus independent noise per view,
``x = s + noise * e``, ``x' = s + noise * e'``. For vectors, ``s`` has a decaying spectrum
(variance ``1/k`` along the ``k``-th axis of a random orthonormal basis); for images, ``s`` is
white noise smoothed by a 3x3 box filter, so nearby pixels correlate.

Image data: two patches of the same image are the positive pair. The first patch sits at a
random position; the second is shifted by up to ``max_shift`` pixels in each direction (clipped
to the image), so the two views overlap partly. For the MLP cases, ``8 x 8 x C`` patches are
flattened and mapped to the network's input width by a fixed random semi-orthogonal matrix drawn
from the seed (for CIFAR-10, ``192 -> 128`` with orthonormal rows: a random 128-dimensional
projection that keeps relative distances on average). For the CNN cases the patches are
``16 x 16 x C``.

Every pair is centred (the mean over samples and both views is removed per dimension) and scaled to
a mean squared value of 1 per dimension. The negative of a sample is the next sample of the batch
(see :mod:`locallearn.theory.objective`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locallearn.theory.weights import semi_orthogonal

Pair = tuple[torch.Tensor, torch.Tensor]


def standardise(x: torch.Tensor, x_other: torch.Tensor) -> Pair:
    """Centre both views per dimension (joint mean) and scale to mean square 1 per dimension."""
    both = torch.cat([x, x_other])
    mean = both.mean(0, keepdim=True)
    both = both - mean
    scale = both.pow(2).mean().sqrt()
    if float(scale) == 0.0:
        raise ValueError("the views are constant; cannot standardise")
    return (x - mean) / scale, (x_other - mean) / scale


def gaussian_vectors(
    n: int, dim: int, gen: torch.Generator, noise: float = 0.5, decay: float = 1.0
) -> Pair:
    """``n`` pairs of ``dim``-vectors: shared signal (variance ``k^-decay`` along the ``k``-th
    axis of a random orthonormal basis) plus view noise."""
    if n < 2 or dim < 1:
        raise ValueError(f"need n >= 2 samples and dim >= 1, got n={n}, dim={dim}")
    spec = torch.arange(1, dim + 1, dtype=torch.float64) ** -decay
    basis = semi_orthogonal(dim, dim, gen)
    s = (torch.randn(n, dim, generator=gen, dtype=torch.float64) * (spec / spec.mean()).sqrt())
    s = s @ basis.t()
    x = s + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    xo = s + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return standardise(x, xo)


def gaussian_images(
    n: int, channels: int, size: int, gen: torch.Generator, noise: float = 0.5
) -> Pair:
    """``n`` pairs of ``(channels, size, size)`` images: smoothed shared signal plus noise."""
    if n < 2 or channels < 1 or size < 1:
        raise ValueError("need n >= 2 images and positive channels and size")
    s = torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)
    s = F.avg_pool2d(s, 3, stride=1, padding=1, count_include_pad=False)
    s = s / s.std()
    x = s + noise * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    xo = s + noise * torch.randn(s.shape, generator=gen, dtype=torch.float64)
    xs, xos = standardise(x.flatten(1), xo.flatten(1))
    return xs.reshape(s.shape), xos.reshape(s.shape)


def check_images(images: torch.Tensor, min_size: int) -> torch.Tensor:
    """Validate ``(N, C, H, W)`` images and return them as float64 (``uint8`` divided by 255)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("inputs must be a tensor of images (N, C, H, W)")
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images, got {images.shape[0]}")
    if images.shape[2] < min_size or images.shape[3] < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size}, got "
                         f"{images.shape[2]}x{images.shape[3]}")
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"images must be real-valued, got dtype {images.dtype}")
    out = images.detach().to("cpu", torch.float64)
    if images.dtype == torch.uint8:
        out = out / 255.0
    if not torch.isfinite(out).all():
        raise ValueError("images contain NaN or infinite values")
    return out


def patch_pairs(
    images: torch.Tensor, n: int, patch: int, gen: torch.Generator, max_shift: int = 4
) -> Pair:
    """Two ``patch x patch`` crops of each of ``n`` randomly chosen images, ``(n, C, p, p)``."""
    images = check_images(images, patch)
    n_img, chans, height, width = images.shape
    idx = torch.randperm(n_img, generator=gen)[: min(n, n_img)]
    m = idx.shape[0]
    y0 = torch.randint(0, height - patch + 1, (m,), generator=gen)
    x0 = torch.randint(0, width - patch + 1, (m,), generator=gen)
    dy = torch.randint(-max_shift, max_shift + 1, (m,), generator=gen)
    dx = torch.randint(-max_shift, max_shift + 1, (m,), generator=gen)
    y1 = (y0 + dy).clamp(0, height - patch)
    x1 = (x0 + dx).clamp(0, width - patch)
    ar = torch.arange(patch)
    ch = torch.arange(chans)[None, :, None, None]

    def crop(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        rows = (ys[:, None] + ar)[:, None, :, None]
        cols = (xs[:, None] + ar)[:, None, None, :]
        return images[idx[:, None, None, None], ch, rows, cols]

    return crop(y0, x0), crop(y1, x1)


def image_vectors(
    images: torch.Tensor, n: int, width: int, gen: torch.Generator, patch: int = 8
) -> Pair:
    """Patch pairs flattened and projected to ``width`` values, standardised (MLP input)."""
    a, b = patch_pairs(images, n, patch, gen)
    dim = a[0].numel()
    proj = (
        torch.eye(width, dtype=torch.float64) if dim == width else semi_orthogonal(width, dim, gen)
    )
    return standardise(a.flatten(1) @ proj.t(), b.flatten(1) @ proj.t())


def image_maps(images: torch.Tensor, n: int, gen: torch.Generator, patch: int = 16) -> Pair:
    """Patch pairs as ``(n, C, patch, patch)`` maps, standardised (CNN input)."""
    a, b = patch_pairs(images, n, patch, gen)
    xs, xos = standardise(a.flatten(1), b.flatten(1))
    return xs.reshape(a.shape), xos.reshape(b.shape)
