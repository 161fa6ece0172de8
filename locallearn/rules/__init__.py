"""Learning rules. Each fills ``.grad`` of the parameters it trains; an optimiser steps.

``build_rule(cfg)`` makes a rule from its config section; every rule is listed here, in one place
(rule modules never import this package); :func:`register` adds one at run time.

A rule outside the package: an installed package that declares an entry point in the group
``locallearn.rules`` (``NAME = "module:Class"``) adds ``rule.name=NAME`` in every process (runs,
sweep workers, resumed runs), loaded the first time a rule is looked up. A plugin cannot replace a
rule of the package; one that fails to import is reported, in one line, when its name is used.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any

from locallearn.config import from_dict
from locallearn.rules.backprop import Backprop, BackpropNoMask
from locallearn.rules.base import Batch, NoOptions, Rule
from locallearn.rules.feedback import DirectFeedback
from locallearn.rules.image_bp import BPSSL
from locallearn.rules.image_infonce import LayerwiseInfoNCE
from locallearn.rules.image_local import FFRule, LocalImageRule
from locallearn.rules.latent import LatentPrediction
from locallearn.rules.latent_stacked import LatentStacked
from locallearn.rules.layerwise import Layerwise
from locallearn.rules.lpl import LPL
from locallearn.rules.scff import SCFF
from locallearn.rules.softhebb import SoftHebb
from locallearn.rules.token import TokenPrediction

__all__ = ["Batch", "Rule", "Backprop", "BackpropNoMask", "DirectFeedback", "Layerwise",
           "build_rule", "check_rule_config", "register", "registered", "rule_class",
           "rule_options"]

#: ``rule.name`` -> the rule's class (every rule of the package, in one place)
_RULES: dict[str, type[Rule]] = {
    "backprop": Backprop,
    "backprop-nomask": BackpropNoMask,
    "dfa": DirectFeedback,
    "drtp": DirectFeedback,
    "sign-dfa": DirectFeedback,
    "layerwise": Layerwise,
    "clapp-image": LocalImageRule,
    "ff": FFRule,
    "bp-ssl": BPSSL,
    "infonce-image": LayerwiseInfoNCE,
    "latent-prediction": LatentPrediction,
    "latent-stacked": LatentStacked,
    "token-prediction": TokenPrediction,
    "softhebb": SoftHebb,
    "scff": SCFF,
    "lpl": LPL,
}


#: the entry-point group of rules from installed packages
PLUGIN_GROUP = "locallearn.rules"
#: plugin name -> why it could not be loaded
_BROKEN: dict[str, str] = {}
_plugins_loaded = False


def _load_plugins() -> None:
    """Add the rules of the entry-point group :data:`PLUGIN_GROUP` (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=PLUGIN_GROUP):
        if point.name in _RULES:  # the package's own rule wins
            continue
        try:
            cls = point.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not stop other runs
            first = (str(err).splitlines() or [""])[0]
            _BROKEN[point.name] = f"{type(err).__name__}: {first}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            _BROKEN[point.name] = f"{point.value} is not a subclass of locallearn.rules.base.Rule"
            continue
        _RULES[point.name] = cls


def image_rule_names(view_kinds: tuple[str, ...]) -> list[str]:
    """Names of the label-free rules whose ``view_kind`` is one of ``view_kinds`` (the rules an
    image task can train)."""
    _load_plugins()
    return [name for name, cls in _RULES.items()
            if not cls.uses_labels and cls.view_kind in view_kinds]


def register(name: str, rule: type[Rule]) -> None:
    """Make ``rule.name=<name>`` build ``rule`` (its ``Options`` and ``from_config``)."""
    _RULES[name] = rule


def registered() -> list[str]:
    """Names accepted by ``rule.name``."""
    _load_plugins()
    return list(_RULES)


def rule_class(name: str) -> type[Rule]:
    """The class of ``rule.name=<name>``; an unknown name is a ValueError."""
    _load_plugins()
    if _BROKEN.get(name):
        raise ValueError(f"rule.name={name!r}: the entry point of its package ({PLUGIN_GROUP}) "
                         f"failed to load: {_BROKEN[name]}")
    if name not in _RULES:
        raise ValueError(f"rule.name={name!r} is unknown; valid: {', '.join(_RULES)}")
    return _RULES[name]


def rule_options(cfg: Any) -> Any:
    """The typed ``rule.options`` of config section ``cfg`` (checked against the rule's
    ``Options`` dataclass: an unknown key or a bad value is a one-line ValueError)."""
    cls = rule_class(cfg.name)
    options = cfg.options or {}
    if cls.Options is NoOptions and options:
        key = next(iter(options))
        raise ValueError(
            f"rule.options.{key} is not an option of rule.name={cfg.name}: it takes no options"
        )
    return from_dict(cls.Options, options, "rule.options.")


def check_rule_config(cfg: Any) -> None:
    """Check the rule section ``cfg``: its options against the rule's ``Options`` dataclass,
    then the rule is made once so that its own value checks run (before any data is loaded)."""
    cls = rule_class(cfg.name)
    options = rule_options(cfg)
    cls.from_config(cfg, options, 0)
    cfg.options = dataclasses.asdict(options)  # every option written down, defaults included


def build_rule(cfg: Any, seed: int = 0, **task_info: Any) -> Rule:
    """A rule from its config section (``cfg.name`` and ``cfg.options``).

    ``task_info`` carries facts of the task a rule may need (``s``: the RHM branching factor).
    The section is checked (:func:`check_rule_config`) on a copy; bad values are ValueErrors.
    """
    cfg = dataclasses.replace(cfg, options=dict(cfg.options or {}))
    check_rule_config(cfg)
    return rule_class(cfg.name).from_config(cfg, rule_options(cfg), seed, **task_info)
