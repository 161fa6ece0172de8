"""Learning rules. Each fills ``.grad`` of the parameters it trains; an optimiser steps.

``build_rule(cfg)`` makes a rule from its config section; every rule is listed here, in one place
(rule modules never import this package); :func:`register` adds one at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from locallearn.rules.backprop import Backprop, BackpropNoMask
from locallearn.rules.base import Batch, Rule
from locallearn.rules.feedback import DirectFeedback
from locallearn.rules.image_bp import build_bp
from locallearn.rules.image_local import build_ff, build_local
from locallearn.rules.layerwise import Layerwise

__all__ = ["Batch", "Rule", "Backprop", "BackpropNoMask", "DirectFeedback", "Layerwise",
           "build_rule", "register", "registered"]

Builder = Callable[..., Rule]

_BUILDERS: dict[str, Builder] = {
    "backprop": lambda cfg, seed, **task: Backprop(),
    "backprop-nomask": lambda cfg, seed, **task: BackpropNoMask(),
    "dfa": lambda cfg, seed, **task: DirectFeedback("dfa", seed),
    "drtp": lambda cfg, seed, **task: DirectFeedback("drtp", seed),
    "sign-dfa": lambda cfg, seed, **task: DirectFeedback("sign-dfa", seed),
    "layerwise": lambda cfg, seed, **task: Layerwise(
        loss=cfg.loss, view=cfg.view, f=cfg.f, negatives=cfg.negatives,
        temperature=cfg.temperature, s=task.get("s", 2), **cfg.options,
    ),
    "clapp-image": build_local,
    "ff": build_ff,
    "bp-ssl": build_bp,
}


def register(name: str, builder: Builder) -> None:
    """Make ``rule.name=<name>`` build a rule with ``builder(rule_config, seed, **task_info)``."""
    _BUILDERS[name] = builder


def registered() -> list[str]:
    """Names accepted by ``rule.name``."""
    return list(_BUILDERS)


def build_rule(cfg: Any, seed: int = 0, **task_info: Any) -> Rule:
    """A rule from its config section (``cfg.name`` and the rule's options).

    ``task_info`` carries facts of the task a rule may need (``s``: the RHM branching factor).
    """
    if cfg.name not in _BUILDERS:
        raise ValueError(f"rule.name={cfg.name!r} is unknown; valid: {', '.join(_BUILDERS)}")
    try:
        return _BUILDERS[cfg.name](cfg, seed, **task_info)
    except TypeError as err:
        raise ValueError(f"rule {cfg.name}: bad option: {err}") from None

