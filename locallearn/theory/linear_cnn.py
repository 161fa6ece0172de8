"""Linear CNN with 2x2 stride-2 kernels: local and BP-SSL gradients with loss pooling on a grid.

Layer ``l`` maps ``z_{l-1}`` (``(N, C, H, W)``) to ``z_l = conv(z_{l-1}, K_l)`` with a 2x2 kernel
of stride 2 and no bias, so each output position is a linear map of one non-overlapping 2x2 patch
(``(C_out, 4 C_in)``, the kernel reshaped). Maps are flattened in ``(C, H, W)`` order.

Loss pooling: layer ``l``'s local loss is the contrastive score loss of
:mod:`locallearn.theory.objective` on its output average-pooled with kernel = stride = ``p_l``
and flattened; the context is the same layer's pooled map on the other view; ``B_l`` is a linear
map on the flattened pooled map (``(D, D)`` with ``D = C (H/p)(W/p)``), so it can couple positions.
``p_l`` equal to the map size is global pooling (every position receives the same gradient), ``1``
keeps every position. BP-SSL: the same loss on the top layer, backpropagated through all layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locallearn.theory.objective import contrastive_loss, score_delta
from locallearn.theory.optimal_b import fit_b


def _check(kernels: list[torch.Tensor], x: torch.Tensor, x_other: torch.Tensor) -> None:
    if not kernels:
        raise ValueError("the network needs at least one layer")
    if x.dim() != 4 or x.shape != x_other.shape:
        raise ValueError(f"views must both be (N, C, H, W), got {tuple(x.shape)}, "
                         f"{tuple(x_other.shape)}")
    if x.shape[1] != kernels[0].shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels, layer 1 expects {kernels[0].shape[1]}")
    size = 2 ** len(kernels)
    if x.shape[2] % size or x.shape[3] % size:
        raise ValueError(f"input size must be a multiple of {size} for {len(kernels)} layers")


def to_patches(h: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H/2, W/2, 4C)``: the 2x2 patch under each output position."""
    n, c, hh, ww = h.shape
    p = h.reshape(n, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return p.reshape(n, hh // 2, ww // 2, 4 * c)


def from_patches(p: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`to_patches` (the patches do not overlap)."""
    n, h, w, _ = p.shape
    return p.reshape(n, h, w, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        n, channels, 2 * h, 2 * w
    )


def conv(h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x2 stride-2 convolution without bias, via patches."""
    out = to_patches(h) @ kernel.reshape(kernel.shape[0], -1).t()
    return out.permute(0, 3, 1, 2)


def forward(kernels: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Maps ``[z_0, z_1, ..., z_L]``."""
    zs = [x]
    for k in kernels:
        zs.append(conv(zs[-1], k))
    return zs


def pool(z: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling with kernel = stride = ``size`` (must divide the map)."""
    n, c, h, w = z.shape
    if size < 1 or h % size or w % size:
        raise ValueError(f"pool size {size} does not divide the {h}x{w} map")
    return z.reshape(n, c, h // size, size, w // size, size).mean((3, 5))


def unpool(g: torch.Tensor, size: int) -> torch.Tensor:
    """Adjoint of :func:`pool`: spread each value over its window, divided by ``size**2``."""
    up = g.repeat_interleave(size, 2).repeat_interleave(size, 3)
    return up / size**2


def _check_pools(kernels: list[torch.Tensor], x: torch.Tensor, pools: list[int]) -> None:
    if len(pools) != len(kernels):
        raise ValueError(f"need one pool size per layer: {len(kernels)} layers, {len(pools)} sizes")
    for i, p in enumerate(pools):
        size = x.shape[2] // 2 ** (i + 1)
        if p < 1 or size % p or (x.shape[3] // 2 ** (i + 1)) % p:
            raise ValueError(f"pool size {p} does not divide the layer {i + 1} map ({size})")


def _kernel_grad(delta: torch.Tensor, h: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``dL/dK`` from ``delta = dL/dz`` (``(N, C_out, h, w)``) and the layer input ``h``."""
    g = torch.einsum("nohw,nhwi->oi", delta, to_patches(h))
    return g.reshape(shape)


def _pooled_delta(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, size: int, kind: str
) -> torch.Tensor:
    zp = pool(z, size)
    cp = pool(c, size).flatten(1)
    dp = score_delta(zp.flatten(1), cp, b, kind).reshape(zp.shape)
    return unpool(dp, size)


def local_grads(
    kernels: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    bs: list[torch.Tensor],
    pools: list[int],
    *,
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """Local update ``dL_l/dK_l`` of every layer (same-layer context), explicit formula."""
    _check(kernels, x, x_other)
    _check_pools(kernels, x, pools)
    if len(bs) != len(kernels):
        raise ValueError(f"need one B per layer: {len(kernels)} layers, {len(bs)} matrices")
    zs = forward(kernels, x)
    zo = forward(kernels, x_other)
    return [
        _kernel_grad(_pooled_delta(zs[i + 1], zo[i + 1], bs[i], pools[i], kind), zs[i], k.shape)
        for i, k in enumerate(kernels)
    ]


def bp_grads(
    kernels: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    b_top: torch.Tensor,
    *,
    top_pool: int = 1,
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """BP-SSL gradient ``dL_L/dK_l`` of every layer, explicit backward pass."""
    _check(kernels, x, x_other)
    zs = forward(kernels, x)
    c_top = forward(kernels, x_other)[-1]
    delta = _pooled_delta(zs[-1], c_top, b_top, top_pool, kind)
    grads: list[torch.Tensor] = []
    for i in reversed(range(len(kernels))):
        k = kernels[i]
        grads.append(_kernel_grad(delta, zs[i], k.shape))
        dpatch = delta.permute(0, 2, 3, 1) @ k.reshape(k.shape[0], -1)
        delta = from_patches(dpatch, k.shape[1])
    return grads[::-1]


def _pooled_loss(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, size: int, kind: str
) -> torch.Tensor:
    zp = F.avg_pool2d(z, size, size).flatten(1)
    cp = F.avg_pool2d(c, size, size).flatten(1)
    return contrastive_loss(zp, cp, b, kind)


def local_grads_autograd(
    kernels: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    bs: list[torch.Tensor],
    pools: list[int],
    *,
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """Reference for :func:`local_grads` with ``torch.nn.functional.conv2d`` and autograd."""
    _check(kernels, x, x_other)
    _check_pools(kernels, x, pools)
    grads = []
    h, ho = x.detach(), x_other.detach()
    for i, k in enumerate(kernels):
        ki = k.detach().clone().requires_grad_(True)
        z = F.conv2d(h, ki, stride=2)
        zo = F.conv2d(ho, k.detach(), stride=2)
        (g,) = torch.autograd.grad(_pooled_loss(z, zo, bs[i].detach(), pools[i], kind), ki)
        grads.append(g)
        h, ho = z.detach(), zo  # stop-gradient between layers
    return grads


def bp_grads_autograd(
    kernels: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    b_top: torch.Tensor,
    *,
    top_pool: int = 1,
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """Reference for :func:`bp_grads` with ``torch.nn.functional.conv2d`` and autograd."""
    _check(kernels, x, x_other)
    ks = [k.detach().clone().requires_grad_(True) for k in kernels]
    h, ho = x.detach(), x_other.detach()
    for k, kd in zip(ks, kernels):
        h = F.conv2d(h, k, stride=2)
        ho = F.conv2d(ho, kd.detach(), stride=2)
    return list(torch.autograd.grad(_pooled_loss(h, ho, b_top.detach(), top_pool, kind), ks))


def transfer(kernels: list[torch.Tensor], layer: int, input_size: int) -> torch.Tensor:
    """``M_l`` (``(D_L, D_l)``): the linear map from flattened ``z_l`` to flattened ``z_L``.

    ``layer`` is 0 (input) to ``L``; ``input_size`` is the input map side. Built by sending the
    standard basis of layer ``l`` through the layers above.
    """
    if not 0 <= layer <= len(kernels):
        raise ValueError(f"layer must be in 0..{len(kernels)}, got {layer}")
    channels = kernels[layer - 1].shape[0] if layer else kernels[0].shape[1]
    side = input_size // 2**layer
    dim = channels * side * side
    h = torch.eye(dim, dtype=kernels[0].dtype).reshape(dim, channels, side, side)
    for k in kernels[layer:]:
        h = conv(h, k)
    return h.reshape(dim, -1).t()


def optimal_bs(
    kernels: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    pools: list[int],
    *,
    reg: float = 0.01,
    kind: str = "softplus",
    b_top: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Fitted optimal ``B_l`` of every layer on its pooled local loss (top: ``b_top`` if given)."""
    _check(kernels, x, x_other)
    _check_pools(kernels, x, pools)
    zs = forward(kernels, x)
    zo = forward(kernels, x_other)
    bs = []
    for i, p in enumerate(pools):
        if i == len(pools) - 1 and b_top is not None:
            bs.append(b_top)
            continue
        zp = pool(zs[i + 1], p).flatten(1)
        cp = pool(zo[i + 1], p).flatten(1)
        bs.append(fit_b(zp, cp, reg=reg, kind=kind))
    return bs
