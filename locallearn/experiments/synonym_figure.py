"""Unseen-synonym probes against the training-set size: a frontier figure of ``locallearn report``.

For RHM sweeps whose run folders hold ``analysis.json`` (written by ``locallearn analyze``, which
takes a sweep folder): per rule, depth section and layer, the accuracy of the probe that reads the
symbol of a layer's own node after being fitted and scored on *disjoint* synonyms (the
``split=synonyms`` rows of :func:`locallearn.eval.rhm_measures.latent_probes`), against ``P/P*``.
A layer that has learned the hierarchy maps synonyms it has never seen in the probe's fit to the
same code; the same probe on the input patch (dashed) is the floor. Layers 1 and 2 are drawn
(the first two levels of latents above the tokens).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from locallearn.runfiles import ANALYSIS

LAYERS = (1, 2)


def synonym_rows(run_dir: Path) -> dict[int, tuple[float, float | None]]:
    """``{layer: (probe accuracy, same probe on the input patch)}`` of a run's unseen-synonym
    probes; empty when the run has no (readable) ``analysis.json``."""
    try:
        rows = json.loads((run_dir / ANALYSIS).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for row in rows if isinstance(rows, list) else []:
        if row.get("measure") == "probe" and row.get("split") == "synonyms":
            base = row.get("input_patch")
            out[int(row["layer"])] = (float(row["value"]), None if base is None else float(base))
    return out


def synonym_table(
    panels: dict[str, dict[str, list[Any]]],
) -> dict[str, dict[str, dict[int, dict[float, list[tuple[float, float | None]]]]]]:
    """``{panel: {rule: {layer: {P/P*: [(accuracy, input patch) per seed]}}}}`` of the runs
    that were analysed."""
    out: dict[str, dict[str, dict[int, dict[float, list[tuple[float, float | None]]]]]] = {}
    for title, by_rule in panels.items():
        for rule, runs in by_rule.items():
            for run in runs:
                size = run.get("train_size_over_P_star")
                if size is None:
                    continue
                for layer, value in synonym_rows(run.path).items():
                    if layer in LAYERS:
                        (out.setdefault(title, {}).setdefault(rule, {}).setdefault(layer, {})
                         .setdefault(float(size), []).append(value))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def plot_synonyms_vs_size(table: dict[str, Any], rule_order: Sequence[str], path: Path) -> Path:
    """One column per panel (depth), one row per layer; a line per rule, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = list(table)
    layers = sorted({layer for per in table.values() for rule in per.values() for layer in rule})
    fig, axs = plt.subplots(len(layers), len(titles), figsize=(5.2 * len(titles),
                            3.6 * len(layers)), squeeze=False, layout="constrained")
    colours = {rule: f"C{i % 10}" for i, rule in enumerate(rule_order)}
    for col, title in enumerate(titles):
        for row, layer in enumerate(layers):
            ax = axs[row][col]
            floor: list[float] = []
            for rule in [r for r in rule_order if r in table[title]]:
                by_size = table[title][rule].get(layer)
                if not by_size:
                    continue
                xs = sorted(by_size)
                ax.plot(xs, [_mean([v for v, _ in by_size[x]]) for x in xs], marker="o",
                        markersize=4, color=colours[rule], label=rule)
                floor += [b for x in xs for _, b in by_size[x] if b is not None]
            if floor:
                ax.axhline(_mean(floor), color="gray", linestyle="--", linewidth=1,
                           label="input patch")
            ax.set_xscale("log")
            sizes = sorted({x for rule in table[title].values() for x in rule.get(layer, {})})
            ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
            ax.minorticks_off()
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("P / P*")
            ax.set_ylabel(f"layer {layer}: unseen-synonym probe")
            ax.set_title(textwrap.fill(title, 60), fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def synonym_section(
    panels: dict[str, dict[str, list[Any]]], rule_order: Sequence[str], figs: Path,
    rel: Callable[[Path], str], md_table: Callable[[Sequence[str], Sequence[Sequence[str]]], str],
) -> list[str]:
    """Markdown lines of the section (empty when no run of the panels was analysed)."""
    table = synonym_table(panels)
    if not table:
        return []
    order = list(rule_order) + sorted({r for per in table.values() for r in per} - set(rule_order))
    path = plot_synonyms_vs_size(table, order, figs / "synonyms_vs_P.png")
    md = ["## Unseen-synonym probes against the training-set size", "",
          "Accuracy of the linear probe that reads a layer's own node symbol, fitted and scored "
          "on disjoint synonyms (`locallearn analyze`), against P/P*; mean over the analysed "
          "seeds (their number in brackets where it is not the same everywhere); dashed: the "
          "same probe on the input patch.", "", f"![unseen-synonym probes]({rel(path)})", ""]
    for title, per_rule in table.items():
        sizes = sorted({x for rule in per_rule.values() for layer in rule.values() for x in layer})
        rows = []
        for rule in [r for r in order if r in per_rule]:
            for layer in sorted(per_rule[rule]):
                by_size = per_rule[rule][layer]
                cells = []
                for x in sizes:
                    vals = by_size.get(x)
                    cells.append("-" if not vals else f"{_mean([v for v, _ in vals]):.3f}"
                                 + ("" if len(vals) == 1 else f" ({len(vals)})"))
                rows.append([rule, str(layer)] + cells)
        md += [f"{title}:", "",
               md_table(["rule", "layer"] + [f"{x:g} P*" for x in sizes], rows), ""]
    return md
