"""``locallearn report DIR``: a Markdown report of a sweep, with PNG figures.

Written to ``DIR/report.md`` with figures in ``DIR/figures/``:

- one table per section (a combination of the axes that are neither the rule nor the training
  size, e.g. ``data.L``): mean and standard deviation over seeds of each metric per grid point;
- RHM sweeps (runs with ``P_star``): test error against ``P/P*`` (log-log) per rule, and each
  rule's sample complexity, the smallest ``P`` whose test error reaches ``--target-error``,
  interpolated linearly in the error against ``log P`` between grid points, per seed, with its
  spread over seeds ("not reached" when the largest ``P`` does not reach it);
- RHM sweeps over several depths ``data.L``: the sample complexity against ``L`` per rule, with
  the scalings ``v m^3`` and ``n_c m^L`` drawn (:mod:`locallearn.experiments.depth_figure`);
- image sweeps (runs with ``probe_accuracy``): the rule x dataset table of linear-probe accuracy;
- learning curves from each run's ``metrics.jsonl`` (mean over seeds), per-layer alignment where a
  run folder holds ``alignment.json`` (rows ``{block, cosine_mean, cosine_std}``), and the PNGs of
  run folders that hold ``analysis.json`` (embedded as they are);
- the machine: hosts, workers, threads and the load average sampled while the sweep ran.

"Rule" axes are ``rule.*`` keys and the axes of named variants that set ``rule`` keys or a
preset ``config`` (as ``DIR/sweep.yaml`` records them; without it, every axis of variants), with
none, the summary's ``rule``; the "size" axis is ``data.train_size``; a "dataset" axis is
``dataset``, ``data`` or ``data.name``; the other axes make sections.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.experiments.depth_figure import depth_section, label_without_depth
from locallearn.experiments.results import ResultsStore
from locallearn.experiments.sweep_spec import SWEEP_FILE, value_label
from locallearn.experiments.synonym_figure import synonym_section

SIZE_AXIS = "data.train_size"
DATASET_AXES = ("dataset", "data", "data.name")
METRICS = (
    ("test_accuracy", "test acc"),
    ("best_test_accuracy", "best test acc"),
    ("probe_accuracy", "probe acc"),
    ("probe_top_accuracy", "top block probe"),
    ("probe_top_silent", "top block silent"),
    ("train_accuracy", "train acc"),
    ("seconds", "seconds"),
    ("peak_rss_mib", "peak RSS MiB"),
)
MAX_EMBEDDED = 12


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
def _label(value: Any) -> str:
    return "-" if value is None else value_label(value)


def _sweep_doc(sweep_dir: Path) -> dict[str, Any]:
    """``DIR/sweep.yaml`` (written by the sweep), or an empty mapping."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _sweep_axes(sweep_dir: Path) -> list[dict[str, Any]]:
    """The axes as ``sweep.yaml`` describes them, or none."""
    axes = _sweep_doc(sweep_dir).get("axes", [])
    if not isinstance(axes, list):
        return []
    return [a for a in axes if isinstance(a, dict) and "name" in a]


def _value_order(sweep_axes: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {a["name"]: [str(v) for v in a.get("values", [])] for a in sweep_axes}


def _rule_like(sweep_axes: list[dict[str, Any]]) -> set[str]:
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
        values = {name: _label(row.get(name)) for name, _ in axes}
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


def _ordered(labels: set[str], order: list[str] | None) -> list[str]:
    if order:
        known = [v for v in order if v in labels]
        return known + sorted(labels - set(known))
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _size_key(run: Run) -> float:
    size = run.get("train_size")
    return float(size) if isinstance(size, (int, float)) else 0.0


# ---------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_vs_size(
    sections: dict[str, dict[str, list[Run]]],
    path: Path,
    target: float,
    rule_order: list[str],
) -> Path:
    """Test error against ``P/P*`` (log-log), one panel per section, one line per rule."""
    plt = _plt()
    n = len(sections)
    fig, axs = plt.subplots(1, n, figsize=(5.8 * n, 4.6), squeeze=False)
    for ax, (title, by_rule) in zip(axs[0], sections.items()):
        floor = None
        chance_err = None
        for rule in rule_order:
            runs = by_rule.get(rule)
            if not runs:
                continue
            by_x: dict[float, list[float]] = {}
            for run in runs:
                x = run.get("train_size_over_P_star")
                acc = run.get("test_accuracy")
                if x is None or acc is None:
                    continue
                by_x.setdefault(float(x), []).append(1.0 - float(acc))
                test_size = run.get("test_size") or 0
                if test_size:
                    floor = 0.5 / test_size if floor is None else min(floor, 0.5 / test_size)
                chance = run.get("chance")
                if chance is not None:
                    chance_err = 1.0 - float(chance)
            if not by_x:
                continue
            xs = sorted(by_x)
            means = [mean_std(by_x[x])[0] for x in xs]
            stds = [mean_std(by_x[x])[1] for x in xs]
            lo = floor or 1e-4
            ys = [max(m, lo) for m in means]
            low = [y - max(m - s, lo) for y, m, s in zip(ys, means, stds)]
            high = [max(m + s, lo) - y for y, m, s in zip(ys, means, stds)]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", markersize=4, capsize=2,
                        label=rule)
        ax.axhline(target, color="black", linestyle=":", linewidth=1,
                   label=f"target {target:g}")
        if chance_err is not None:
            ax.axhline(chance_err, color="gray", linestyle="--", linewidth=1, label="chance")
        if floor is not None:
            ax.axhline(floor, color="lightgray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({float(r.get("train_size_over_P_star")) for rs in by_rule.values()
                        for r in rs if r.get("train_size_over_P_star") is not None})
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("P / P*")
        ax.set_ylabel("test error")
        ax.set_title(textwrap.fill(title or "all runs", 60), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axs[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(
    curves: dict[str, list[list[dict[str, Any]]]], path: Path, key: str, title: str,
    chance: float | None = None,
) -> Path | None:
    """Mean over seeds of ``key`` per epoch, one line per label; None when nothing to draw."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for label, runs in curves.items():
        by_epoch: dict[int, list[float]] = {}
        for rows in runs:
            for r in rows:
                if key in r and isinstance(r[key], (int, float)):
                    by_epoch.setdefault(int(r["epoch"]), []).append(float(r[key]))
        if not by_epoch:
            continue
        xs = sorted(by_epoch)
        ms = [mean_std(by_epoch[x]) for x in xs]
        ys = [m for m, _ in ms]
        ax.plot(xs, ys, label=label)
        ax.fill_between(xs, [m - s for m, s in ms], [m + s for m, s in ms], alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if chance is not None and key.endswith("accuracy"):
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def plot_alignment(groups: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path:
    """Cosine between each rule's update and backprop's, per block (mean over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, runs in groups.items():
        by_block: dict[Any, list[float]] = {}
        for rows in runs:
            for r in rows:
                by_block.setdefault(r["block"], []).append(float(r["cosine_mean"]))
        blocks = sorted(by_block, key=lambda b: (str(type(b)), b))
        ms = [mean_std(by_block[b]) for b in blocks]
        xs = list(range(len(blocks)))
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=2,
                    label=label)
        ax.set_xticks(xs, [str(b) for b in blocks])
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("block")
    ax.set_ylabel("cosine with the backprop update")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- markdown
def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.replace("P*", "Pstar"))
    return out.strip("-") or "all"


def _rhm_title(runs: Sequence[Run]) -> str:
    """``RHM v=.. n_c=.. m=.. s=.. L=.., P*=.., width .., N epochs`` of a section's runs."""
    run = runs[0]
    d = run.config.get("data", {}) if isinstance(run.config, dict) else {}
    if d.get("name") != "rhm":
        return ""
    width = run.config.get("net", {}).get("width")
    epochs = sorted({r.config.get("epochs") for r in runs if isinstance(r.config, dict)}
                    - {None})
    if len(epochs) > 1:
        budget = {float(r.config["epochs"]) * float(r.get("train_size_over_P_star") or 0)
                  for r in runs if r.config.get("epochs") is not None}
        text = f"{epochs[0]}–{epochs[-1]} epochs"
        if len(budget) == 1:
            text += f" (epochs x P/P* = {budget.pop():g})"
    else:
        text = f"{epochs[0] if epochs else '?'} epochs"
    return (f"RHM v={d.get('v')} n_c={d.get('n_classes')} m={d.get('m')} s={d.get('s')} "
            f"L={d.get('L')}, P*={run.get('P_star')}, width {width}, {text}")


def write_report(
    sweep_dir: str | Path, target_error: float = 0.1, out: str | Path | None = None
) -> Path:
    """Write the report of the sweep in ``sweep_dir``; return the path of the Markdown file."""
    if not 0.0 < target_error < 1.0:
        raise ValueError(f"target error {target_error} is invalid: must be in (0, 1)")
    sweep_dir = Path(sweep_dir)
    runs, axes, sessions = load_runs(sweep_dir)
    if not runs:
        raise ValueError(f"{str(sweep_dir)!r} has no recorded runs yet")
    report = Path(out) if out is not None else sweep_dir / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    figs = report.parent / "figures"
    figs.mkdir(exist_ok=True)

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, report.parent)).as_posix()

    sweep_axes = _sweep_axes(sweep_dir)
    lay = layout(runs, axes, _rule_like(sweep_axes) if sweep_axes else None)
    order = _value_order(sweep_axes)
    rule_labels = _ordered({lay.rule_label(r) for r in runs},
                           order.get(lay.rule[0]) if len(lay.rule) == 1 else None)
    section_labels = _ordered({lay.section_label(r) for r in runs}, None)
    by_section: dict[str, list[Run]] = {s: [] for s in section_labels}
    for run in runs:
        by_section[lay.section_label(run)].append(run)

    md: list[str] = [f"# Sweep report: {sweep_dir.name}", ""]
    description = _sweep_doc(sweep_dir).get("description")
    if description:
        md += [str(description).rstrip(".") + ".", ""]
    md.append(_overview(runs, axes, sessions, lay))

    # ---- tables per section
    metrics = [(k, name) for k, name in METRICS if any(r.get(k) is not None for r in runs)]
    md += ["", "## Results per grid point (mean ± std over seeds)", ""]
    for section in section_labels:
        srun = by_section[section]
        if section:
            md += [f"### {section}", ""]
        title = _rhm_title(srun)
        if title:
            md += [f"{title}.", ""]
        keys = lay.rule + [a for a in (lay.dataset, lay.size) if a]
        groups: dict[tuple[str, ...], list[Run]] = {}
        for run in sorted(srun, key=lambda r: (_rule_pos(lay, r, rule_labels), _size_key(r))):
            groups.setdefault(tuple(run.values[k] for k in keys), []).append(run)
        head = (keys or ["rule"]) + ["seeds"] + [name for _, name in metrics]
        rows = []
        for gkey, gruns in groups.items():
            label = list(gkey) if keys else [lay.rule_label(gruns[0])]
            rows.append(label + [str(len(gruns))] + [
                fmt_mean_std([r.get(k) for r in gruns], 1 if k in ("seconds", "peak_rss_mib")
                             else 3)
                for k, _ in metrics
            ])
        md += [md_table(head, rows), ""]

    # ---- RHM: error against P/P*, sample complexity
    rhm = [r for r in runs if r.get("P_star") is not None and r.get("test_accuracy") is not None]
    if rhm and lay.size is not None:
        md += _rhm_sections(lay, by_section, rule_labels, figs, rel, target_error)
        by_depth = label_without_depth(lay.rule, rhm)
        md += depth_section(rhm, by_depth, _ordered({by_depth(r) for r in rhm}, rule_labels),
                            figs, rel, target_error, crossing, md_table)

    # ---- images: rule x dataset
    probed = [r for r in runs if r.get("probe_accuracy") is not None]
    if probed:
        md += _image_table(lay, probed, order)

    # ---- learning curves
    md += ["## Learning curves", ""]
    any_curve = False
    for section in section_labels:
        srun = by_section[section]
        if lay.size is not None:  # the largest training set of the section
            top = max(_size_key(r) for r in srun)
            srun = [r for r in srun if _size_key(r) == top]
        curves: dict[str, list[list[dict[str, Any]]]] = {}
        for run in srun:
            label = lay.rule_label(run)
            if lay.dataset:
                label += f" / {run.values[lay.dataset]}"
            curves.setdefault(label, []).append(read_curve(run.path))
        key = "test_accuracy" if any("test_accuracy" in row for c in curves.values()
                                     for rows in c for row in rows) else "loss"
        name = f"curves_{_slug(section)}.png"
        size_note = ""
        if lay.size is not None:
            size_note = f", P = {srun[0].values[lay.size]} ({int(_size_key(srun[0]))} samples)"
        chance = srun[0].get("chance")
        path = plot_curves(curves, figs / name, key, f"{section or 'all runs'}{size_note}",
                           float(chance) if chance is not None else None)
        if path is not None:
            any_curve = True
            md += [f"{key.replace('_', ' ')} per epoch, mean ± std over seeds "
                   f"({section or 'all runs'}{size_note}):", "", f"![curves]({rel(path)})", ""]
    if not any_curve:
        md += ["No run has a metrics.jsonl with curves.", ""]
    md += _probe_curve_sections(lay, by_section, figs, rel)

    # ---- alignment and analyses
    aligned: dict[str, list[list[dict[str, Any]]]] = {}
    for run in runs:
        rows = read_alignment(run.path)
        if rows:
            label = " / ".join(v for v in [lay.rule_label(run), lay.section_label(run)] if v)
            aligned.setdefault(label, []).append(rows)
    if aligned:
        path = plot_alignment(aligned, figs / "alignment.png")
        md += ["## Alignment with backprop", "",
               "Cosine between each rule's update and the backprop update, per block "
               "(mean ± std over the runs that recorded it):", "", f"![alignment]({rel(path)})",
               ""]
    analysed = [r for r in runs if (r.path / "analysis.json").is_file()]
    if analysed:
        md += ["## Analyses", ""]
        shown = 0
        for run in analysed:
            pngs = sorted(run.path.glob("*.png"))
            if not pngs:
                md.append(f"- {run.row['run_dir']}: analysis.json (no figure)")
                continue
            if shown + len(pngs) > MAX_EMBEDDED:  # beyond the cap: one line per run
                links = ", ".join(f"[{png.stem}]({rel(png)})" for png in pngs)
                md.append(f"- {run.row['run_dir']}: {links}")
                continue
            for png in pngs:
                md += [f"{run.row['run_dir']} — {png.name}:", "", f"![{png.stem}]({rel(png)})", ""]
                shown += 1
        md.append("")
    report.write_text("\n".join(md).rstrip() + "\n")
    return report


def _rule_pos(lay: Layout, run: Run, labels: list[str]) -> int:
    label = lay.rule_label(run)
    return labels.index(label) if label in labels else len(labels)


def _overview(
    runs: Sequence[Run], axes: Sequence[tuple[str, str]], sessions: Sequence[dict[str, Any]],
    lay: Layout,
) -> str:
    lines = []
    axis_text = ", ".join(
        f"{name} ({len({r.values[name] for r in runs})} values)" for name, _ in axes
    ) or "none"
    seeds = sorted({r.seed for r in runs})
    total = sum(float(r.get("seconds") or 0) for r in runs)
    rss = [float(r.get("peak_rss_mib")) for r in runs if r.get("peak_rss_mib") is not None]
    versions = sorted({str(r.row.get("code_version")) for r in runs})
    hosts = sorted({str(r.get("host")) for r in runs})
    lines.append(f"{len(runs)} recorded runs; axes: {axis_text}; seeds: "
                 f"{', '.join(map(str, seeds))}.")
    lines.append("")
    lines.append(f"Training time, summed over runs: {total / 60:.1f} min; largest peak RSS of a "
                 f"run: {max(rss) if rss else float('nan'):.0f} MiB; hosts: {', '.join(hosts)}; "
                 f"code: {', '.join(versions)}.")
    if sessions:
        lines += ["", "Sessions of the sweep (load = 1-minute load average sampled while it "
                  "ran; compare with the CPU count):", ""]
        rows = []
        for s in sessions:
            rows.append([
                str(s.get("started_at") or "-"), str(s.get("host") or "-"),
                str(s.get("cpu_count") or "-"), str(s.get("backend") or "-"),
                str(s.get("workers")), str(s.get("threads")),
                f"{(s.get('seconds') or 0) / 60:.1f}", str(s.get("finished") or 0),
                str(s.get("failed") or 0),
                "-" if s.get("load_mean") is None else f"{s['load_mean']:.1f}",
                "-" if s.get("load_max") is None else f"{s['load_max']:.1f}",
            ])
        lines.append(md_table(
            ["started", "host", "CPUs", "backend", "workers", "threads", "minutes",
             "finished", "failed", "load mean", "load max"], rows))
    return "\n".join(lines)


def _rhm_sections(
    lay: Layout, by_section: dict[str, list[Run]], rule_labels: list[str], figs: Path,
    rel: Any, target: float,
) -> list[str]:
    md = ["## Test error against the training-set size", ""]
    panels: dict[str, dict[str, list[Run]]] = {}
    for section, srun in by_section.items():
        panel: dict[str, list[Run]] = {}
        for run in srun:
            if run.get("P_star") is not None:
                panel.setdefault(lay.rule_label(run), []).append(run)
        if panel:
            title = _rhm_title(srun) or section
            panels[title if not section else f"{section}: {title}"] = panel
    path = plot_error_vs_size(panels, figs / "error_vs_P.png", target, rule_labels)
    md += ["Test error (1 − test accuracy) against P/P*, log-log, mean ± std over seeds; "
           "errors of 0 are drawn at half a test sample (the light line).", "",
           f"![test error against P/P*]({rel(path)})", ""]
    md += [f"## Sample complexity (test error ≤ {target:g})", "",
           "Smallest P reaching the target, in units of P*, interpolated linearly in the error "
           "against log P between grid points, per seed; geometric mean over seeds "
           "[min–max]. '≤' marks a target already reached at the smallest P of the grid.", ""]
    for title, panel in panels.items():
        md += [f"{title}:", ""]
        rows = []
        for rule in rule_labels:
            truns = panel.get(rule)
            if not truns:
                continue
            p_star = float(truns[0].get("P_star"))
            per_seed = []
            for seed in sorted({r.seed for r in truns}):
                pts = [(float(r.get("train_size")), 1.0 - float(r.get("test_accuracy")))
                       for r in truns if r.seed == seed]
                per_seed.append(crossing(pts, target))
            best = min(1.0 - float(r.get("test_accuracy")) for r in truns)
            largest = max(float(r.get("train_size_over_P_star")) for r in truns)
            rows.append([rule, fmt_complexity(per_seed, p_star), f"{best:.3f}", f"{largest:g}"])
        md += [md_table(["rule", "P/P* at target", "lowest test error", "largest P/P*"], rows),
               ""]
    return md + synonym_section(panels, rule_labels, figs, rel, md_table)


def _probe_curve_sections(
    lay: Layout, by_section: dict[str, list[Run]], figs: Path, rel: Any
) -> list[str]:
    """Probe accuracy during training (runs with ``probe_every``), one figure per section."""
    from locallearn.experiments.probe_curves import curve_points, plot_probe_curves, random_level

    md: list[str] = []
    for section, srun in by_section.items():
        curves: dict[str, list[list[dict[str, Any]]]] = {}
        for run in srun:
            rows = read_curve(run.path)
            if curve_points(rows):
                label = lay.rule_label(run)
                if lay.dataset:
                    label += f" / {run.values[lay.dataset]}"
                curves.setdefault(label, []).append(rows)
        name = f"probe_curves_{_slug(section)}.png"
        path = plot_probe_curves(curves, figs / name, section or "all runs") if curves else None
        if path is None:
            continue
        if not md:
            md += ["## Probe accuracy during training", ""]
        level = random_level(curves)
        note = f" (random encoder: {100 * level:.1f} %)" if level is not None else ""
        md += [f"The probe of `probe_every`, mean ± std over seeds, against optimiser steps and "
               f"training seconds{note} ({section or 'all runs'}):", "",
               f"![probe curves]({rel(path)})", ""]
    return md


def _image_table(lay: Layout, runs: Sequence[Run], order: dict[str, list[str]]) -> list[str]:
    def dataset(run: Run) -> str:
        if lay.dataset is not None:
            return run.values[lay.dataset]
        d = run.config.get("data", {}) if isinstance(run.config, dict) else {}
        return str(d.get("name", "-"))

    names = _ordered({dataset(r) for r in runs}, order.get(lay.dataset or ""))
    rules = _ordered({lay.rule_label(r) for r in runs},
                     order.get(lay.rule[0]) if len(lay.rule) == 1 else None)
    rows = []
    for rule in rules:
        row = [rule]
        for name in names:
            vals = [r.get("probe_accuracy") for r in runs
                    if lay.rule_label(r) == rule and dataset(r) == name]
            vals = [100 * float(v) for v in vals if v is not None]
            row.append(f"{fmt_mean_std(vals, 1)} (n={len(vals)})" if vals else "-")
        rows.append(row)
    return ["## Linear-probe accuracy (%), rule x dataset", "",
            "Mean ± std over seeds of the linear probe on the frozen encoder.", "",
            md_table(["rule"] + names, rows), ""]
