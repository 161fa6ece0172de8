"""Tests of the batched augmentations in locallearn.data.augment."""

from __future__ import annotations

import pytest
import torch

from locallearn.data.augment import (
    ProbeAugment,
    SSLViews,
    blur_kernel_size,
    normalize,
    probe_transform,
    to_unit_float,
)
from locallearn.data.images import dataset_info


def _batch(b: int = 16, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=g)


def _unnormalize(v: torch.Tensor, dataset: str) -> torch.Tensor:
    info = dataset_info(dataset)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return v * std + mean


def _plain(dataset: str = "cifar10", **kw) -> SSLViews:
    """A view pipeline with every random stage switched off unless given in ``kw``."""
    args = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                gray_p=0.0, blur_p=0.0)
    args.update(kw)
    return SSLViews(dataset, **args)


def test_normalize_matches_constants():
    x = _batch()
    info = dataset_info("cifar10")
    out = normalize(x, "cifar10")
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected = (x.float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(
        info.std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    # explicit constants override the dataset's
    out2 = normalize(x, None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(out2, x.float() / 127.5 - 1)
    # float input in [0, 1] is accepted
    torch.testing.assert_close(normalize(x.float() / 255, "cifar10"), out)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="image batch"):
        normalize(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype"):
        to_unit_float(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown dataset"):
        SSLViews("mnist")
    with pytest.raises(ValueError, match="crop_scale"):
        SSLViews("cifar10", crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="gray_p"):
        SSLViews("cifar10", gray_p=1.5)


def test_crop_scale_defaults_per_dataset():
    assert SSLViews("cifar10").crop_scale == (0.25, 1.0)
    assert SSLViews("stl10").crop_scale == (0.08, 1.0)
    assert SSLViews("tiny-imagenet").crop_scale == (0.08, 1.0)
    assert SSLViews("cifar10", crop_scale=(0.5, 1.0)).crop_scale == (0.5, 1.0)


def test_blur_kernel_size():
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(8) == 3
    for side in range(8, 300, 7):
        assert blur_kernel_size(side) % 2 == 1


@pytest.mark.parametrize("dataset,side", [("cifar10", 32), ("stl10", 96), ("tiny-imagenet", 64)])
def test_two_views_shape_dtype_range(dataset, side):
    x = _batch(8, side)
    v1, v2 = SSLViews(dataset).two_views(x, seed=0)
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == torch.float32 and v.device == x.device
        assert torch.isfinite(v).all()
        raw = _unnormalize(v, dataset)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # the two views of an image differ, and so do the views of different images
    assert not torch.allclose(v1, v2)
    assert (v1 - v2).abs().flatten(1).amax(1).min() > 0


def test_views_are_drawn_per_image():
    # identical images in one batch must still get different random views
    x = _batch(1).expand(12, -1, -1, -1).contiguous()
    v, _ = SSLViews("cifar10").two_views(x, seed=3)
    flat = v.flatten(1)
    dist = torch.cdist(flat, flat)
    off_diag = dist[~torch.eye(12, dtype=torch.bool)]
    assert off_diag.min() > 0


def test_seeded_views_are_reproducible_and_leave_global_rng():
    x = _batch()
    aug = SSLViews("cifar10")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a1, a2 = aug.two_views(x, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # global generator untouched
    b1, b2 = aug.two_views(x, seed=7)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = aug.two_views(x, seed=8)
    assert not torch.equal(a1, c1)


def test_global_seed_makes_views_reproducible():
    x = _batch()
    aug = SSLViews("cifar10")
    torch.manual_seed(42)
    a = aug.two_views(x)
    a_next = aug.two_views(x)
    torch.manual_seed(42)
    b = aug.two_views(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a_next[0])  # successive calls draw new views


def test_identity_pipeline_is_normalisation():
    x = _batch()
    out = _plain()(x)
    torch.testing.assert_close(out, normalize(x, "cifar10"), atol=1e-4, rtol=0)


def test_flip_stage_flips_every_image_when_p_is_one():
    x = _batch()
    out = _plain(flip_p=1.0)(x)
    torch.testing.assert_close(out, normalize(x.flip(-1), "cifar10"), atol=1e-4, rtol=0)


def test_grayscale_stage_equalises_channels():
    x = _batch()
    raw = _unnormalize(_plain(gray_p=1.0)(x), "cifar10")
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, 1], raw[:, 2], atol=1e-5, rtol=0)
    # luminance-like weights: the gray value lies between the channel extremes
    xf = x.float() / 255
    assert (raw[:, 0] >= xf.amin(1) - 1e-5).all() and (raw[:, 0] <= xf.amax(1) + 1e-5).all()


def test_blur_stage_smooths():
    x = _batch()
    raw = _unnormalize(_plain(blur_p=1.0, blur_sigma=(2.0, 2.0))(x), "cifar10")
    xf = x.float() / 255
    # blurring a noise image strongly reduces the differences between neighbouring pixels
    tv_in = (xf[..., 1:] - xf[..., :-1]).abs().mean()
    tv_out = (raw[..., 1:] - raw[..., :-1]).abs().mean()
    assert tv_out < 0.6 * tv_in
    # and keeps each image's mean about the same
    torch.testing.assert_close(raw.mean((2, 3)), xf.mean((2, 3)), atol=0.03, rtol=0)


def test_crop_stage_zooms_in():
    # a left-to-right ramp: a crop with scale < 1 stretches it, so the range of values shrinks
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8)
    x = ramp.view(1, 1, 1, 32).expand(8, 3, 32, 32).contiguous()
    raw = _unnormalize(_plain(crop_scale=(0.25, 0.25))(x), "cifar10")
    span = raw[:, 0, 16, -1] - raw[:, 0, 16, 0]
    assert (span < 0.75).all() and (span > 0.25).all()


def test_probe_transform_is_a_padded_crop_and_flip():
    x = _batch(6)
    pad = 4
    xf = x.float() / 255
    padded = torch.nn.functional.pad(xf, (pad, pad, pad, pad))
    for flip_p in (0.0, 1.0):
        probe = probe_transform("cifar10", padding=pad, flip_p=flip_p)
        raw = _unnormalize(probe(x, torch.Generator().manual_seed(0)), "cifar10")
        assert raw.shape == x.shape
        for i in range(x.shape[0]):
            windows = [
                padded[i, :, dy:dy + 32, dx:dx + 32]
                for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            ]
            if flip_p:
                windows = [w.flip(-1) for w in windows]
            assert any(torch.allclose(raw[i], w, atol=1e-5) for w in windows)


def test_probe_transform_generator_and_defaults():
    x = _batch()
    probe = ProbeAugment("cifar10")
    a = probe(x, torch.Generator().manual_seed(5))
    b = probe(x, torch.Generator().manual_seed(5))
    c = probe(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # no padding, no flip: plain normalisation
    torch.testing.assert_close(ProbeAugment("cifar10", padding=0, flip_p=0)(x), normalize(x))
    # default padding is one eighth of the side, and offsets cover the whole range
    probe96 = ProbeAugment("stl10", flip_p=0)
    x96 = _batch(64, 96)
    out = _unnormalize(probe96(x96, torch.Generator().manual_seed(0)), "stl10")
    black_rows = (out.abs().amax(dim=(1, 3)) < 1e-6).sum(1)  # zero rows from the padding
    assert black_rows.max() <= 12 and black_rows.max() >= 6


def test_empty_batch():
    x = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    v1, v2 = SSLViews("cifar10").two_views(x)
    assert v1.shape == (0, 3, 32, 32) and v2.shape == (0, 3, 32, 32)
