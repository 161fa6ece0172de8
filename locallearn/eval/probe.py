"""Linear read-outs fitted on frozen features.

:func:`fit_linear_probe` is the full-batch probe used when the features of the whole training set
fit in memory (RHM): multinomial logistic regression with an L2 penalty, solved by L-BFGS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def batched_features(encode, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``encode(x)`` flattened to ``(N, D)``, computed in chunks without gradients."""
    chunks = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return torch.cat([encode(c).flatten(1) for c in chunks])


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    weight_decay: float = 1e-4,
    steps: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``logits = features @ W.T + b`` by full-batch L-BFGS on the cross-entropy.

    Features are standardised (mean 0, unit variance per dimension) inside the fit and the
    result folded back into ``W, b``, so the probe is invariant to the scale of the features.
    Deterministic for the same inputs.

    Returns:
        ``(W, b)`` of shapes ``(n_classes, D)`` and ``(n_classes,)``.
    """
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probe: features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match"
        )
    feats = features.detach().to(torch.float32)
    mean = feats.mean(0)
    std = feats.std(0, unbiased=False).clamp_min(1e-6)
    z = (feats - mean) / std
    d = z.shape[1]
    w = torch.zeros(n_classes, d, device=z.device, requires_grad=True)
    b = torch.zeros(n_classes, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.t() + b, labels) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_out = (w / std).detach()
    b_out = (b - (w / std) @ mean).detach()
    return w_out, b_out
