"""The statements of the deep-linear-network theory as runnable cases.

Each function compares, layer by layer, the local update of ``W_l`` with the BP-SSL gradient of
``W_l`` on one batch (the same views and negatives) and returns rows
``{"case", "layer" (1-based), "cosine", "rel_error"}`` (see :mod:`locallearn.theory.metrics`).
In every case the top layer's ``B_L`` is the BP model's ``B``: the optimum of the regularised
top-layer loss with the weights frozen (:func:`~locallearn.theory.optimal_b.fit_b`). The top
layer's local loss *is* the BP loss, so the top layer always agrees (cosine 1).

Cases (MLPs have 6 layers on 128 inputs; the CNN has 4 layers of 32 channels on 16x16 inputs):

- ``exact``: linear, orthonormal 128x128 weights, ``B_l = M_l^T B_L M_l`` (closed form). This is
  the optimum of layer ``l``'s regularised local loss (the local problem is the top problem
  rotated by the orthogonal ``M_l``), and the updates agree element-wise.
- ``exact-lbfgs``: same network, each ``B_l`` fitted by ``torch.optim.LBFGS`` on its own local
  loss from ``B = 0``: optimisation reaches the closed form, up to its tolerance.
- ``forward-forward``: same network with ``B = I`` everywhere, compared with BP of the top loss with
  ``B_L = I`` (``M^T I M = I``): also exact.
- ``random-B``: same network, ``B_l`` random Gaussian scaled to ``||B_L||`` (below the top).
- ``non-orthogonal``: linear, Gaussian weights ``N(0, 1/128)``, every ``B_l`` optimal (fitted).
- ``relu``: ReLU, orthonormal weights times ``sqrt(2)`` (so activity does not halve per layer),
  every ``B_l`` optimal (fitted).
- ``shrinking-same`` / ``shrinking-top``: linear, semi-orthogonal weights, widths
  128-64-32-16-8-4 on 128 inputs; context from the same layer or from the top layer (direct
  feedback, ``B_l`` of shape ``(d_l, d_L)``); every ``B_l`` optimal for its context (fitted).
  On the data of :func:`run_all`, top context is closer to BP in cosine and in relative
  (Frobenius) error at every layer below the top.
  (The matrix ``M_l^T B_L`` would make the top-context update exact for any weights, but the
  local optimum also uses directions the top layer discards.)
- ``conv-global-pool``: linear CNN, orthonormal-style kernels, the loss of each layer on its map
  pooled to 1x1 (pool sizes 8-4-2-1), ``B_l`` (32x32) optimal (fitted).
- ``conv-pool-1``: the same CNN, no pooling; ``B_l = M_l^T B_L M_l`` on the flattened map
  (``M_l`` the conv stack above layer ``l`` as a matrix, orthonormal rows). Exact.
- ``conv-pool-2111``: pool sizes 2-1-1-1: fitted optimal ``B_1`` on the 4x4 pooled map, closed
  form at the pool-1 layers.

Decisions:

- Data (:mod:`locallearn.theory.data`): :func:`run_all` uses 512 pairs for the MLP cases, 2048
  pairs for the direct-feedback cases (the fitted top-context ``B_l`` picks up chance correlations
  on small batches, see :func:`direct_feedback`) and 256 pairs of 16x16 maps for the CNN cases;
  the negative of a sample is the next sample of the batch.
- ``B`` is fitted by :func:`~locallearn.theory.optimal_b.fit_b` (Newton's method, exact to
  rounding, where its linear systems are small; L-BFGS otherwise and always in ``exact-lbfgs``).
  Gradients are those of the batch-mean loss on the batch used for the fit, not averages over
  batches. ``softplus`` ``f`` and ``reg = 0.01`` by default.
- In the CNN the flattened maps shrink by 4 per layer (2048-512-128-32), so no ``M_l`` is square;
  ``M_l^T B_L M_l`` is then the optimum of the local loss among the ``B`` that read and write only
  the subspace the layers above transmit (``B = M_l^T A M_l``, ``||B|| = ||A||``: again the top
  problem). An unrestricted fit at pool size 1 also uses directions that the top discards (as in
  ``shrinking-same``) and is not exact. The CNN's top map is 1x1, so BP's loss needs no pooling.
- The cosine is the scale-free measure; ``rel_error`` also counts a mismatch of scale (a random
  ``B`` gives much larger updates than BP's, hence relative errors far above 1).
"""

from __future__ import annotations

import torch

from locallearn.theory import data, linear_cnn, linear_mlp
from locallearn.theory.metrics import cosine, rel_error
from locallearn.theory.optimal_b import closed_form_b, fit_b
from locallearn.theory.weights import conv_weights, mlp_weights

Row = dict[str, float | int | str]

MLP_WIDTH = 128
MLP_DEPTH = 6
SHRINKING_WIDTHS = (128, 64, 32, 16, 8, 4)
CONV_CHANNELS = 32
CONV_LAYERS = 4
CONV_SIZE = 16
GLOBAL_POOLS = (8, 4, 2, 1)
POOL_1 = (1, 1, 1, 1)
POOL_2111 = (2, 1, 1, 1)


def compare(case: str, local: list[torch.Tensor], bp: list[torch.Tensor]) -> list[Row]:
    """Rows of per-layer cosine and relative error between local and BP gradients."""
    if len(local) != len(bp):
        raise ValueError(f"{len(local)} local gradients but {len(bp)} BP gradients")
    return [
        {"case": case, "layer": i + 1, "cosine": cosine(g, r), "rel_error": rel_error(g, r)}
        for i, (g, r) in enumerate(zip(local, bp))
    ]


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1009 + stream)


def _top_b(weights: list[torch.Tensor], x: torch.Tensor, x_other: torch.Tensor, relu: bool,
           reg: float, kind: str) -> torch.Tensor:
    z_top = linear_mlp.forward(weights, x, relu)[-1]
    c_top = linear_mlp.forward(weights, x_other, relu)[-1]
    return fit_b(z_top, c_top, reg=reg, kind=kind)


def _check_mlp_views(x: torch.Tensor, x_other: torch.Tensor, depth: int) -> int:
    """Validate the views and the depth; return the width (= input width)."""
    if x.dim() != 2 or x.shape != x_other.shape or x.shape[0] < 2:
        raise ValueError(f"MLP views must both be (N >= 2, width), got {tuple(x.shape)} and "
                         f"{tuple(x_other.shape)}")
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    return x.shape[1]


def exactness(
    x: torch.Tensor,
    x_other: torch.Tensor,
    *,
    seed: int = 0,
    reg: float = 0.01,
    kind: str = "softplus",
    lbfgs: bool = True,
    depth: int = MLP_DEPTH,
) -> list[Row]:
    """Cases ``exact``, ``exact-lbfgs`` (if ``lbfgs``) and ``forward-forward``.

    Linear MLP of ``depth`` square orthonormal layers as wide as the input ``x`` (``(N, width)``).
    """
    width = _check_mlp_views(x, x_other, depth)
    ws = mlp_weights([width] * (depth + 1), _generator(seed, 1))
    b_top = _top_b(ws, x, x_other, False, reg, kind)
    bp = linear_mlp.bp_grads(ws, x, x_other, b_top, kind=kind)
    closed = [closed_form_b(linear_mlp.transfer(ws, i), b_top) for i in range(1, depth + 1)]
    rows = compare("exact", linear_mlp.local_grads(ws, x, x_other, closed, kind=kind), bp)
    if lbfgs:
        zs = linear_mlp.forward(ws, x)
        zo = linear_mlp.forward(ws, x_other)
        fitted = [
            fit_b(zs[i], zo[i], reg=reg, kind=kind, method="lbfgs") for i in range(1, depth)
        ]
        local = linear_mlp.local_grads(ws, x, x_other, [*fitted, b_top], kind=kind)
        rows += compare("exact-lbfgs", local, bp)
    eye = torch.eye(width, dtype=torch.float64)
    bp_ff = linear_mlp.bp_grads(ws, x, x_other, eye, kind=kind)
    local_ff = linear_mlp.local_grads(ws, x, x_other, [eye] * depth, kind=kind)
    return rows + compare("forward-forward", local_ff, bp_ff)


def random_b(
    x: torch.Tensor, x_other: torch.Tensor, *, seed: int = 0, reg: float = 0.01,
    kind: str = "softplus", depth: int = MLP_DEPTH,
) -> list[Row]:
    """Case ``random-B``: orthonormal linear MLP, fixed random ``B_l`` below the top."""
    width = _check_mlp_views(x, x_other, depth)
    gen = _generator(seed, 2)
    ws = mlp_weights([width] * (depth + 1), gen)
    b_top = _top_b(ws, x, x_other, False, reg, kind)
    bs = []
    for _ in range(depth - 1):
        b = torch.randn(width, width, generator=gen, dtype=torch.float64)
        bs.append(b * (b_top.norm() / b.norm()))
    local = linear_mlp.local_grads(ws, x, x_other, [*bs, b_top], kind=kind)
    return compare("random-B", local, linear_mlp.bp_grads(ws, x, x_other, b_top, kind=kind))


def _fitted_case(
    case: str, ws: list[torch.Tensor], x: torch.Tensor, x_other: torch.Tensor, *, relu: bool,
    context: str, reg: float, kind: str,
) -> list[Row]:
    b_top = _top_b(ws, x, x_other, relu, reg, kind)
    bs = linear_mlp.optimal_bs(
        ws, x, x_other, relu=relu, context=context, reg=reg, kind=kind, b_top=b_top
    )
    local = linear_mlp.local_grads(ws, x, x_other, bs, relu=relu, context=context, kind=kind)
    return compare(case, local, linear_mlp.bp_grads(ws, x, x_other, b_top, relu=relu, kind=kind))


def non_orthogonal(
    x: torch.Tensor, x_other: torch.Tensor, *, seed: int = 0, reg: float = 0.01,
    kind: str = "softplus", depth: int = MLP_DEPTH,
) -> list[Row]:
    """Case ``non-orthogonal``: Gaussian weights, optimal ``B_l``."""
    width = _check_mlp_views(x, x_other, depth)
    ws = mlp_weights([width] * (depth + 1), _generator(seed, 3), kind="gaussian")
    return _fitted_case("non-orthogonal", ws, x, x_other, relu=False, context="same", reg=reg,
                        kind=kind)


def relu(
    x: torch.Tensor, x_other: torch.Tensor, *, seed: int = 0, reg: float = 0.01,
    kind: str = "softplus", depth: int = MLP_DEPTH,
) -> list[Row]:
    """Case ``relu``: ReLU MLP, orthonormal weights with gain ``sqrt(2)``, optimal ``B_l``."""
    width = _check_mlp_views(x, x_other, depth)
    ws = mlp_weights([width] * (depth + 1), _generator(seed, 4), gain=2.0**0.5)
    return _fitted_case("relu", ws, x, x_other, relu=True, context="same", reg=reg, kind=kind)


def direct_feedback(
    x: torch.Tensor, x_other: torch.Tensor, *, seed: int = 0, reg: float = 0.01,
    kind: str = "softplus", widths: tuple[int, ...] = SHRINKING_WIDTHS,
) -> list[Row]:
    """Cases ``shrinking-same`` and ``shrinking-top``: semi-orthogonal linear MLP with layer
    ``widths`` (default 128-64-32-16-8-4) on inputs ``x`` (``(N, d_0)``).

    With orthonormal rows, ``z_l = M_l^T z_L + z_perp`` where ``z_perp`` is invisible to the top.
    With top context the score is ``z_L^T (M_l B_l) c_L + z_perp^T B_l c_L``; when ``z_perp``
    carries no information on the top activities, the second term only adds zero-mean noise to the
    score, so the population optimum is ``B_l = M_l^T B_L`` (exact). With same-layer context,
    ``z_perp^T B_l z'_perp`` is informative (the views share their ``z_perp``), and the optimum
    departs from BP's ``M_l^T B_L M_l``. On a finite batch the fitted top-context ``B_l`` also picks
    up chance correlations of ``z_perp`` with ``c_L``, which shrink with the batch size:
    :func:`run_all` therefore uses 2048 pairs here (``d_l x 4`` entries per ``B_l``).
    """
    _check_mlp_views(x, x_other, len(widths))
    ws = mlp_weights([x.shape[1], *widths], _generator(seed, 5))
    rows = []
    for context in ("same", "top"):
        rows += _fitted_case(f"shrinking-{context}", ws, x, x_other, relu=False,
                             context=context, reg=reg, kind=kind)
    return rows


def spatial_dependence(
    x: torch.Tensor, x_other: torch.Tensor, *, seed: int = 0, reg: float = 0.01,
    kind: str = "softplus",
) -> list[Row]:
    """Cases ``conv-global-pool``, ``conv-pool-1`` and ``conv-pool-2111`` (linear CNN)."""
    if x.dim() != 4 or x.shape != x_other.shape or x.shape[2:] != (CONV_SIZE, CONV_SIZE):
        raise ValueError(f"CNN views must both be (N, C, {CONV_SIZE}, {CONV_SIZE}), got "
                         f"{tuple(x.shape)} and {tuple(x_other.shape)}")
    ks = conv_weights(x.shape[1], CONV_CHANNELS, CONV_LAYERS, _generator(seed, 6))
    z_top = linear_cnn.forward(ks, x)[-1].flatten(1)
    c_top = linear_cnn.forward(ks, x_other)[-1].flatten(1)
    b_top = fit_b(z_top, c_top, reg=reg, kind=kind)
    bp = linear_cnn.bp_grads(ks, x, x_other, b_top, kind=kind)
    zs = linear_cnn.forward(ks, x)
    zo = linear_cnn.forward(ks, x_other)
    rows = []
    for case, pools in (
        ("conv-global-pool", GLOBAL_POOLS), ("conv-pool-1", POOL_1), ("conv-pool-2111", POOL_2111)
    ):
        bs = []
        for i, p in enumerate(pools):
            layer = i + 1
            if layer == CONV_LAYERS:
                bs.append(b_top)
            elif p == 1:
                bs.append(closed_form_b(linear_cnn.transfer(ks, layer, CONV_SIZE), b_top))
            else:
                zp = linear_cnn.pool(zs[layer], p).flatten(1)
                cp = linear_cnn.pool(zo[layer], p).flatten(1)
                bs.append(fit_b(zp, cp, reg=reg, kind=kind))
        local = linear_cnn.local_grads(ks, x, x_other, bs, list(pools), kind=kind)
        rows += compare(case, local, bp)
    return rows


def run_all(
    inputs: torch.Tensor | None = None,
    seed: int = 0,
    *,
    n_samples: int = 512,
    n_shrinking: int = 2048,
    n_maps: int = 256,
    reg: float = 0.01,
    kind: str = "softplus",
    lbfgs: bool = True,
    threads: int | None = None,
) -> list[Row]:
    """Every case, on synthetic Gaussian views (``inputs=None``) or on image patches.

    ``inputs``: images ``(N, C, H, W)`` in ``[0, 1]`` (or ``uint8``), at least 16x16; positive
    pairs are two patches of the same image (:mod:`locallearn.theory.data`). ``n_samples``
    pairs feed the MLP cases, ``n_shrinking`` pairs the direct-feedback cases (their optimal
    ``B_l`` are fitted on more pairs, see :func:`direct_feedback`) and ``n_maps`` pairs the CNN
    cases (fewer if there are fewer images). ``lbfgs=False`` skips the slower ``exact-lbfgs`` case.
    ``threads``: if given, torch's intra-op thread count for the run, restored afterwards (the
    problems are small; on a busy machine one thread can be several times faster than two).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    if threads is None:
        return _run_all(inputs, seed, n_samples, n_shrinking, n_maps, reg, kind, lbfgs)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_all(inputs, seed, n_samples, n_shrinking, n_maps, reg, kind, lbfgs)
    finally:
        torch.set_num_threads(before)


def _run_all(
    inputs: torch.Tensor | None, seed: int, n_samples: int, n_shrinking: int, n_maps: int,
    reg: float, kind: str, lbfgs: bool,
) -> list[Row]:
    if min(n_samples, n_shrinking, n_maps) < 2:
        raise ValueError(
            f"need at least 2 samples, got n_samples={n_samples}, n_shrinking={n_shrinking}, "
            f"n_maps={n_maps}"
        )
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    gen = _generator(seed, 0)
    if inputs is None:
        x, xo = data.gaussian_vectors(n_samples, MLP_WIDTH, gen)
        xs, xso = data.gaussian_vectors(n_shrinking, MLP_WIDTH, gen)
        xc, xco = data.gaussian_images(n_maps, 3, CONV_SIZE, gen)
    else:
        images = data.check_images(inputs, CONV_SIZE)
        x, xo = data.image_vectors(images, n_samples, MLP_WIDTH, gen)
        xs, xso = data.image_vectors(images, n_shrinking, MLP_WIDTH, gen)
        xc, xco = data.image_maps(images, n_maps, gen, patch=CONV_SIZE)
    return [
        *exactness(x, xo, seed=seed, reg=reg, kind=kind, lbfgs=lbfgs),
        *random_b(x, xo, seed=seed, reg=reg, kind=kind),
        *non_orthogonal(x, xo, seed=seed, reg=reg, kind=kind),
        *relu(x, xo, seed=seed, reg=reg, kind=kind),
        *direct_feedback(xs, xso, seed=seed, reg=reg, kind=kind),
        *spatial_dependence(xc, xco, seed=seed, reg=reg, kind=kind),
    ]
