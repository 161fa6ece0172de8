"""Loss functions as pure functions of tensors.

The unified local loss of *Can Local Learning Match Self-Supervised Backpropagation?* (arXiv
2601.21683) scores a positive and a negative sample against a context, ``u = z^T B c``, and
penalises ``f(u_pos) + f(-u_neg)`` with a decreasing ``f``. The members of the family differ in
``f`` (:data:`F_KINDS`) and in ``B`` (trainable for CLAPP, the identity for Forward-Forward).

All functions return the mean over the batch unless said otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_KINDS = ("hinge", "softplus", "linear", "softplus-diff")


def _check_kind(kind: str) -> None:
    if kind not in F_KINDS:
        raise ValueError(f"loss f={kind!r} is unknown; valid: {', '.join(F_KINDS)}")


def f_value(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The decreasing function ``f`` of the unified loss, applied element-wise.

    ``hinge``: ``max(0, 1 - x)`` (CLAPP); ``softplus``: ``softplus(1 - x)``; ``linear``: ``-x``.
    ``softplus-diff`` is not element-wise in ``u_pos`` and ``u_neg``; see :func:`score_loss`.
    """
    _check_kind(kind)
    if kind == "hinge":
        return torch.relu(1.0 - x)
    if kind == "softplus":
        return F.softplus(1.0 - x)
    if kind == "linear":
        return -x
    raise ValueError("f=softplus-diff acts on u_pos - u_neg; use score_loss")


def f_prime(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Derivative ``f'(x)`` (the neuromodulator of the three-factor form, up to sign)."""
    _check_kind(kind)
    if kind == "hinge":
        return -(x < 1.0).to(x.dtype)
    if kind == "softplus":
        return -torch.sigmoid(1.0 - x)
    if kind == "linear":
        return -torch.ones_like(x)
    raise ValueError("f=softplus-diff acts on u_pos - u_neg; use score_loss")


#: How a bilinear score ``z^T B c`` is scaled (``rule.options.score_norm``).
SCORE_NORMS = ("none", "dims")


def score_scale(norm: str, d_z: int, d_c: int) -> float:
    """The scale ``s`` of the score ``u = s * z^T B c`` of a ``d_z``-dim output predicted from a
    ``d_c``-dim context: ``1`` for ``none`` (the sum, as in the image paper's code) and
    ``1 / sqrt(d_z d_c)`` for ``dims`` (``1 / C`` for a ``C x C`` matrix ``B``). The one convention
    of every CLAPP-style rule (RHM and images); it is a fixed rescaling of ``B``.
    """
    if norm not in SCORE_NORMS:
        raise ValueError(f"score_norm={norm!r} is unknown; valid: {', '.join(SCORE_NORMS)}")
    return 1.0 / math.sqrt(d_z * d_c) if norm == "dims" else 1.0


def score_loss(u_pos: torch.Tensor, u_neg: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Unified contrastive loss ``f(u_pos) + f(-u_neg)``, summed over all elements.

    For ``softplus-diff`` the loss is ``softplus(u_neg - u_pos)``. The sum (not the mean) is
    returned so that callers choose their own normalisation.
    """
    _check_kind(kind)
    if kind == "softplus-diff":
        return F.softplus(u_neg - u_pos).sum()
    return f_value(u_pos, kind).sum() + f_value(-u_neg, kind).sum()


def score_loss_grads(
    u_pos: torch.Tensor, u_neg: torch.Tensor, kind: str = "hinge"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/du_pos, dL/du_neg)`` of :func:`score_loss`: the signed neuromodulators."""
    _check_kind(kind)
    if kind == "softplus-diff":
        g = torch.sigmoid(u_neg - u_pos)
        return -g, g
    return f_prime(u_pos, kind), -f_prime(-u_neg, kind)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between two batches of embeddings ``(N, D)``, cosine similarity.

    Row ``i`` of ``z1`` is positive with row ``i`` of ``z2``; every other row of ``z2`` is a
    negative. Mean over the batch and both directions. The similarities are computed in fp32
    even under autocast: in bf16 a cosine near 1 is rounded by about 0.004, which the
    temperature magnifies tenfold in the logits.
    """
    a = F.normalize(_at_least_fp32(z1.flatten(1)), dim=1)
    b = F.normalize(_at_least_fp32(z2.flatten(1)), dim=1)
    with torch.autocast(a.device.type, enabled=False):
        logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def vicreg(
    z1: torch.Tensor,
    z2: torch.Tensor,
    inv_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Non-contrastive loss: invariance + variance + covariance terms between two views.

    ``z1, z2``: ``(N, D)``. Invariance: mean squared distance between the views. Variance: hinge
    keeping each dimension's standard deviation above 1. Covariance: squared off-diagonal entries
    of the covariance matrix, divided by ``D``.
    """
    z1 = z1.flatten(1)
    z2 = z2.flatten(1)
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    var = 0.0
    cov = 0.0
    for z in (z1, z2):
        zc = z - z.mean(0)
        std = torch.sqrt(zc.var(0) + eps)
        var = var + torch.relu(1.0 - std).mean()
        c = (zc.t() @ zc) / max(n - 1, 1)
        off = c - torch.diag(torch.diag(c))
        cov = cov + off.pow(2).sum() / d
    return inv_weight * inv + var_weight * var + cov_weight * cov


def ff_goodness_loss(
    z_pos: torch.Tensor, z_neg: torch.Tensor, threshold: float = 1.0
) -> torch.Tensor:
    """Forward-Forward goodness loss: ``softplus(theta - g_pos) + softplus(g_neg - theta)``.

    Goodness ``g`` is the mean squared activity of a sample. Mean over the batch.
    """
    g_pos = z_pos.flatten(1).pow(2).mean(1)
    g_neg = z_neg.flatten(1).pow(2).mean(1)
    return (F.softplus(threshold - g_pos) + F.softplus(g_neg - threshold)).mean()
