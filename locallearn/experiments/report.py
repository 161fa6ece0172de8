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
- image sweeps (runs with ``probe_accuracy``): the rule x dataset table of linear-probe accuracy,
  and each trained run against the untrained encoder (``epochs=0``, or
  ``rule.options.plastic=false``) of its seed, network and
  data (the same initial weights): the probes' differences in points;
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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from locallearn.experiments.depth_figure import depth_section, label_without_depth
from locallearn.experiments.report_figures import plot_alignment, plot_curves, plot_error_vs_size
from locallearn.experiments.report_leaderboard import (
    against_untrained,
    budget_seconds,
    leaderboard,
)
from locallearn.experiments.report_runs import (
    Layout,
    Run,
    crossing,
    fmt_complexity,
    fmt_mean_std,
    layout,
    load_runs,
    md_table,
    ordered,
    read_alignment,
    read_curve,
    rule_like_axes,
    size_key,
    sweep_axes_of,
    sweep_doc,
    value_order,
)
from locallearn.experiments.synonym_figure import synonym_section

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


# ---------------------------------------------------------------------------------- markdown
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
    sweep_dir: str | Path, target_error: float = 0.1, out: str | Path | None = None,
    at_minutes: float | None = None,
) -> Path:
    """Write the report of the sweep in ``sweep_dir``; return the path of the Markdown file.

    ``at_minutes``: the leaderboard also gives each rule's learning-curve probe after that much
    training (default: the ``max_seconds`` its trained runs share, if they share one)."""
    if not 0.0 < target_error < 1.0:
        raise ValueError(f"target error {target_error} is invalid: must be in (0, 1)")
    if at_minutes is not None and not 0.0 < at_minutes < float("inf"):
        raise ValueError(f"at_minutes={at_minutes} is invalid: must be a number of minutes > 0")
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

    sweep_axes = sweep_axes_of(sweep_dir)
    lay = layout(runs, axes, rule_like_axes(sweep_axes) if sweep_axes else None)
    order = value_order(sweep_axes)
    rule_labels = ordered({lay.rule_label(r) for r in runs},
                           order.get(lay.rule[0]) if len(lay.rule) == 1 else None)
    section_labels = _section_labels(lay, runs)
    by_section: dict[str, list[Run]] = {s: [] for s in section_labels}
    for run in runs:
        by_section[lay.section_label(run)].append(run)

    md: list[str] = [f"# Sweep report: {sweep_dir.name}", ""]
    description = sweep_doc(sweep_dir).get("description")
    if description:
        md += [str(description).rstrip(".") + ".", ""]
    md.append(_overview(runs, axes, sessions, lay))

    probed = [r for r in runs if r.get("probe_accuracy") is not None]
    position = lambda r: _position(lay, r, rule_labels, section_labels)  # noqa: E731
    if probed:  # image sweeps: every rule in one table first
        at_seconds = 60 * at_minutes if at_minutes is not None else budget_seconds(probed)
        md += ["", *leaderboard(lay, probed, position, at_seconds)]
    md += _grid_tables(lay, runs, by_section, section_labels, rule_labels)

    # ---- RHM: error against P/P*, sample complexity
    rhm = [r for r in runs if r.get("P_star") is not None and r.get("test_accuracy") is not None]
    if rhm and lay.size is not None:
        md += _rhm_sections(lay, by_section, rule_labels, figs, rel, target_error)
        by_depth = label_without_depth(lay.rule, rhm)
        md += depth_section(rhm, by_depth, ordered({by_depth(r) for r in rhm}, rule_labels),
                            figs, rel, target_error, crossing, md_table)

    # ---- images: rule x dataset
    if probed:
        md += _image_table(lay, probed, order, rule_labels, section_labels)
        md += against_untrained(lay, probed, position)

    md += _curve_sections(lay, by_section, section_labels, figs, rel)
    md += _alignment_and_analyses(lay, runs, figs, rel)
    report.write_text("\n".join(md).rstrip() + "\n")
    return report


def _grid_tables(lay: Layout, runs: Sequence[Run], by_section: dict[str, list[Run]],
                 section_labels: list[str], rule_labels: list[str]) -> list[str]:
    """One table per section: mean ± std over seeds of each metric per grid point."""
    md: list[str] = []
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
        for run in sorted(srun, key=lambda r: (_rule_pos(lay, r, rule_labels), size_key(r))):
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
    return md


def _curve_sections(lay: Layout, by_section: dict[str, list[Run]], section_labels: list[str],
                    figs: Path, rel: Any) -> list[str]:
    """The learning curves of ``metrics.jsonl`` per section, then the probe curves."""
    md = ["## Learning curves", ""]
    any_curve = False
    for section in section_labels:
        srun = by_section[section]
        if lay.size is not None:  # the largest training set of the section
            top = max(size_key(r) for r in srun)
            srun = [r for r in srun if size_key(r) == top]
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
            size_note = f", P = {srun[0].values[lay.size]} ({int(size_key(srun[0]))} samples)"
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
    return md


def _alignment_and_analyses(lay: Layout, runs: Sequence[Run], figs: Path, rel: Any
                            ) -> list[str]:
    """The alignment figure (runs with ``alignment.json``) and the analyses' figures."""
    md: list[str] = []
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
    return md


def _section_labels(lay: Layout, runs: Sequence[Run]) -> list[str]:
    """The sections' labels in the order of their axes' values, numbers by value (``5e-4``
    before ``2e-3`` and ``0.001``, whatever their spelling), then the others by name."""
    def value_key(value: Any) -> tuple[int, float, str]:
        try:
            return 0, float(value), ""
        except (TypeError, ValueError):
            return 1, 0.0, str(value)

    labels: list[str] = []
    for run in sorted(runs, key=lambda r: [value_key(r.values.get(a)) for a in lay.section]):
        label = lay.section_label(run)
        if label not in labels:
            labels.append(label)
    return labels


def _position(
    lay: Layout, run: Run, rule_labels: list[str], section_labels: list[str]
) -> tuple[int, int]:
    """Where a run's row goes in the tables of rules by grid point: its rule, then section."""
    return _rule_pos(lay, run, rule_labels), section_labels.index(lay.section_label(run))


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
    from locallearn.experiments.probe_curves import curve_points, plot_probe_curves, random_levels

    md: list[str] = []
    for section, srun in by_section.items():
        curves: dict[str, list[list[dict[str, Any]]]] = {}
        networks: dict[str, str] = {}
        for run in srun:
            rows = read_curve(run.path)
            if curve_points(rows):
                label = lay.rule_label(run)
                if lay.dataset:
                    label += f" / {run.values[lay.dataset]}"
                curves.setdefault(label, []).append(rows)
                networks.setdefault(label, _network_name(run))
        name = f"probe_curves_{_slug(section)}.png"
        path = (plot_probe_curves(curves, figs / name, section or "all runs", networks)
                if curves else None)
        if path is None:
            continue
        if not md:
            md += ["## Probe accuracy during training", ""]
        levels = random_levels(curves, networks)
        note = ""
        if len(levels) == 1:
            note = f" (random encoder: {100 * next(iter(levels.values())):.1f} %)"
        elif levels:
            note = " (untrained networks: " + ", ".join(
                f"{net} {100 * v:.1f} %" for net, v in sorted(levels.items())) + ")"
        md += [f"The probe of `probe_every`, mean ± std over seeds, against optimiser steps and "
               f"training seconds{note} ({section or 'all runs'}):", "",
               f"![probe curves]({rel(path)})", ""]
    return md


def _network_name(run: Run) -> str:
    """The run's network as the figures name it: its kind, with the width where not 1."""
    net = run.config.get("net", {}) if isinstance(run.config, dict) else {}
    if not isinstance(net, dict) or "kind" not in net:
        return ""
    width = net.get("width_mult", 1.0)
    return str(net["kind"]) + (f" x{width:g}" if width not in (None, 1) else "")


def _image_table(
    lay: Layout, runs: Sequence[Run], order: dict[str, list[str]], rule_labels: list[str],
    section_labels: list[str],
) -> list[str]:
    """Probe accuracy per rule (a row per rule and grid point of the other axes, e.g. each
    learning rate of a grid: runs of different settings are never averaged) and dataset."""
    def dataset(run: Run) -> str:
        if lay.dataset is not None:
            return run.values[lay.dataset]
        d = run.config.get("data", {}) if isinstance(run.config, dict) else {}
        return str(d.get("name", "-"))

    names = ordered({dataset(r) for r in runs}, order.get(lay.dataset or ""))
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: _position(lay, r, rule_labels, section_labels)):
        groups.setdefault((lay.rule_label(run), lay.section_label(run)), []).append(run)
    rows = []
    for (rule, section), group in groups.items():
        row = [" / ".join(v for v in (rule, section) if v)]
        for name in names:
            vals = [r.get("probe_accuracy") for r in group if dataset(r) == name]
            vals = [100 * float(v) for v in vals if v is not None]
            row.append(f"{fmt_mean_std(vals, 1)} (n={len(vals)})" if vals else "-")
        rows.append(row)
    return ["## Linear-probe accuracy (%), rule x dataset", "",
            "Mean ± std over seeds of the linear probe on the frozen encoder"
            + (", per grid point of the other axes." if any(section_labels) else "."), "",
            md_table(["rule"] + names, rows), ""]
