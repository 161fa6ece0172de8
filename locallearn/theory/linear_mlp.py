"""Deep MLP without bias (linear or ReLU): local and BP-SSL weight gradients in closed form.

Layer ``l`` (1-based) computes ``z_l = rho(W_l z_{l-1})`` with ``rho`` the identity or ReLU,
``z_0 = x``. Two views ``x`` and ``x_other`` of each sample go through the same weights. Layer
``l``'s local loss is the contrastive score loss of :mod:`locallearn.theory.objective` on
``z = z_l(x)`` with context ``c_l = z_l(x_other)`` (``context="same"``) or ``c_l = z_L(x_other)``
(``context="top"``, direct feedback); gradients are blocked between layers and through ``c_l``.
BP-SSL is the same loss on the top layer only, backpropagated to every ``W_l`` (the context
``z_L(x_other)`` is not differentiated either).

Explicit formulas (``delta_l = dL/dz_l`` from :func:`~locallearn.theory.objective.score_delta`):
local ``dL_l/dW_l = (delta_l * rho'(a_l))^T z_{l-1}``; BP propagates
``delta_{l-1} = (delta_l * rho'(a_l)) W_l`` from the top. The ``*_autograd`` functions compute the
same quantities with torch autograd and serve as the reference in the tests.
"""

from __future__ import annotations

import torch

from locallearn.theory.objective import contrastive_loss, score_delta
from locallearn.theory.optimal_b import CONTEXTS, fit_b


def _check_net(weights: list[torch.Tensor], x: torch.Tensor, x_other: torch.Tensor) -> None:
    if not weights:
        raise ValueError("the network needs at least one layer")
    for i in range(1, len(weights)):
        if weights[i].shape[1] != weights[i - 1].shape[0]:
            raise ValueError(f"layer {i + 1} input width does not match layer {i} output width")
    if x.dim() != 2 or x.shape != x_other.shape or x.shape[1] != weights[0].shape[1]:
        raise ValueError(
            f"views must both be (N, {weights[0].shape[1]}), got {tuple(x.shape)} and "
            f"{tuple(x_other.shape)}"
        )


def _check_context(context: str) -> None:
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} is unknown; valid: {', '.join(CONTEXTS)}")


def forward(weights: list[torch.Tensor], x: torch.Tensor, relu: bool = False) -> list[torch.Tensor]:
    """Activities ``[z_0, z_1, ..., z_L]`` for inputs ``x`` (``(N, d_0)``)."""
    zs = [x]
    for w in weights:
        a = zs[-1] @ w.t()
        zs.append(torch.relu(a) if relu else a)
    return zs


def transfer(weights: list[torch.Tensor], layer: int) -> torch.Tensor:
    """``M_l = W_L ... W_{l+1}`` (``(d_L, d_l)``), the linear map from layer ``l`` to the top.

    ``layer`` is 0 (input) to ``L``; ``M_L`` is the identity.
    """
    if not 0 <= layer <= len(weights):
        raise ValueError(f"layer must be in 0..{len(weights)}, got {layer}")
    width = weights[layer - 1].shape[0] if layer else weights[0].shape[1]
    m = torch.eye(width, dtype=weights[0].dtype)
    for w in weights[layer:]:
        m = w @ m
    return m


def contexts(
    weights: list[torch.Tensor], x_other: torch.Tensor, relu: bool = False, context: str = "same"
) -> list[torch.Tensor]:
    """Context ``c_l`` of every layer ``l = 1..L`` (index 0 of the list is layer 1)."""
    _check_context(context)
    zo = forward(weights, x_other, relu)
    return zo[1:] if context == "same" else [zo[-1]] * len(weights)


def _rho_prime(z: torch.Tensor, relu: bool) -> torch.Tensor:
    return (z > 0).to(z.dtype) if relu else torch.ones_like(z)


def local_grads(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    bs: list[torch.Tensor],
    *,
    relu: bool = False,
    context: str = "same",
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """Local update ``dL_l/dW_l`` of every layer, explicit formula; ``bs[l-1]`` is ``B_l``."""
    _check_net(weights, x, x_other)
    if len(bs) != len(weights):
        raise ValueError(f"need one B per layer: {len(weights)} layers, {len(bs)} matrices")
    zs = forward(weights, x, relu)
    cs = contexts(weights, x_other, relu, context)
    grads = []
    for i in range(len(weights)):
        delta = score_delta(zs[i + 1], cs[i], bs[i], kind) * _rho_prime(zs[i + 1], relu)
        grads.append(delta.t() @ zs[i])
    return grads


def bp_grads(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    b_top: torch.Tensor,
    *,
    relu: bool = False,
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """BP-SSL gradient ``dL_L/dW_l`` of every layer, explicit backward pass."""
    _check_net(weights, x, x_other)
    zs = forward(weights, x, relu)
    c_top = forward(weights, x_other, relu)[-1]
    delta = score_delta(zs[-1], c_top, b_top, kind)
    grads: list[torch.Tensor] = []
    for i in reversed(range(len(weights))):
        delta = delta * _rho_prime(zs[i + 1], relu)
        grads.append(delta.t() @ zs[i])
        delta = delta @ weights[i]
    return grads[::-1]


def local_grads_autograd(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    bs: list[torch.Tensor],
    *,
    relu: bool = False,
    context: str = "same",
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """Reference for :func:`local_grads`: autograd of each local loss, inputs detached."""
    _check_net(weights, x, x_other)
    cs = [c.detach() for c in contexts(weights, x_other, relu, context)]
    grads = []
    h = x.detach()
    for i, w in enumerate(weights):
        wi = w.detach().clone().requires_grad_(True)
        a = h @ wi.t()
        z = torch.relu(a) if relu else a
        loss = contrastive_loss(z, cs[i], bs[i].detach(), kind)
        (g,) = torch.autograd.grad(loss, wi)
        grads.append(g)
        h = z.detach()  # stop-gradient between layers
    return grads


def bp_grads_autograd(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    b_top: torch.Tensor,
    *,
    relu: bool = False,
    kind: str = "softplus",
) -> list[torch.Tensor]:
    """Reference for :func:`bp_grads`: autograd of the top-layer loss through all layers."""
    _check_net(weights, x, x_other)
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    c_top = forward([w.detach() for w in weights], x_other, relu)[-1]
    z_top = forward(ws, x.detach(), relu)[-1]
    loss = contrastive_loss(z_top, c_top, b_top.detach(), kind)
    return list(torch.autograd.grad(loss, ws))


def optimal_bs(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    x_other: torch.Tensor,
    *,
    relu: bool = False,
    context: str = "same",
    reg: float = 0.01,
    kind: str = "softplus",
    b_top: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """L-BFGS-fitted optimal ``B_l`` of every layer on its own local loss.

    The top layer's local loss is the BP loss, so ``B_L`` is the BP model's ``B``; pass ``b_top``
    to reuse an already fitted one.
    """
    _check_net(weights, x, x_other)
    zs = forward(weights, x, relu)
    cs = contexts(weights, x_other, relu, context)
    bs = [fit_b(zs[i + 1], cs[i], reg=reg, kind=kind) for i in range(len(weights) - 1)]
    bs.append(b_top if b_top is not None else fit_b(zs[-1], cs[-1], reg=reg, kind=kind))
    return bs
