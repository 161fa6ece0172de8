"""The unified contrastive score loss on a batch, and its explicit gradient.

For a batch of activities ``z`` (``(N, D)``, the first view), contexts ``c`` (``(N, D_c)``, from
the other view, never differentiated) and a matrix ``B`` (``(D, D_c)``), sample ``i`` has the
positive score ``u_pos[i] = z[i]^T B c[i]`` and the negative score ``u_neg[i] = z[i+1]^T B c[i]``:
the negative of a sample is the next sample of the batch (a roll by one, cyclic). The loss is the
batch mean of ``f(u_pos) + f(-u_neg)`` (or ``softplus(u_neg - u_pos)`` for ``softplus-diff``), with
``f`` from :mod:`locallearn.losses`.
"""

from __future__ import annotations

import torch

from locallearn.losses import score_loss, score_loss_grads


def _check(z: torch.Tensor, c: torch.Tensor, b: torch.Tensor) -> None:
    if z.dim() != 2 or c.dim() != 2 or b.dim() != 2:
        raise ValueError("z, c and B must be matrices (N, D), (N, D_c), (D, D_c)")
    if z.shape[0] != c.shape[0] or b.shape != (z.shape[1], c.shape[1]):
        raise ValueError(
            f"shapes do not fit: z {tuple(z.shape)}, c {tuple(c.shape)}, B {tuple(b.shape)}"
        )
    if z.shape[0] < 2:
        raise ValueError("the batch needs at least 2 samples (negatives are the next sample)")


def scores(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_pos, u_neg, v)`` with ``v = c B^T`` (row ``i`` is the prediction ``B c[i]``)."""
    _check(z, c, b)
    v = c @ b.t()
    u_pos = (z * v).sum(1)
    u_neg = (torch.roll(z, -1, 0) * v).sum(1)
    return u_pos, u_neg, v


def contrastive_loss(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, kind: str = "softplus"
) -> torch.Tensor:
    """Batch-mean loss; differentiable in ``z`` and ``B`` (``c`` is detached here)."""
    u_pos, u_neg, _ = scores(z, c.detach(), b)
    return score_loss(u_pos, u_neg, kind) / z.shape[0]


def regularised_loss(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, reg: float, kind: str = "softplus"
) -> torch.Tensor:
    """:func:`contrastive_loss` plus ``reg * ||B||_F^2`` (the objective whose minimiser is the
    optimal ``B``)."""
    return contrastive_loss(z, c, b, kind) + reg * (b * b).sum()


def score_delta(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, kind: str = "softplus"
) -> torch.Tensor:
    """Explicit ``d loss / d z`` of :func:`contrastive_loss`, shape ``(N, D)``.

    Sample ``k`` is the positive of its own row and the negative of row ``k - 1``:
    ``(g_pos[k] B c[k] + g_neg[k-1] B c[k-1]) / N``, with ``g = dL/du`` the signed neuromodulator.
    """
    u_pos, u_neg, v = scores(z, c, b)
    g_pos, g_neg = score_loss_grads(u_pos, u_neg, kind)
    return (g_pos[:, None] * v + torch.roll(g_neg[:, None] * v, 1, 0)) / z.shape[0]


def loss_and_b_grad(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, reg: float, kind: str = "softplus"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`regularised_loss` and its explicit gradient in ``B``:
    ``sum_i (g_pos[i] z[i] + g_neg[i] z[i+1]) c[i]^T / N + 2 reg B``."""
    u_pos, u_neg, _ = scores(z, c, b)
    g_pos, g_neg = score_loss_grads(u_pos, u_neg, kind)
    mixed = g_pos[:, None] * z + g_neg[:, None] * torch.roll(z, -1, 0)
    n = z.shape[0]
    loss = score_loss(u_pos, u_neg, kind) / n + reg * (b * b).sum()
    return loss, mixed.t() @ c / n + 2.0 * reg * b
