"""``rule.options`` of the image rules (:mod:`locallearn.rules.image_ssl`), as typed dataclasses,
and the checks of their values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from locallearn.rules.base import check_range

__all__ = ["BPOptions", "FFOptions", "LocalOptions", "SSLOptions", "STEPS"]

#: Values of ``rule.options.step`` of the layer-wise image rules.
STEPS = ("block", "summed")


@dataclass
class SSLOptions:
    """``rule.options`` shared by the image rules.

    Attributes:
        pool: ``auto`` (the paper's grids 8-4-4-4-2-2), ``global``, or pool sizes per block.
        score_norm: ``none`` sums scores over channels and grid positions (the paper);
            ``dims`` scales them by ``1/sqrt(D_z D_c)``.
        micro_batches: parts of the batch taken through the encoder one after the other (the
            same gradients; activation memory of one part).
        f: the function of the score loss: ``hinge`` (CLAPP), ``softplus``, ``linear`` or
            ``softplus-diff`` (:mod:`locallearn.losses`).
        negative_image: which other image of the batch is each anchor's negative: ``next`` or
            ``random``.
        negative_view: which view of the negative image: ``paper``, the pairing of the paper's
            public code, the next row of the views stacked ``[view 2; view 1]`` (the same view of
            the next image, except for the last image of each view, which gets the other view
            of image 0; needs ``negative_image=next``); ``same-view``, always the same view.
            Default (null): ``paper`` with ``negative_image=next``, ``same-view`` with
            ``random``.
    """

    pool: list[int] | str = "auto"
    score_norm: Literal["none", "dims"] = "none"
    micro_batches: int = 1
    f: Literal["hinge", "softplus", "linear", "softplus-diff"] = "hinge"
    negative_image: Literal["next", "random"] = "next"
    negative_view: Literal["paper", "same-view"] | None = None

    def validate(self) -> None:
        check_pool(self.pool)
        check_micro_batches(self.micro_batches)


@dataclass
class FFOptions(SSLOptions):
    """``rule.options`` of ``ff`` (``B`` is the identity, the context is the same block; ``f``
    defaults to ``softplus``).

    Attributes:
        step: ``block`` (backward per block, graph freed) or ``summed`` (one backward).
    """

    f: Literal["hinge", "softplus", "linear", "softplus-diff"] = "softplus"
    step: Literal["block", "summed"] = "block"


@dataclass
class LocalOptions(FFOptions):
    """``rule.options`` of ``clapp-image``.

    Attributes:
        context: ``same`` (CLAPP), ``top`` (direct feedback from the top block) or ``both``.
    """

    f: Literal["hinge", "softplus", "linear", "softplus-diff"] = "hinge"
    context: Literal["same", "top", "both"] = "same"


@dataclass
class BPOptions(SSLOptions):
    """``rule.options`` of ``bp-ssl`` (``pool``, ``micro_batches``, ``f`` and the negatives:
    ``loss=clapp`` only; of the pool sizes per block, the last is used).

    Attributes:
        loss: ``clapp`` (BP-CLAPP++: the score loss on the grid-pooled top block) or
            ``infonce`` (BP-InfoNCE).
        temperature: the InfoNCE temperature (``loss=infonce``).
        projection_dim: output size of the InfoNCE projection (default: the top block's
            channels, 1024 at full width).
    """

    loss: Literal["clapp", "infonce"] = "clapp"
    temperature: float = 0.1
    projection_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        applies = {"f": "clapp", "negative_image": "clapp", "negative_view": "clapp",
                   "temperature": "infonce"}
        defaults = BPOptions.__dataclass_fields__
        for key, loss in applies.items():
            if self.loss != loss and getattr(self, key) != defaults[key].default:
                raise ValueError(f"rule.options.{key}={getattr(self, key)!r} applies to "
                                 f"loss={loss} only, not loss={self.loss}; remove it")
        if self.projection_dim is not None:
            check_range("rule.options.projection_dim", self.projection_dim, 1)


def check_pool(pool: list[int] | str) -> None:
    if isinstance(pool, str):
        if pool not in ("auto", "global"):
            raise ValueError(
                f"rule.options.pool={pool!r} is invalid; valid: auto, global, or a list of "
                "pool sizes (one per block)"
            )
    elif not pool or any(p < 1 for p in pool):
        raise ValueError(f"rule.options.pool={pool!r} is invalid: pool sizes must be >= 1")


def check_micro_batches(parts: int) -> None:
    check_range("rule.options.micro_batches", parts, 1)


def check_choice(key: str, value: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{key}={value!r} is invalid for image rules; valid: {', '.join(valid)}")
