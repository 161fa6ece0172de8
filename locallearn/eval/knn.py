"""A k-nearest-neighbour read-out of frozen features: the cheap probe of learning curves.

Protocol (fixed, no training, no randomness): the reference features (a labelled set) are
standardised with their own mean and standard deviation, the query features with the same
constants; both are scaled to unit length; each query takes the ``k`` references of highest cosine
similarity, and each of them votes for its class with weight ``exp(similarity / temperature)``;
the class with the largest total wins. This is the monitor of many self-supervised papers
(weighted k-NN, k = 20, temperature 0.07); it needs one forward pass over the two sets and one
matrix product, so it can run often during training.
"""

from __future__ import annotations

import torch

__all__ = ["knn_accuracy", "knn_predict"]


@torch.no_grad()
def knn_predict(
    ref: torch.Tensor,
    ref_labels: torch.Tensor,
    query: torch.Tensor,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class of every row of ``query`` (see the module docstring).

    Args:
        ref: reference features ``(N, D)``; ref_labels: their classes ``(N,)`` in
            ``0 .. n_classes - 1``.
        query: features ``(M, D)`` to classify.
        k: neighbours per query (at most ``N``).
        temperature: of the vote weights.
        chunk: queries per similarity product (bounds memory at ``chunk x N``).
    """
    if ref.ndim != 2 or query.ndim != 2 or ref.shape[1] != query.shape[1]:
        raise ValueError(f"k-NN: features must be (N, D) and (M, D), got {tuple(ref.shape)} "
                         f"and {tuple(query.shape)}")
    if ref.shape[0] != ref_labels.shape[0] or ref.shape[0] == 0:
        raise ValueError("k-NN: needs one label per reference and at least one reference")
    if k < 1 or not temperature > 0:
        raise ValueError(f"k-NN: k={k} must be >= 1 and temperature={temperature} > 0")
    ref = ref.float()
    mean = ref.mean(0)
    std = ref.std(0, unbiased=False).clamp_min(1e-6)
    ref_n = torch.nn.functional.normalize((ref - mean) / std, dim=1)
    k = min(k, ref.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        q = torch.nn.functional.normalize((query[start : start + chunk].float() - mean) / std,
                                          dim=1)
        sim, idx = (q @ ref_n.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], n_classes, device=q.device)
        votes.scatter_add_(1, ref_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else ref_labels.new_zeros(0)


def knn_accuracy(
    ref: torch.Tensor,
    ref_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Share of ``query`` rows whose k-NN prediction is their label (a fraction in [0, 1])."""
    pred = knn_predict(ref, ref_labels, query, n_classes, k, temperature)
    return float((pred == query_labels).float().mean()) if query_labels.numel() else 0.0
