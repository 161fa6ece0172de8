"""Typed configs: dataclasses loaded from YAML with ``key=value`` overrides.

A config file is a YAML mapping; ``base: other.yaml`` (a path relative to the file) merges the
file on top of another. Overrides use dotted keys (``data.m=4``, ``optim.lr=1e-3``). Values are
checked against the dataclass field types; an unknown key or a bad value raises a one-line
``ValueError`` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


def read_yaml_mapping(path: Path, what: str, mapping: str = "a mapping") -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: ``{}``); a missing file, invalid YAML or
    another kind of value is a one-line ValueError naming the file as ``what``."""
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        msg = str(err).replace("\n", " ")
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold {mapping}")
    return data


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following ``base:`` includes (a cycle of includes is a ValueError
    naming it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise ValueError(f"config includes form a cycle through base: ({cycle}); remove one "
                         "base: key")
    data = read_yaml_mapping(path, "config file", "a mapping of keys to values")
    base = data.pop("base", None)
    if base is not None:
        merged = load_yaml(path.parent / base, (*_chain, here))
        deep_merge(merged, data)
        return merged
    return data


def deep_merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``into`` recursively (mappings merge, other values replace)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def split_key_value(
    item: str, what: str = "override", form: str = "key=value"
) -> tuple[str, str]:
    """``"key=value"`` to ``("key", "value")`` (both stripped); a malformed item is a ValueError.

    The one ``key=value`` splitter of every command (overrides, ``rhm info`` parameters,
    ``results --filter``, ``sweep --grid``).
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{what} {item!r} is not of the form {form}")
    return key, raw.strip()


def parse_value(text: str) -> Any:
    """A command-line value parsed as a YAML scalar or list (``3`` -> 3, ``2P*`` -> ``'2P*'``)."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_key_values(items: Sequence[str], what: str = "override") -> dict[str, str]:
    """``["a=1", "b=x"]`` to a flat mapping of the raw (unparsed, stripped) values."""
    return dict(split_key_value(item, what) for item in items)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` to a nested mapping; values parsed as YAML scalars or lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, raw = split_key_value(item, "override")
        value = parse_value(raw)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = convert(hints[name], value, prefix + name)
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def convert(tp: Any, value: Any, key: str) -> Any:
    """Check and convert ``value`` to type ``tp`` (dataclass, Literal, Union, list, scalars)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is invalid; valid: {', '.join(map(str, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key)
            except ValueError as err:
                errors.append(str(err))
        names = " or ".join(_type_name(a) for a in args)
        raise ValueError(f"{key}={value!r} is invalid: expected {names}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} is invalid: expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}={value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}={value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}={value!r} is invalid: expected a string")
    if tp is Any:
        return value
    raise TypeError(f"config type {tp} of {key} is not supported")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a plain mapping (for YAML and JSON)."""
    return dataclasses.asdict(obj)


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key whose values differ in two configs (keys in both), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            if key in b:
                found = first_difference(a[key], b[key], f"{prefix}{key}.")
                if found is not None:
                    return found
        return None
    if a == b:
        return None
    return f"{prefix.rstrip('.') or 'config'}: {a!r} vs {b!r}"
