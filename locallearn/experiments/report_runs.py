"""The runs of a sweep folder as ``locallearn report`` sees them: loading, numbers, layout.

:func:`load_runs` reads the recorded runs (their summaries and configs) of a sweep folder;
:func:`layout` decides which axes name the rule, the training size, the dataset and the sections
(see :mod:`locallearn.experiments.report`); the numbers (means over seeds, the sample complexity
``crossing``) are the report's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.experiments.results import ResultsStore
from locallearn.experiments.sweep_spec import record_path, value_label

SIZE_AXIS = "data.train_size"
DATASET_AXES = ("dataset", "data", "data.name")


@dataclass
class Run:
    """One recorded run as the report sees it."""

    values: dict[str, str]  # axis -> value label
    seed: int
    row: dict[str, Any]
    summary: dict[str, Any]
    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        value = self.row.get(key)
        return self.summary.get(key) if value is None else value


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- numbers
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (sample) standard deviation; std 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def fmt_mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± std`` of the values that are present, ``-`` when none is."""
    present = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not present:
        return "-"
    mean, std = mean_std(present)
    if abs(mean) >= 100:
        return f"{mean:.0f} ± {std:.0f}" if len(present) > 1 else f"{mean:.0f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(present) > 1 else f"{mean:.{digits}f}"


def crossing(points: Sequence[tuple[float, float]], target: float) -> tuple[float | None, bool]:
    """The smallest ``P`` whose error reaches ``target``, from ``(P, error)`` points.

    Returns ``(P, censored)``: interpolated linearly in the error against ``log P`` between the
    last grid point above the target and the first one at or below it; ``censored`` is True when
    the smallest ``P`` already reaches it (the value is then an upper bound); ``(None, False)``
    when no point reaches it.
    """
    pts = sorted(points)
    for i, (p, err) in enumerate(pts):
        if err <= target:
            if i == 0:
                return p, True
            p0, e0 = pts[i - 1]
            if e0 == err:
                return p, False
            frac = (e0 - target) / (e0 - err)
            return math.exp(math.log(p0) + frac * (math.log(p) - math.log(p0))), False
    return None, False


def fmt_complexity(per_seed: Sequence[tuple[float | None, bool]], unit: float) -> str:
    """Sample complexity over seeds in units of ``unit`` (``P*``): geometric mean [min-max]."""
    reached = [(p / unit, c) for p, c in per_seed if p is not None]
    n, k = len(per_seed), len(reached)
    if not reached:
        return "not reached"
    xs = [x for x, _ in reached]
    geo = math.exp(sum(math.log(x) for x in xs) / k)
    mark = "≤ " if all(c for _, c in reached) else ""
    text = f"{mark}{geo:.2g}"
    if k > 1 and f"{min(xs):.2g}" != f"{max(xs):.2g}":
        text += f" [{min(xs):.2g}–{max(xs):.2g}]"
    if any(c for _, c in reached) and mark == "":
        text += " (some seeds ≤ smallest P)"
    if k < n:
        text += f" ({k}/{n} seeds; {n - k} not reached)"
    elif n > 1:
        text += f" ({n} seeds)"
    return text


# ---------------------------------------------------------------------------------- loading
def axis_label(value: Any) -> str:
    return "-" if value is None else value_label(value)


def sweep_doc(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's record in ``DIR`` (:func:`record_path`), or an empty mapping."""
    path = record_path(sweep_dir)
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return doc if isinstance(doc, dict) else {}


def sweep_axes_of(sweep_dir: Path) -> list[dict[str, Any]]:
    """The axes as ``sweep.yaml`` describes them, or none."""
    axes = sweep_doc(sweep_dir).get("axes", [])
    if not isinstance(axes, list):
        return []
    return [a for a in axes if isinstance(a, dict) and "name" in a]


def value_order(sweep_axes: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {a["name"]: [str(v) for v in a.get("values", [])] for a in sweep_axes}


def rule_like_axes(sweep_axes: list[dict[str, Any]]) -> set[str]:
    """Axes of variants that set the rule (a ``rule`` key or a preset ``config``)."""
    out = set()
    for axis in sweep_axes:
        variants = axis.get("variants") or {}
        if any(isinstance(v, dict) and ("rule" in v or "config" in v) for v in variants.values()):
            out.add(axis["name"])
    return out


def load_runs(sweep_dir: Path) -> tuple[list[Run], list[tuple[str, str]], list[dict[str, Any]]]:
    """Recorded runs, axes and sessions of a sweep folder."""
    with ResultsStore(sweep_dir, create=False) as store:
        rows = store.rows()
        axes = store.axes()
        sessions = store.sessions()
    runs = []
    for row in rows:
        summary = json.loads(row.get("summary_json") or "{}")
        path = sweep_dir / row["run_dir"]
        config: dict[str, Any] = {}
        if (path / "config.yaml").is_file():
            try:
                config = yaml.safe_load((path / "config.yaml").read_text()) or {}
            except yaml.YAMLError:
                config = {}
        values = {name: axis_label(row.get(name)) for name, _ in axes}
        runs.append(Run(values, int(row.get("seed") or 0), row, summary, path, config))
    return runs, axes, sessions


def read_curve(path: Path) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl`` (skipping a torn last line)."""
    f = path / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_alignment(path: Path) -> list[dict[str, Any]]:
    """Rows ``{block, cosine_mean, cosine_std}`` of a run's ``alignment.json`` (or none)."""
    f = path / "alignment.json"
    if not f.is_file():
        return []
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError:
        return []
    rows = data.get("rows", data.get("blocks", [])) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict) and "block" in r and "cosine_mean" in r]


# ---------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Which axes name the rule, the size, the dataset and the sections."""

    rule: list[str]
    size: str | None
    dataset: str | None
    section: list[str]
    other: list[str]  # remaining axes of a grid point

    def rule_label(self, run: Run) -> str:
        if not self.rule:
            return str(run.get("rule") or "run")
        return " / ".join(run.values[a] for a in self.rule)

    def section_label(self, run: Run) -> str:
        return ", ".join(f"{a}={run.values[a]}" for a in self.section)


def layout(
    runs: Sequence[Run], axes: Sequence[tuple[str, str]], rule_like: set[str] | None = None
) -> Layout:
    """Classify the axes (see the module docstring); axes with one value are ignored.

    ``rule_like``: the axes of variants known to set the rule; when given, other axes of
    variants (an axis of RHM settings, say) make sections instead.
    """
    varying = [(n, k) for n, k in axes if len({r.values.get(n) for r in runs}) > 1
               or n == SIZE_AXIS]
    present = [(n, k) for n, k in varying if any(r.values.get(n) not in (None, "-") for r in runs)]
    size = SIZE_AXIS if any(n == SIZE_AXIS for n, _ in present) else None
    dataset = next((n for n, _ in present if n in DATASET_AXES), None)
    rule = [n for n, k in present
            if n not in (size, dataset) and (n.startswith("rule.") or (
                k == "variants" and (rule_like is None or n in rule_like)))]
    section = [n for n, _ in present if n not in rule and n not in (size, dataset)]
    if dataset is not None and not any(r.get("probe_accuracy") is not None for r in runs):
        section = [dataset] + section  # a dataset axis without probes: sections per dataset
        dataset = None
    return Layout(rule, size, dataset, section, [])


def ordered(labels: set[str], order: list[str] | None) -> list[str]:
    if order:
        known = [v for v in order if v in labels]
        return known + sorted(labels - set(known))
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def size_key(run: Run) -> float:
    size = run.get("train_size")
    return float(size) if isinstance(size, (int, float)) else 0.0
