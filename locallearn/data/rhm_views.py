"""Two-view augmentations of RHM samples for self-supervised rules (on the tokens' device).

- ``synonyms``: each view redraws the lowest-level rule choices (``resample_synonyms`` at depth
  ``L``): the two views share every latent above the tokens. A label-free augmentation that uses
  knowledge of the generator; results with it are reported as such.
- ``synonyms-per-block``: one pair of views per block: for block ``l`` (1-based) both views
  redraw every rule choice that produces depth ``L - l + 1`` or beyond, so they share the latent
  symbol of the node that each of the block's positions covers (depth ``L - l``) and everything
  above it. Also uses knowledge of the generator.
- ``mask``: two copies of the sample with disjoint random subsets of positions hidden (each
  position hidden in view 1 with probability ``p``, in view 2 with probability ``p``, never in
  both); hidden columns hold the constant ``v**-0.5``.
"""

from __future__ import annotations

import torch

from locallearn.data.rhm import RHM

VIEW_KINDS = ("synonyms", "synonyms-per-block", "mask")


def two_views(
    rhm: RHM,
    tokens: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    whiten: bool = False,
    mask_fraction: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two one-hot encoded views ``(N, v, s**L)`` of the same samples."""
    if kind == "synonyms":
        t1 = rhm.resample_synonyms(tokens, rhm.L, generator)
        t2 = rhm.resample_synonyms(tokens, rhm.L, generator)
        return rhm.one_hot(t1, whiten), rhm.one_hot(t2, whiten)
    if kind == "mask":
        u = torch.rand(tokens.shape, generator=generator, device=generator.device).to(tokens.device)
        hide1 = u < mask_fraction
        hide2 = (u >= mask_fraction) & (u < 2 * mask_fraction)
        return rhm.one_hot(tokens, whiten, mask=hide1), rhm.one_hot(tokens, whiten, mask=hide2)
    raise ValueError(f"view {kind!r} is unknown; valid: {', '.join(VIEW_KINDS)}")


def block_view_pairs(
    rhm: RHM, tokens: torch.Tensor, generator: torch.Generator, whiten: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``L`` pairs of one-hot views; pair ``l - 1`` keeps the latents at depths ``<= L - l``."""
    pairs = []
    for block in range(1, rhm.L + 1):
        k = rhm.L - block + 1
        t1 = rhm.resample_synonyms(tokens, k, generator)
        t2 = rhm.resample_synonyms(tokens, k, generator)
        pairs.append((rhm.one_hot(t1, whiten), rhm.one_hot(t2, whiten)))
    return pairs
