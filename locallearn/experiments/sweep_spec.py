"""The specification of a sweep: a grid of runs (configs x seeds), read from a sweep file.

A sweep file is a YAML mapping with these keys (all optional):

- ``config`` (or ``base``): a run preset (path relative to the sweep file) every run starts from.
- ``settings``: run settings merged on top of the preset (a run-config mapping; dotted keys such as
  ``data.L: 2`` are allowed too).
- ``grid``: axes of the grid, in order. ``KEY: [v1, v2]`` sets one config key per run;
  ``NAME: {variant: {key: value, ...}, ...}`` is an axis of *named variants*, each setting several
  keys at once (and optionally its own ``config`` preset), e.g. a rule that needs
  ``rule.name=layerwise``, ``rule.loss=clapp`` and ``rule.view=synonyms``.
- ``variants``: shorthand for a grid axis of named variants called ``variant`` (placed first).
- ``seeds``: the seeds of every grid point (default ``[0]``).
- ``description``: free text.

A plain run preset (without those keys) is a sweep of one grid point. From the command line,
``--grid KEY=V1,V2`` adds or replaces an axis (for an axis of variants it picks variants by name),
``--seeds 0,1,2`` replaces the seeds and ``key=value`` overrides apply to every run. The config of
one run is: preset, then ``settings``, then the overrides, then the grid values, then its seed.

An axis may be any config key, ``epochs`` included: in the results its column holds the axis's
value (a summary entry of the same name stays in ``summary_json``).

This module reads the specification and expands it into runs (:func:`load_sweep`,
:func:`expand`); :mod:`locallearn.experiments.sweep` launches them.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.config import (
    deep_merge,
    first_difference,
    load_yaml,
    parse_key_values,
    parse_overrides,
    parse_value,
    read_yaml_mapping,
    split_key_value,
)
from locallearn.runfiles import CONFIG
from locallearn.schema import merge_layer, migrate_config, without_runtime_keys

SWEEP_KEYS = ("config", "base", "settings", "grid", "variants", "seeds", "description")
RUNS_DIR = "runs"
#: the record of a sweep as last started, written into its folder by the launcher
SWEEP_FILE = "sweep.yaml"
#: the record's name when the sweep file itself is ``DIR/sweep.yaml`` (never written over)
SWEEP_RECORD = "sweep-record.yaml"
MAX_NAME = 180


# ---------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Axis:
    """One axis of the grid: plain values of one config key, or named variants."""

    name: str
    values: tuple[Any, ...]
    #: variant name -> its settings (a nested run-config mapping, maybe with ``config``)
    variants: dict[str, dict[str, Any]] | None = None

    @property
    def kind(self) -> str:
        """``variants`` or ``values``."""
        return "values" if self.variants is None else "variants"


@dataclass
class SweepSpec:
    """What a sweep runs: a base config, the axes, the seeds and overrides for every run."""

    config: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    source: Path | None = None
    description: str = ""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its folder name, its grid values and its checked config mapping."""

    name: str
    values: dict[str, Any]  # axis name -> value (variant name for variant axes); plus "seed"
    raw: dict[str, Any]  # the whole run config as a mapping (build_config accepts it)
    cpus: int = 1
    gpus: float = 0.0

    @property
    def seed(self) -> int:
        return int(self.values["seed"])

    def run_dir(self, out: str | Path) -> Path:
        """The run's folder under the sweep folder ``out``."""
        return Path(out) / RUNS_DIR / self.name


def split_values(text: str) -> list[str]:
    """Split ``a,b,[c,d]`` at top-level commas (brackets and quotes keep theirs)."""
    out: list[str] = []
    depth = 0
    quote = ""
    cur = ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    if any(not v for v in out):
        raise ValueError(f"grid values {text!r} hold an empty value")
    return out


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` to ``(KEY, [V1, V2])``; a malformed item is a ValueError."""
    key, raw = split_key_value(item, "--grid", "KEY=V1,V2,...")
    if not raw:
        raise ValueError(f"--grid {item!r} is not of the form KEY=V1,V2,...")
    return key, [parse_value(v) for v in split_values(raw)]


def record_path(out: Path, source: Path | None = None) -> Path:
    """Where a sweep folder's record is: ``DIR/sweep-record.yaml`` when it exists or when the
    sweep file ``source`` is ``DIR/sweep.yaml`` itself (the user's file is never replaced),
    else ``DIR/sweep.yaml``."""
    out = Path(out)
    mine = out / SWEEP_FILE
    if (out / SWEEP_RECORD).exists() or (
            source is not None and mine.exists() and Path(source).resolve() == mine.resolve()):
        return out / SWEEP_RECORD
    return mine


def _is_preset_path(value: Any) -> bool:
    return str(value).endswith((".yaml", ".yml"))


def _variant_name(value: Any) -> str:
    """The variant a ``--grid`` value picks: its name, or the stem of a preset's path."""
    return Path(str(value)).stem if _is_preset_path(value) else str(value)


def preset_variants(axis: str, values: Sequence[Any], known: dict[str, Any]) -> dict[str, Any]:
    """The new variants that ``--grid AXIS=PATH.yaml`` adds to an axis of variants: each run
    preset file named becomes a variant called by the file's stem that starts from it (how a new
    rule enters a study's sweep with its own preset)."""
    added: dict[str, Any] = {}
    for value in values:
        if not _is_preset_path(value):
            continue
        path = Path(str(value)).resolve()
        name = path.stem
        if not path.is_file():
            raise ValueError(f"--grid {axis}: preset file {str(value)!r} does not exist")
        if name in known:
            raise ValueError(f"--grid {axis}: preset {str(value)!r} is named {name!r} like a "
                             "variant of the sweep; pick that variant by name or rename the file")
        added[name] = {"config": str(path)}
    return added


def parse_seeds(text: str | Sequence[Any]) -> list[int]:
    """``0,1,2`` (or a list) to a list of distinct non-negative seeds."""
    items = split_values(text) if isinstance(text, str) else list(text)
    seeds: list[int] = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"seed {item!r} is invalid: expected a non-negative integer") from None
        if seed < 0 or str(item).strip() not in (str(seed), f"+{seed}"):
            raise ValueError(f"seed {item!r} is invalid: expected a non-negative integer")
        if seed in seeds:
            raise ValueError(f"seed {seed} is given twice")
        seeds.append(seed)
    if not seeds:
        raise ValueError("seeds: need at least one seed")
    return seeds


def nest(mapping: dict[str, Any], what: str) -> dict[str, Any]:
    """A settings mapping with dotted keys (``rule.name: dfa``) as a nested mapping."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{what} must be a mapping of config keys to values, got {mapping!r}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: key {key!r} is not a config key")
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{what}: key {key!r} conflicts with another key")
        if isinstance(value, dict):
            value = nest(value, f"{what}.{key}")
            if isinstance(node.get(parts[-1]), dict):
                deep_merge(node[parts[-1]], value)
                continue
        node[parts[-1]] = value
    return out


def _variants(name: str, mapping: Any) -> Axis:
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"grid axis {name!r}: variants must be a non-empty mapping")
    variants = {}
    for vname, settings in mapping.items():
        vname = str(vname)
        if not vname or "/" in vname:
            raise ValueError(f"grid axis {name!r}: variant name {vname!r} is invalid")
        variants[vname] = nest(settings or {}, f"variant {vname!r}")
    return Axis(name, tuple(variants), variants)


def _values(name: str, values: Any) -> Axis:
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise ValueError(f"grid axis {name!r} has no values")
    labels = [value_label(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ValueError(f"grid axis {name!r} repeats a value: {values!r}")
    return Axis(name, tuple(values))


def _check_axis_name(name: str) -> None:
    import dataclasses

    from locallearn.experiments.results import RESERVED_COLUMNS
    from locallearn.schema import RunConfig

    if name in ("seed", "seeds"):
        raise ValueError("the seed is not a grid axis: use seeds: [...] or --seeds 0,1,2")
    config_keys = {f.name for f in dataclasses.fields(RunConfig)}
    if name in RESERVED_COLUMNS and name not in config_keys:
        raise ValueError(
            f"grid axis {name!r} clashes with a column of the results; rename the axis (an "
            f"axis of named variants sets config keys under any name)"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise ValueError(f"grid axis {name!r} is invalid: use letters, digits, '_', '-', '.'")


def _read_sweep_file(path: Path, spec: SweepSpec) -> None:
    """Fill ``spec`` from the sweep file (or run preset) at ``path``."""
    data = read_yaml_mapping(path, "sweep file")
    spec.source = path
    sweep_like = any(k in data for k in ("grid", "variants", "seeds", "settings", "config"))
    if not sweep_like:
        spec.config = path  # a run preset: one grid point
    else:
        unknown = [k for k in data if k not in SWEEP_KEYS]
        if unknown:
            raise ValueError(
                f"unknown sweep key {unknown[0]!r} in {str(path)!r}; valid: "
                f"{', '.join(SWEEP_KEYS)} (run settings go under settings:)"
            )
        if "config" in data and "base" in data:
            raise ValueError(f"sweep file {str(path)!r}: give config or base, not both")
        preset = data.get("config", data.get("base"))
        if preset is not None:
            spec.config = path.parent / str(preset)
            if not spec.config.is_file():
                raise ValueError(f"config {str(preset)!r} of {str(path)!r} does not exist")
        spec.settings = nest(data.get("settings") or {}, "settings")
        spec.description = str(data.get("description") or "")
        if "variants" in data:
            spec.axes.append(_variants("variant", data["variants"]))
        file_grid = data.get("grid") or {}
        if not isinstance(file_grid, dict):
            raise ValueError(f"grid of {str(path)!r} must be a mapping of axes")
        for name, values in file_grid.items():
            name = str(name)
            if any(a.name == name for a in spec.axes):
                raise ValueError(f"grid axis {name!r} is given twice")
            axis = _variants(name, values) if isinstance(values, dict) else _values(
                name, values
            )
            spec.axes.append(axis)
        if "seeds" in data:
            spec.seeds = parse_seeds(data["seeds"] if isinstance(data["seeds"], list)
                                     else str(data["seeds"]))


def load_sweep(
    path: str | Path | None,
    grid: Sequence[str] = (),
    seeds: str | Sequence[Any] | None = None,
    overrides: Sequence[str] = (),
) -> SweepSpec:
    """Read a sweep file (or a run preset) and apply ``--grid``/``--seeds``/overrides."""
    spec = SweepSpec(overrides=list(overrides))
    if path is not None:
        _read_sweep_file(Path(path), spec)
    for item in grid:
        name, values = parse_grid_arg(item)
        existing = next((i for i, a in enumerate(spec.axes) if a.name == name), None)
        if existing is not None and spec.axes[existing].variants is not None:
            old = spec.axes[existing]
            assert old.variants is not None
            variants = {**old.variants, **preset_variants(name, values, old.variants)}
            picked = [_variant_name(v) for v in values]
            missing = [v for v in picked if v not in variants]
            if missing:
                raise ValueError(
                    f"--grid {name}: variant {missing[0]!r} is unknown; valid: "
                    f"{', '.join(old.variants)}, or the path of a run preset (NAME.yaml)"
                )
            spec.axes[existing] = Axis(name, tuple(picked), {v: variants[v] for v in picked})
        elif existing is not None:
            spec.axes[existing] = _values(name, values)
        else:
            spec.axes.append(_values(name, values))
    if seeds is not None:
        spec.seeds = parse_seeds(seeds)
    for axis in spec.axes:
        _check_axis_name(axis.name)
    override_keys = set(parse_overrides_flat(spec.overrides))
    for axis in spec.axes:
        if axis.name in override_keys:
            raise ValueError(f"{axis.name} is both a grid axis and an override; keep one")
    return spec


def parse_overrides_flat(items: Sequence[str]) -> dict[str, str]:
    """``key=value`` overrides as a flat mapping (checked as ``parse_overrides`` does)."""
    parse_overrides(list(items))
    return parse_key_values(items)


# ---------------------------------------------------------------------------------- names
def value_label(value: Any) -> str:
    """How a grid value is written in folder names and tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")


def sanitise(text: str) -> str:
    """A folder-name-safe version of ``text`` (``P*`` -> ``Pstar``, other odd characters -> _)."""
    text = text.replace("P*", "Pstar").replace("*", "star")
    return _UNSAFE.sub("_", text)


def run_name(values: dict[str, Any]) -> str:
    """Folder name of a run from its grid values (``axis=value,...,seed=N``), sanitised."""
    name = ",".join(
        f"{sanitise(k)}={sanitise(value_label(v)).replace(',', '_')}" for k, v in values.items()
    )
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name[: MAX_NAME - 11] + "-" + digest
    return name


# ---------------------------------------------------------------------------------- expansion
def _size_check(cfg: Any, cache: dict[tuple, Any]) -> int | None:
    """RHM runs: the grammar is valid and the training size (maybe in P*) fits ``P_max``;
    returns that size in samples (``None`` for other data)."""
    from locallearn.schema import resolve_size

    d = cfg.data
    if getattr(d, "name", None) != "rhm":
        return None
    key = (d.v, d.n_classes, d.m, d.s, d.L, d.seed_rules)
    if key not in cache:
        from locallearn.data.rhm import RHM

        rhm = RHM(*key)  # checks the grammar's parameters (milliseconds)
        cache[key] = (rhm.P_star, rhm.P_max)
    p_star, p_max = cache[key]
    n = resolve_size(d.train_size, p_star, "data.train_size")
    if n < 1:
        raise ValueError(f"data.train_size={d.train_size!r} is invalid: gives no samples")
    if n + d.test_size > p_max:
        raise ValueError(
            f"data.train_size={d.train_size!r} ({n}) + data.test_size={d.test_size} is invalid: "
            f"must be <= P_max = {p_max}"
        )
    return n


def _resources(cfg: Any, threads: int) -> tuple[int, float]:
    device = str(cfg.device)
    gpus = 1.0 if device.startswith("cuda") else 0.0
    return threads, gpus


def expand(spec: SweepSpec, threads: int = 1) -> list[RunSpec]:
    """Every run of the sweep (grid points x seeds), each config loaded and checked.

    Raises a one-line ValueError naming the run and the key when a config is invalid.
    """
    from locallearn.config import to_dict
    from locallearn.schema import build_config

    base_cache: dict[Path | None, dict[str, Any]] = {}

    def base(path: Path | None) -> dict[str, Any]:
        if path not in base_cache:
            base_cache[path] = load_yaml(path) if path is not None else {}
        return copy.deepcopy(base_cache[path])

    overrides = parse_overrides(spec.overrides)
    runs: list[RunSpec] = []
    names: dict[str, RunSpec] = {}
    configs: dict[str, str] = {}  # the whole config, as text -> the name of its run
    sizes: dict[tuple, Any] = {}
    choices = [[(a, v) for v in a.values] for a in spec.axes]
    # seeds outermost: a sweep stopped half-way has whole grids of the first seeds
    for seed, point in itertools.product(spec.seeds, itertools.product(*choices)):
        preset = spec.config
        parts: list[dict[str, Any]] = []
        values: dict[str, Any] = {}
        for axis, value in point:
            values[axis.name] = value
            if axis.variants is not None:
                settings = copy.deepcopy(axis.variants[value])
                if "config" in settings:
                    cfg_path = settings.pop("config")
                    if spec.source is None:
                        raise ValueError(f"variant {value!r}: config paths need a sweep file")
                    preset = spec.source.parent / str(cfg_path)
                    if not preset.is_file():
                        raise ValueError(f"variant {value!r}: config {cfg_path!r} does not exist")
                parts.append(settings)
            else:
                parts.append(parse_overrides([f"{axis.name}={value_label(value)}"])
                             if not isinstance(value, (list, dict))
                             else nest({axis.name: value}, "grid"))
        raw = base(preset)
        merge_layer(raw, copy.deepcopy(spec.settings))
        merge_layer(raw, copy.deepcopy(overrides))
        for part in parts:
            merge_layer(raw, copy.deepcopy(part))
        raw["seed"] = seed
        raw["progress"] = False
        run_values = {**values, "seed": seed}
        name = run_name(run_values)
        try:
            cfg = build_config(raw)
            samples = _size_check(cfg, sizes)
        except ValueError as err:
            raise ValueError(f"run {name}: {err}") from None
        raw = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        same_as = copy.deepcopy(raw)  # what the run is: 1P* and the number it stands for agree
        if samples is not None:
            same_as["data"]["train_size"] = samples
        cpus, gpus = _resources(cfg, threads)
        run = RunSpec(name, run_values, raw, cpus, gpus)
        if name in names:
            raise ValueError(f"two runs of the sweep get the folder name {name!r}")
        same = configs.setdefault(json.dumps(same_as, sort_keys=True, default=str), name)
        if same != name:
            raise ValueError(
                f"runs {same} and {name} have the same config: the grid gives one value in two "
                "spellings (e.g. 1e-3 and 0.001, or a size in samples and in P*) or two variants "
                "that set the same; keep one"
            )
        names[name] = run
        runs.append(run)
    return runs


def check_existing(runs: Sequence[RunSpec], out: str | Path) -> None:
    """Raise ValueError when a run folder under ``out`` holds a run of another config.

    Configs saved by earlier versions are brought to today's layout first
    (:func:`locallearn.schema.migrate_config`).

    Keys that only one of the two configs has are ignored (a config key added to the code since
    the run was made, with its default), and so are the runtime keys (``threads``, ``device``,
    ... :data:`locallearn.schema.RUNTIME_KEYS`), which a run may change when it resumes; every
    other value both have must agree.
    """
    for run in runs:
        path = run.run_dir(out) / CONFIG
        if not path.is_file():
            continue
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # a torn write: the run starts again and rewrites it
        if not isinstance(old, dict):
            continue
        where = first_difference(without_runtime_keys(migrate_config(old)),
                                 without_runtime_keys(run.raw))
        if where is not None:
            raise ValueError(
                f"{str(run.run_dir(out))!r} holds a run of another config (differs at {where}); "
                "use another --out or remove that folder"
            )
