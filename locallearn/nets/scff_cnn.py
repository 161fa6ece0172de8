"""The SCFF network: the three-block CNN of :mod:`locallearn.nets.hebb_cnn` with the
self-contrastive forward-forward rule's pairing convolution (Nat. Commun. 2025).

Layout (:data:`~locallearn.nets.hebb_cnn.HEBB_PLAN`): 96, 384 and 1536 channels, kernels 5, 3, 3
after reflect padding 2, 1, 1, convolutions with bias and Xavier-uniform weights; then a triangle
activation (``relu(u - mean_c u)``) and a max-pool of kernel 4, stride 2, padding 1 after blocks 1
and 2, a ReLU and an average pool of 2 after block 3. The pools round their output size up
(``ceil_mode``), as the rule's reference code sets. Sides on 32-pixel inputs: 16, 8, 4.

What a block's linear part (:class:`SCFFConv`, the block's ``pre``) computes for two images ``x``
and ``x'`` (a *pair*):

1. each image is standardised on its own over all its values (``standardize``: minus the mean,
   divided by ``1e-10 +`` the unbiased standard deviation);
2. both are padded (reflect) and put side by side along the channels, a ``2C``-channel tensor;
3. that tensor is standardised again per sample, over all ``2C`` channels and the *padded* map
   (again the unbiased deviation, now over twice as many values);
4. the same convolution is applied to each half and the results are added, so the bias counts
   twice: ``out = conv(z_1) + conv(z_2)``.

The positive pair of an image is the image with itself, so ``out = 2 (W z + b)``; the negative pair
is the image with another image of the batch. On one batch of images the block's ``forward`` is
the positive pair, which is what the reference code computes when it evaluates the network (its
probe path). A rule reaches the pairs through :meth:`SCFFConv.contrast` (positive and shifted
negative pairs of a whole batch, with one convolution), :meth:`SCFFConv.pair` (any two batches,
written step by step) and :meth:`SCFFConv.single` (one image without pairing: pad, standardise,
convolve once, the bias counted once: the mode in which a deeper block reads a stream of
negatives propagated from below).

Why :meth:`~SCFFConv.contrast` needs one convolution: after step 1 and the padding, image ``i``
has per-sample mean ``m_i``, centred values ``c_i`` and centred sum of squares ``q_i`` over its
``N`` values. The pair ``(i, j)`` has mean ``(m_i + m_j) / 2`` and sum of squared deviations
``S = q_i + q_j + N (m_i - m_j)^2 / 2``; the mean offsets of the two halves are opposite, and the
convolution has no zero padding (every window lies inside the padded map), so they cancel in the
sum and ``out = (conv(c_i) + conv(c_j)) / (1e-10 + sqrt(S / (2N - 1))) + 2b``. One convolution of
the centred batch gives every pair.

:func:`scff_vgg6` puts the same pairing block into the project's common network, VGG-6 (3x3
kernels, reflect padding 1, ReLU and the 2x2 max-pools of :data:`~locallearn.nets.vgg.VGG6_PLAN`):
it keeps the rule's pairing and standardisation and drops the triangle (ReLU in its place: over
5 epochs of 10,000 CIFAR-10 images both gained the same over their untrained networks, 2.6 and
2.5 points; ``docs/leaderboard.md``), the 5x5 first kernel, the wide pools and the widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.nets.base import Block, BlockNet, scaled_width
from locallearn.nets.hebb_cnn import HEBB_PLAN, Triangle, pool_of
from locallearn.nets.vgg import VGG6_PLAN, vgg_net

__all__ = ["SCFFConv", "scff_cnn", "scff_vgg6", "standardize"]

#: Added to the standard deviation before dividing (the reference code's constant).
STD_EPS = 1e-10


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Each sample minus its mean, divided by ``1e-10 +`` its unbiased standard deviation, both
    over every dimension but the first."""
    dims = tuple(range(1, x.dim()))
    x = x - x.mean(dim=dims, keepdim=True)
    return x / (STD_EPS + x.std(dim=dims, keepdim=True))


class SCFFConv(nn.Module):
    """The linear part of an SCFF block: pairing, padding, standardisation and a convolution
    shared by both halves of a pair (see the module docstring).

    Attributes:
        conv: the convolution (``bias`` optional), applied without padding of its own.
        padding: the reflect padding on each side.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, padding: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, bias=bias)
        nn.init.xavier_uniform_(self.conv.weight)
        self.padding = int(padding)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with reflect padding."""
        p = self.padding
        return F.pad(x, (p, p, p, p), mode="reflect")

    def _bias(self, out: torch.Tensor, times: float) -> torch.Tensor:
        b = self.conv.bias
        return out if b is None else out + times * b.view(1, -1, 1, 1)

    def single(self, h: torch.Tensor) -> torch.Tensor:
        """One image without pairing: ``conv(standardize(pad(h)))``, the bias counted once."""
        return self.conv(standardize(self.padded(h)))

    def pair(self, x: torch.Tensor, x_other: torch.Tensor) -> torch.Tensor:
        """The pair ``(x, x_other)`` written step by step: standardise each, pad, put them side by
        side along the channels, standardise the ``2C``-channel tensor, convolve each half with
        the same weights and add."""
        a = self.padded(standardize(x))
        b = self.padded(standardize(x_other))
        z = standardize(torch.cat([a, b], dim=1))
        c = a.shape[1]
        return self.conv(z[:, :c]) + self.conv(z[:, c:])

    def contrast(
        self, x: torch.Tensor, shift: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positive pairs ``(x_i, x_i)`` and, when ``shift`` is given, negative pairs
        ``(x_i, x_{(i + shift) mod B})`` of a batch, from one convolution (module docstring)."""
        a = self.padded(standardize(x))
        dims = (1, 2, 3)
        n = a[0].numel()
        m = a.mean(dim=dims)
        c = a - m.view(-1, 1, 1, 1)
        q = (c * c).sum(dim=dims)
        v = F.conv2d(c, self.conv.weight)
        d_pos = STD_EPS + torch.sqrt(2 * q / (2 * n - 1))
        pos = self._bias(2 * (v / d_pos.view(-1, 1, 1, 1)), 2.0)
        if shift is None:
            return pos, None
        m_j, q_j = m.roll(-shift, 0), q.roll(-shift, 0)
        s = q + q_j + n * (m - m_j) ** 2 / 2
        d_neg = STD_EPS + torch.sqrt(s / (2 * n - 1))
        neg = self._bias((v + v.roll(-shift, 0)) / d_neg.view(-1, 1, 1, 1), 2.0)
        return pos, neg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each image paired with itself: ``2 (W z + b)``."""
        return self.contrast(x, None)[0]

    def extra_repr(self) -> str:
        return f"padding={self.padding} (reflect), pairs of images"


def scff_cnn(
    width_mult: float = 1.0,
    in_channels: int = 3,
    bias: bool = True,
    seed: int = 0,
) -> BlockNet:
    """The SCFF CIFAR-10 network (96-384-1536 channels; see the module docstring).

    Args:
        width_mult: multiplier of every block's channels.
        in_channels: input channels.
        bias: whether the convolutions have a bias (the reference code's do).
        seed: seed of the initial weights (the convolution's default initialisation, then
            Xavier-uniform weights, block after block, in the reference code's order of draws),
            drawn from a private generator state: the global one is left as it was.
    """
    scaled_width(1, width_mult)  # checks it
    blocks: list[nn.Module] = []
    last = len(HEBB_PLAN) - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c_in = in_channels
        for level, (channels, kernel, padding, pool) in enumerate(HEBB_PLAN):
            c_out = scaled_width(channels, width_mult)
            pre = SCFFConv(c_in, c_out, kernel, padding, bias=bias)
            act: nn.Module = nn.ReLU() if level == last else Triangle()
            blocks.append(Block(pre, nn.Sequential(act, pool_of(pool, ceil_mode=True))))
            c_in = c_out
    return BlockNet(blocks, readout=None)


def scff_vgg6(
    width_mult: float = 1.0,
    in_channels: int = 3,
    bias: bool = True,
    seed: int = 0,
) -> BlockNet:
    """VGG-6 (:data:`~locallearn.nets.vgg.VGG6_PLAN`) with SCFF's pairing block in every block
    (:class:`SCFFConv`: 3x3 kernels, reflect padding 1, Xavier-uniform weights), then ReLU and,
    where the plan marks it, a 2x2 max-pool. Arguments as :func:`scff_cnn`."""
    return vgg_net(VGG6_PLAN, width_mult, in_channels, seed,
                   lambda c_in, c_out: SCFFConv(c_in, c_out, 3, 1, bias=bias))
