"""Sweeps: a grid of runs (configs x seeds), each trained into its own folder, results recorded.

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

Each run trains into ``DIR/runs/<name>``, with ``<name>`` made of the grid values
(``variant=dfa,data.train_size=2Pstar,seed=1``). A sweep started again skips the runs already
recorded in ``DIR/results.sqlite``, records finished runs that were not recorded yet, resumes the
interrupted ones from their checkpoints and starts the rest. Only the parent process writes the
results store, one row per run (``run_dir`` is unique), in a transaction as each run finishes.

Backends: ``local`` runs a pool of worker processes (spawned; each sets its number of torch
threads and trains one run at a time); ``workers=0`` trains in this process (for debugging).
``ray`` submits each run as a Ray task asking for its CPUs and GPUs, on a local Ray instance
started for the sweep or on an existing cluster (``ray_address``); on a cluster, the package must
be installed on every node and ``DIR`` must be on a filesystem every node sees at the same path.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.errors import RunError
from locallearn.experiments.config import deep_merge, load_yaml, parse_overrides

try:  # POSIX file locks; without them (Windows) a sweep cannot guard against a second sweep
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

SWEEP_KEYS = ("config", "base", "settings", "grid", "variants", "seeds", "description")
RUNS_DIR = "runs"
SWEEP_FILE = "sweep.yaml"
LOCK_FILE = ".sweep.lock"
RUN_LOCK = ".run.lock"
SUMMARY = "summary.json"  # the names train.py writes; kept here so importing stays light
CONFIG = "config.yaml"
MAX_NAME = 180

Event = Callable[[str], None]


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


def _scalar(text: str) -> Any:
    """A command-line value parsed as YAML (``3`` -> 3, ``2P*`` -> '2P*')."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` to ``(KEY, [V1, V2])``; a malformed item is a ValueError."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ValueError(f"--grid {item!r} is not of the form KEY=V1,V2,...")
    return key, [_scalar(v) for v in split_values(raw)]


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
    from locallearn.experiments.results import RESERVED_COLUMNS

    if name in ("seed", "seeds"):
        raise ValueError("the seed is not a grid axis: use seeds: [...] or --seeds 0,1,2")
    if name in RESERVED_COLUMNS:
        raise ValueError(
            f"grid axis {name!r} clashes with a column of the results; rename the axis"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise ValueError(f"grid axis {name!r} is invalid: use letters, digits, '_', '-', '.'")


def load_sweep(
    path: str | Path | None,
    grid: Sequence[str] = (),
    seeds: str | Sequence[Any] | None = None,
    overrides: Sequence[str] = (),
) -> SweepSpec:
    """Read a sweep file (or a run preset) and apply ``--grid``/``--seeds``/overrides."""
    spec = SweepSpec(overrides=list(overrides))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"sweep file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            msg = str(err).replace("\n", " ")
            raise ValueError(f"sweep file {str(path)!r} is not valid YAML: {msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"sweep file {str(path)!r} must hold a mapping")
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
    for item in grid:
        name, values = parse_grid_arg(item)
        existing = next((i for i, a in enumerate(spec.axes) if a.name == name), None)
        if existing is not None and spec.axes[existing].variants is not None:
            old = spec.axes[existing]
            assert old.variants is not None
            picked = [str(v) for v in values]
            missing = [v for v in picked if v not in old.variants]
            if missing:
                raise ValueError(
                    f"--grid {name}: variant {missing[0]!r} is unknown; valid: "
                    f"{', '.join(old.variants)}"
                )
            spec.axes[existing] = Axis(name, tuple(picked), {v: old.variants[v] for v in picked})
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
    return {item.partition("=")[0].strip(): item.partition("=")[2] for item in items}


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
def _size_check(cfg: Any, cache: dict[tuple, Any]) -> None:
    """RHM runs: the grammar is valid and the training size (maybe in P*) fits ``P_max``."""
    from locallearn.experiments.schema import resolve_size

    d = cfg.data
    if getattr(d, "name", None) != "rhm":
        return
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


def _resources(cfg: Any, threads: int) -> tuple[int, float]:
    device = str(cfg.device)
    gpus = 1.0 if device.startswith("cuda") else 0.0
    return threads, gpus


def expand(spec: SweepSpec, threads: int = 1) -> list[RunSpec]:
    """Every run of the sweep (grid points x seeds), each config loaded and checked.

    Raises a one-line ValueError naming the run and the key when a config is invalid.
    """
    from locallearn.experiments.config import to_dict
    from locallearn.experiments.schema import build_config

    base_cache: dict[Path | None, dict[str, Any]] = {}

    def base(path: Path | None) -> dict[str, Any]:
        if path not in base_cache:
            base_cache[path] = load_yaml(path) if path is not None else {}
        return copy.deepcopy(base_cache[path])

    overrides = parse_overrides(spec.overrides)
    runs: list[RunSpec] = []
    names: dict[str, RunSpec] = {}
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
        deep_merge(raw, copy.deepcopy(spec.settings))
        deep_merge(raw, copy.deepcopy(overrides))
        for part in parts:
            deep_merge(raw, copy.deepcopy(part))
        raw["seed"] = seed
        raw["progress"] = False
        run_values = {**values, "seed": seed}
        name = run_name(run_values)
        try:
            cfg = build_config(raw)
            _size_check(cfg, sizes)
        except ValueError as err:
            raise ValueError(f"run {name}: {err}") from None
        raw = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        cpus, gpus = _resources(cfg, threads)
        run = RunSpec(name, run_values, raw, cpus, gpus)
        if name in names:
            raise ValueError(f"two runs of the sweep get the folder name {name!r}")
        names[name] = run
        runs.append(run)
    return runs


def check_existing(runs: Sequence[RunSpec], out: str | Path) -> None:
    """Raise ValueError when a run folder under ``out`` holds a run of another config.

    Keys that only one of the two configs has are ignored (a config key added to the code since
    the run was made, with its default); every value both have must agree.
    """
    for run in runs:
        path = run.run_dir(out) / CONFIG
        if not path.is_file():
            continue
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # a torn write: the run starts again and rewrites it
        where = first_difference(old, run.raw)
        if where is not None:
            raise ValueError(
                f"{str(run.run_dir(out))!r} holds a run of another config (differs at {where}); "
                "use another --out or remove that folder"
            )


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


# ---------------------------------------------------------------------------------- workers
@contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` (POSIX ``flock``); yields whether it was taken."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def set_threads(threads: int) -> None:
    """Limit this process to ``threads`` CPU threads (before and after torch is imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _watch_parent(parent: int) -> None:
    """Exit this worker when its parent (the sweep) is gone, so no orphan keeps training."""

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


_STARTED: Any = None  # in a local worker: the queue where it announces each run it starts


def _worker_init(threads: int, parent: int, started: Any = None) -> None:
    global _STARTED
    _STARTED = started
    set_threads(threads)
    _watch_parent(parent)


def run_one(raw: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Train one run of a sweep into ``run_dir`` (resuming its checkpoint) and return its summary.

    Holds a lock on the run folder while training, so two processes never train the same run.
    A run that finished already (``summary.json`` present) returns its summary without training.
    """
    if threads is not None:
        set_threads(threads)
    from locallearn.experiments.schema import build_config
    from locallearn.train import run

    out = Path(run_dir)
    with file_lock(out / RUN_LOCK):
        summary_path = out / SUMMARY
        if summary_path.is_file():
            return json.loads(summary_path.read_text())
        return run(build_config(raw), out)


# ---------------------------------------------------------------------------------- the sweep
@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did."""

    total: int
    skipped: int = 0  # recorded before this call
    recorded_late: int = 0  # finished earlier, recorded now
    finished: int = 0  # trained (or resumed) and recorded now
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error)
    seconds: float = 0.0


class _LoadSampler:
    """Samples the 1-minute load average while the sweep runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.last = 0.0

    def sample(self) -> None:
        now = time.monotonic()
        if now - self.last < 5.0 and self.samples:
            return
        self.last = now
        try:
            self.samples.append(os.getloadavg()[0])
        except (AttributeError, OSError):  # pragma: no cover
            pass


def write_sweep_file(spec: SweepSpec, runs: Sequence[RunSpec], out: Path) -> None:
    """Write ``DIR/sweep.yaml``: the definition of the sweep as last started, and its runs."""
    doc = {
        "source": None if spec.source is None else str(spec.source),
        "config": None if spec.config is None else str(spec.config),
        "description": spec.description,
        "settings": spec.settings,
        "overrides": spec.overrides,
        "axes": [
            {"name": a.name, "kind": a.kind,
             "values": [value_label(v) for v in a.values]}
            | ({"variants": a.variants} if a.variants is not None else {})
            for a in spec.axes
        ],
        "seeds": spec.seeds,
        "runs": [r.name for r in runs],
    }
    tmp = out / (SWEEP_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, out / SWEEP_FILE)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    threads: int | None = None,
    retries: int = 2,
    on_event: Event | None = None,
    start_method: str = "spawn",
) -> SweepOutcome:
    """Run every run of ``spec`` into ``out`` not recorded yet, recording each as it finishes.

    Args:
        spec: the sweep (see :func:`load_sweep`).
        out: the sweep folder (``runs/``, ``results.sqlite``, ``sweep.yaml``).
        workers: local worker processes (``0``: train in this process); with ``ray``, the CPUs
            of a local Ray instance are ``workers * threads``.
        backend: ``local`` or ``ray``.
        ray_address: an existing Ray cluster (``ray`` backend); ``None`` starts a local one.
        threads: torch threads per run (default: the CPUs divided among the workers).
        retries: how many times a local run whose worker process died is started again.
        on_event: called with one line of text per event (start, finish, failure).
        start_method: how local workers start (``spawn``: fresh interpreters, safe with any
            threads in this process; ``fork`` starts faster where available).

    Raises:
        ValueError: a bad config, backend or option (nothing is started).
        RunError: some runs failed; the others finished and are recorded.
    """
    from locallearn.experiments.results import ResultsStore, code_version

    if backend not in ("local", "ray"):
        raise ValueError(f"backend {backend!r} is unknown; valid: local, ray")
    if workers < 0:
        raise ValueError(f"workers={workers} is invalid: must be >= 0")
    if backend == "ray" and workers == 0:
        raise ValueError("workers=0 (in-process) is for the local backend")
    in_process_threads = threads  # workers=0: change this process's threads only if asked
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if threads < 1:
        raise ValueError(f"threads={threads} is invalid: must be >= 1")
    if retries < 0:
        raise ValueError(f"retries={retries} is invalid: must be >= 0")
    import multiprocessing

    if start_method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start method {start_method!r} is unknown here; valid: "
            f"{', '.join(multiprocessing.get_all_start_methods())}"
        )
    emit = on_event or (lambda _msg: None)
    runs = expand(spec, threads)  # validates every config before anything starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with file_lock(out / LOCK_FILE, blocking=False) as locked:
        if not locked:
            raise ValueError(f"another sweep is running in {str(out)!r}")
        check_existing(runs, out)
        store = ResultsStore(out)
        store.set_axes([(a.name, a.kind) for a in spec.axes])
        write_sweep_file(spec, runs, out)
        version = code_version()
        outcome = SweepOutcome(total=len(runs))
        recorded = store.recorded_dirs()
        todo: list[RunSpec] = []
        for run in runs:
            rel = f"{RUNS_DIR}/{run.name}"
            if rel in recorded:
                outcome.skipped += 1
                continue
            summary_path = run.run_dir(out) / SUMMARY
            if summary_path.is_file():
                summary = _read_summary(summary_path)
                if summary is not None:
                    store.record(rel, run.values, summary, version)
                    outcome.recorded_late += 1
                    continue
            todo.append(run)
        emit(f"sweep: {len(runs)} runs; {outcome.skipped + outcome.recorded_late} recorded, "
             f"{len(todo)} to run ({backend}, workers={workers}, threads={threads})")
        sampler = _LoadSampler()
        sampler.sample()
        session = None
        if todo:
            session = store.start_session(backend, workers, threads, len(runs), len(todo))

        def done(run: RunSpec, summary: dict[str, Any]) -> None:
            inserted = store.record(f"{RUNS_DIR}/{run.name}", run.values, summary, version)
            outcome.finished += int(inserted)
            n = outcome.skipped + outcome.recorded_late + outcome.finished
            acc = summary.get("test_accuracy")
            shown = f"test_accuracy {acc:.3f}" if isinstance(acc, float) else ""
            emit(f"[{n}/{len(runs)}] finished {run.name} {shown} "
                 f"({float(summary.get('seconds') or 0):.0f} s)")

        def failed(run: RunSpec, err: BaseException) -> None:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            outcome.failed.append((run.name, msg))
            emit(f"failed {run.name}: {msg}")

        try:
            if not todo:
                pass
            elif backend == "ray":
                _run_ray(todo, out, workers, threads, ray_address, done, failed, sampler)
            elif workers == 0:
                for run in todo:
                    emit(f"start {run.name}")
                    try:
                        summary = run_one(run.raw, str(run.run_dir(out)), in_process_threads)
                    except Exception as err:  # noqa: BLE001 - a failed run, reported
                        failed(run, err)
                        continue
                    done(run, summary)
            else:
                _run_local(todo, out, workers, threads, retries, done, failed, emit, sampler,
                           start_method)
        finally:
            outcome.seconds = time.monotonic() - t0
            sampler.sample()
            if session is not None:
                store.end_session(session, outcome.finished, len(outcome.failed),
                                  sampler.samples)
            store.close()
    if outcome.failed:
        name, msg = outcome.failed[0]
        raise RunError(
            f"{len(outcome.failed)} of {len(runs)} runs failed (first: {name}: {msg}); the other "
            f"runs are recorded in {str(out / 'results.sqlite')!r}; start the sweep again to "
            "retry the failed ones"
        )
    return outcome


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_local(
    todo: list[RunSpec],
    out: Path,
    workers: int,
    threads: int,
    retries: int,
    done: Callable[[RunSpec, dict[str, Any]], None],
    failed: Callable[[RunSpec, BaseException], None],
    emit: Event,
    sampler: _LoadSampler,
    start_method: str = "spawn",
) -> None:
    """A pool of worker processes; a pool broken by a dead worker is started again."""
    import multiprocessing

    ctx = multiprocessing.get_context(start_method)
    pending = list(todo)
    deaths: dict[str, int] = {}
    while pending:
        started = ctx.Queue()
        in_flight: dict[str, RunSpec] = {}
        broken = False
        finished: set[str] = set()
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(pending)), mp_context=ctx,
            initializer=_worker_init, initargs=(threads, os.getpid(), started),
        )
        interrupted = True
        try:
            futures: dict[Future, RunSpec] = {
                pool.submit(_pool_task, run.raw, str(run.run_dir(out)), run.name): run
                for run in pending
            }
            remaining = set(futures)
            while remaining:
                ready, remaining = wait(remaining, timeout=2.0, return_when=FIRST_COMPLETED)
                sampler.sample()
                _drain(started, in_flight, pending, emit)
                for fut in ready:
                    run = futures[fut]
                    try:
                        summary = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as err:  # noqa: BLE001 - a failed run, reported
                        failed(run, err)
                        finished.add(run.name)
                        continue
                    done(run, summary)
                    finished.add(run.name)
            interrupted = False
        finally:
            if interrupted:  # Ctrl-C or an error here: stop the workers now (checkpoints stay)
                procs = list((getattr(pool, "_processes", None) or {}).values())
                for proc in procs:
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in procs:
                    proc.join(timeout=10)
                started.close()
            pool.shutdown(wait=True)
        _drain(started, in_flight, pending, emit)
        started.close()
        pending = [r for r in pending if r.name not in finished]
        if not broken:
            break
        dead = [name for name in in_flight if name not in finished]
        for name in dead:
            deaths[name] = deaths.get(name, 0) + 1
        emit(f"a worker process died (runs in flight: {', '.join(dead) or 'none'}); "
             "starting the pool again")
        keep = []
        for run in pending:
            if deaths.get(run.name, 0) > retries:
                failed(run, RunError(f"its worker process died {deaths[run.name]} times"))
            else:
                keep.append(run)
        pending = keep


def _drain(queue: Any, in_flight: dict[str, RunSpec], pending: list[RunSpec], emit: Event) -> None:
    by_name = {r.name: r for r in pending}
    while True:
        try:
            name = queue.get_nowait()
        except Exception:  # noqa: BLE001 - queue.Empty, or a queue closed with a dead worker
            return
        if name in by_name and name not in in_flight:
            in_flight[name] = by_name[name]
            emit(f"start {name}")


def _pool_task(raw: dict[str, Any], run_dir: str, name: str) -> dict[str, Any]:
    if _STARTED is not None:
        _STARTED.put(name)
    return run_one(raw, run_dir)


def _ray_task(raw: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    return run_one(raw, run_dir, threads)


def _run_ray(
    todo: list[RunSpec],
    out: Path,
    workers: int,
    threads: int,
    address: str | None,
    done: Callable[[RunSpec, dict[str, Any]], None],
    failed: Callable[[RunSpec, BaseException], None],
    sampler: _LoadSampler,
) -> None:
    """Each run as a Ray task asking for its CPUs and GPUs; results recorded as they come."""
    try:
        import ray
    except ImportError:
        raise ValueError(
            "backend ray needs Ray: pip install 'locallearn[ray]' (or ray[default])"
        ) from None
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs["num_cpus"] = workers * threads
        ray.init(address=address, **kwargs)
        started_here = True
    elif address is not None:
        raise ValueError("Ray is already initialised in this process; drop --ray-address")
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(_ray_task)
        refs: dict[Any, RunSpec] = {}
        for run in todo:
            gpus = run.gpus
            if run.raw.get("device") == "auto" and has_gpu:
                gpus = 1.0
            ref = task.options(
                num_cpus=run.cpus, num_gpus=gpus, max_retries=2, retry_exceptions=False,
                name=f"locallearn:{run.name}",
            ).remote(run.raw, str(run.run_dir(out).resolve()), run.cpus)
            refs[ref] = run
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=2.0)
                sampler.sample()
                for ref in ready:
                    run = refs[ref]
                    try:
                        summary = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - unwrap the task's own error
                        cause = getattr(err, "cause", None)
                        failed(run, cause if isinstance(cause, BaseException) else err)
                        continue
                    done(run, summary)
        except BaseException:
            for ref in waiting:  # an interrupted sweep leaves no task training on a cluster
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()
