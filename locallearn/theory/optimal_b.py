"""The optimal prediction matrix ``B_l``: closed form and numerical fit.

*Optimal* means: the minimiser over ``B`` of the L2-regularised local loss
``mean_i [f(u_pos) + f(-u_neg)] + reg * ||B||_F^2`` with the network weights frozen (see
:func:`locallearn.theory.objective.regularised_loss`). Every ``f`` of
:data:`locallearn.losses.F_KINDS` is convex and the scores are linear in ``B``, so with
``reg > 0`` the objective is strictly convex: the minimiser is unique and any convergent
optimiser reaches it (Newton's method to rounding precision, L-BFGS to its tolerance; ``hinge`` is
not differentiable everywhere and is fitted by L-BFGS only approximately).

The BP model's ``B_L`` is the optimum of the top-layer problem. If the map from layer ``l`` to the
top, ``M_l = W_L ... W_{l+1}``, is orthogonal (orthonormal weights, equal widths, linear), then
``z_L = M_l z_l`` for every sample and view, and the substitution ``B = M_l^T A M_l`` maps the local
problem of layer ``l`` onto the top problem with the same regulariser (``||B|| = ||A||``); its
optimum is therefore the rotated top optimum ``B_l = M_l^T B_L M_l`` (:func:`closed_form_b`). With
that ``B_l``, ``B_l z'_l = M_l^T B_L z'_L`` (the BP error signal) and ``u_l = u_L`` (the same
neuromodulator), so the local update of ``W_l`` equals the BP update element-wise. With top-layer
context (``c_l = z'_L``) the analogous matrix is ``B_l = M_l^T B_L``.
"""

from __future__ import annotations

import torch

from locallearn.losses import score_loss_grads
from locallearn.theory.objective import loss_and_b_grad, regularised_loss

CONTEXTS = ("same", "top")


def closed_form_b(
    transfer: torch.Tensor, b_top: torch.Tensor, context: str = "same"
) -> torch.Tensor:
    """``M^T B_L M`` (same-layer context) or ``M^T B_L`` (top-layer context).

    ``transfer``: ``M_l`` of shape ``(d_L, d_l)``, the linear map from layer ``l`` to the top;
    ``b_top``: ``B_L`` of shape ``(d_L, d_L)``.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} is unknown; valid: {', '.join(CONTEXTS)}")
    if transfer.dim() != 2 or b_top.shape != (transfer.shape[0], transfer.shape[0]):
        raise ValueError(
            f"transfer {tuple(transfer.shape)} and B_L {tuple(b_top.shape)} do not fit"
        )
    left = transfer.t() @ b_top
    return left @ transfer if context == "same" else left


METHODS = ("auto", "newton", "lbfgs")
NEWTON_MAX_SYSTEM = 2048


def fit_b(
    z: torch.Tensor,
    c: torch.Tensor,
    *,
    reg: float = 0.01,
    kind: str = "softplus",
    method: str = "auto",
    max_iter: int | None = None,
    tol: float = 1e-11,
) -> torch.Tensor:
    """Optimal ``B`` (``(D, D_c)``) for activities ``z`` (``(N, D)``) and contexts ``c``.

    Minimises :func:`regularised_loss` from ``B = 0`` in float64; ``z`` and ``c`` are constants.
    ``method``: ``lbfgs`` (torch L-BFGS, strong Wolfe line search; ``max_iter`` default 500),
    ``newton`` (:func:`newton_fit_b`, exact to rounding in a few steps; ``max_iter`` default 100;
    needs a twice-differentiable ``f``, so not ``hinge``), or ``auto``: Newton when ``f`` is
    smooth and its linear systems are small (``min(D D_c, 2N) <= 2048``), L-BFGS otherwise.
    """
    if reg <= 0:
        raise ValueError(f"reg must be positive for a unique optimal B, got {reg}")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; valid: {', '.join(METHODS)}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    if z.dim() != 2 or c.dim() != 2 or z.shape[0] != c.shape[0] or z.shape[0] < 2:
        raise ValueError(
            f"z and c must be (N, D) and (N, D_c) with N >= 2, got {tuple(z.shape)}, "
            f"{tuple(c.shape)}"
        )
    z = z.detach().to(torch.float64)
    c = c.detach().to(torch.float64)
    if method == "auto":
        small = min(z.shape[1] * c.shape[1], 2 * z.shape[0]) <= NEWTON_MAX_SYSTEM
        method = "newton" if kind != "hinge" and small else "lbfgs"
    if method == "newton":
        return newton_fit_b(z, c, reg=reg, kind=kind, max_iter=max_iter or 100, tol=tol)
    return lbfgs_fit_b(z, c, reg=reg, kind=kind, max_iter=max_iter or 500, tol=tol)


def lbfgs_fit_b(
    z: torch.Tensor,
    c: torch.Tensor,
    *,
    reg: float = 0.01,
    kind: str = "softplus",
    max_iter: int = 500,
    tol: float = 1e-11,
) -> torch.Tensor:
    """Optimal ``B`` by ``torch.optim.LBFGS`` from ``B = 0`` (see :func:`fit_b`)."""
    b = torch.zeros(z.shape[1], c.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-16,
        history_size=30,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        with torch.no_grad():
            loss, b.grad = loss_and_b_grad(z, c, b, reg, kind)
        return loss

    opt.step(closure)
    return b.detach()


def _pairs(z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(a_k, c_k)`` of the ``2N`` scores ``u_k = a_k^T B c_k``: positives, then negatives."""
    return torch.cat([z, torch.roll(z, -1, 0)]), torch.cat([c, c])


def _hessian_weights(
    u_pos: torch.Tensor, u_neg: torch.Tensor, kind: str
) -> tuple[torch.Tensor, bool]:
    """Square roots ``w`` of the Hessian of the summed score loss in the ``2N`` scores.

    Element-wise ``f``: ``H = diag(w^2)`` (``paired=False``, ``w`` has ``2N`` entries).
    ``softplus-diff``: ``H = sum_i w_i^2 (e_neg_i - e_pos_i)(e_neg_i - e_pos_i)^T``
    (``paired=True``, ``N`` entries).
    """
    if kind == "softplus":
        # f(u) = softplus(1 - u): f'' = sigma(1 - u) (1 - sigma(1 - u)); negatives use f(-u)
        p = torch.sigmoid(torch.cat([1.0 - u_pos, 1.0 + u_neg]))
        return (p * (1.0 - p)).sqrt(), False
    if kind == "linear":
        return torch.zeros(2 * u_pos.shape[0], dtype=u_pos.dtype), False
    if kind == "softplus-diff":
        p = torch.sigmoid(u_neg - u_pos)
        return (p * (1.0 - p)).sqrt(), True
    raise ValueError(
        f"Newton's method needs a smooth f (softplus, softplus-diff, linear), got {kind!r}"
    )


def _s_t(w: torch.Tensor, paired: bool, x: torch.Tensor) -> torch.Tensor:
    """``S^T x`` along the first dimension of ``x`` (``2N`` rows)."""
    ww = w.reshape(-1, *([1] * (x.dim() - 1)))
    if paired:
        n = w.shape[0]
        return ww * (x[n:] - x[:n])
    return ww * x


def _s(w: torch.Tensor, paired: bool, y: torch.Tensor) -> torch.Tensor:
    """``S y`` for a vector ``y`` (``r`` entries) -> ``2N`` entries."""
    return torch.cat([-w * y, w * y]) if paired else w * y


def newton_fit_b(
    z: torch.Tensor,
    c: torch.Tensor,
    *,
    reg: float = 0.01,
    kind: str = "softplus",
    max_iter: int = 100,
    tol: float = 1e-11,
) -> torch.Tensor:
    """Optimal ``B`` by damped Newton steps from ``B = 0`` (see :func:`fit_b`).

    The scores are ``u = Phi(B)`` with ``Phi(B)_k = a_k^T B c_k`` over the ``2N`` positive and
    negative pairs, so the Hessian of the objective is ``Phi^T H Phi / N + 2 reg I`` with ``H`` the
    Hessian of the summed loss in ``u``. With ``H = S S^T``, the Newton system is solved directly
    when ``B`` has at most ``2N`` entries, and otherwise in the ``2N``-dimensional sample space by
    the matrix inversion lemma, with the kernel ``K = (A A^T) * (C C^T)`` (element-wise product of
    the two Gram matrices). Backtracking on the objective keeps every step a descent step.
    """
    n = z.shape[0]
    lam = 2.0 * reg
    a, cc = _pairs(z, c)
    n_params = z.shape[1] * c.shape[1]
    primal = n_params <= 2 * n
    if primal:
        feats = (a[:, :, None] * cc[:, None, :]).reshape(2 * n, n_params)
    else:
        gram = (a @ a.t()) * (cc @ cc.t())
    b = torch.zeros(z.shape[1], c.shape[1], dtype=torch.float64)

    def phi(m: torch.Tensor) -> torch.Tensor:
        return (a * (cc @ m.t())).sum(1)

    def phi_t(v: torch.Tensor) -> torch.Tensor:
        return a.t() @ (v[:, None] * cc)

    loss = float(regularised_loss(z, c, b, reg, kind))
    for _ in range(max_iter):
        u = phi(b)
        g_pos, g_neg = score_loss_grads(u[:n], u[n:], kind)
        grad = phi_t(torch.cat([g_pos, g_neg]) / n) + lam * b
        if float(grad.abs().max()) <= tol:
            break
        w, paired = _hessian_weights(u[:n], u[n:], kind)
        if primal:
            sf = _s_t(w, paired, feats)
            hess = sf.t() @ sf / n + lam * torch.eye(n_params, dtype=torch.float64)
            chol = torch.linalg.cholesky(hess)
            step = -torch.cholesky_solve(grad.reshape(-1, 1), chol).reshape(b.shape)
        else:
            sks = _s_t(w, paired, _s_t(w, paired, gram).t())
            inner = lam * torch.eye(sks.shape[0], dtype=torch.float64) + sks / n
            chol = torch.linalg.cholesky(inner)
            y = torch.cholesky_solve(_s_t(w, paired, phi(grad))[:, None], chol)[:, 0]
            step = -(grad - phi_t(_s(w, paired, y)) / n) / lam
        slack = 1e-13 * max(1.0, abs(loss))  # rounding level of the objective
        t = 1.0
        while True:
            trial = b + t * step
            new_loss = float(regularised_loss(z, c, trial, reg, kind))
            if new_loss <= loss + slack:
                break
            t *= 0.5
            if t < 1e-10:
                return b  # no descent direction left: at the optimum up to rounding
        b, loss = trial, new_loss
        if float((t * step).norm()) <= 1e-14 * float(b.norm()):
            break
    return b


def b_gradient_norm(
    z: torch.Tensor, c: torch.Tensor, b: torch.Tensor, *, reg: float = 0.01, kind: str = "softplus"
) -> float:
    """Norm of the gradient of the regularised loss at ``B`` (0 at the optimum)."""
    bb = b.detach().clone().requires_grad_(True)
    loss = regularised_loss(z.detach(), c.detach(), bb, reg, kind)
    (g,) = torch.autograd.grad(loss, bb)
    return float(g.norm())
