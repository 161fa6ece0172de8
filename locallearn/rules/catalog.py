"""What every rule reads, from the rules themselves: ``locallearn rules`` prints it.

For each registered rule: its description (the class docstring's first paragraph), whether it
sees labels, the views it takes, and its ``rule.options`` with their defaults and meanings, read
from the ``Options`` dataclass (its fields, and the ``Attributes:`` section of its docstring and
of the classes it extends).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any

from locallearn.rules.base import NoOptions, Rule

__all__ = ["OptionInfo", "RuleInfo", "describe"]


@dataclass
class OptionInfo:
    """One ``rule.options`` key: its default and its meaning."""

    name: str
    default: Any
    meaning: str


@dataclass
class RuleInfo:
    """What ``rule.name=<name>`` is and reads."""

    name: str
    summary: str
    uses_labels: bool
    view_kind: str | None
    options: list[OptionInfo]


_ATTRIBUTE = re.compile(r"^(\s+)([A-Za-z_][A-Za-z0-9_]*):\s*(.*)$")


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name -> text`` of the ``Attributes:`` sections of ``cls`` and the classes it extends
    (the nearest class's text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        if "Attributes:" not in doc:
            continue
        section = doc.split("Attributes:", 1)[1].splitlines()
        indent, name = None, None
        for line in section:
            match = _ATTRIBUTE.match(line)
            if match and (indent is None or len(match.group(1)) == indent):
                indent, name = len(match.group(1)), match.group(2)
                docs[name] = match.group(3).strip()
            elif name is not None and line.strip() and (indent is None or
                                                        len(line) - len(line.lstrip()) > indent):
                docs[name] += " " + line.strip()
            elif line.strip():
                break
    return docs


def _plain(text: str) -> str:
    """Docstring text as plain text: one line, cross-references and literals unmarked."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return " ".join(text.replace("``", "").split())


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe(rules: dict[str, type[Rule]]) -> list[RuleInfo]:
    """A :class:`RuleInfo` for every ``name -> class`` of ``rules``, in their order."""
    out = []
    for name, cls in rules.items():
        summary = _plain(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0])
        options: list[OptionInfo] = []
        if cls.Options is not NoOptions and dataclasses.is_dataclass(cls.Options):
            docs = _attribute_docs(cls.Options)
            options = [OptionInfo(f.name, _default(f), _plain(docs.get(f.name, "")))
                       for f in dataclasses.fields(cls.Options)]
        out.append(RuleInfo(name, summary, bool(cls.uses_labels), cls.view_kind, options))
    return out
