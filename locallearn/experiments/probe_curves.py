"""Probe accuracy during training (rows of ``metrics.jsonl`` with ``probe_accuracy``).

For the report: one figure per section with two panels, probe accuracy against optimiser steps
and against training seconds, one line per rule (mean over seeds at each logged step), and the
untrained encoder as a horizontal line: the mean of the step-0 probes (every run probes its
untrained encoder first; runs with ``epochs=0`` add theirs), one line per network where the
rules of a figure train different networks (a mean over them would describe none).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["curve_points", "plot_probe_curves", "probe_at", "random_levels"]

KEY = "probe_accuracy"


def curve_points(rows: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """``(step, seconds, probe accuracy)`` of every row that carries a probe, in step order."""
    pts = []
    for r in rows:
        acc = r.get(KEY)
        if isinstance(acc, (int, float)) and isinstance(r.get("step"), int):
            pts.append((int(r["step"]), float(r.get("seconds") or 0.0), float(acc)))
    return sorted(pts)


def probe_at(rows: list[dict[str, Any]], seconds: float) -> float | None:
    """The probe accuracy of the curve after ``seconds`` of training, linearly interpolated
    between the two probes around it; the last probe where training ended sooner (the run had
    finished within the budget); None without probes."""
    pts = curve_points(rows)
    if not pts:
        return None
    for (_, t0, a0), (_, t1, a1) in zip(pts, pts[1:]):
        if t0 <= seconds <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (seconds - t0) / (t1 - t0)
    return pts[-1][2] if seconds > pts[-1][1] else pts[0][2]


def random_levels(
    curves: dict[str, list[list[dict[str, Any]]]], networks: dict[str, str] | None = None
) -> dict[str, float]:
    """Mean step-0 probe accuracy per network (``networks``: label -> network name; labels
    without one share the name ""), for the networks whose runs probed step 0."""
    first: dict[str, list[float]] = {}
    for label, runs in curves.items():
        for rows in runs:
            if (pts := curve_points(rows)) and pts[0][0] == 0:
                first.setdefault((networks or {}).get(label, ""), []).append(pts[0][2])
    return {net: sum(v) / len(v) for net, v in first.items()}


def _mean_curve(runs: list[list[dict[str, Any]]]) -> list[tuple[int, float, float, float]]:
    """``(step, mean seconds, mean accuracy, std accuracy)`` over the runs that logged a step."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for rows in runs:
        for step, sec, acc in curve_points(rows):
            by_step.setdefault(step, []).append((sec, acc))
    out = []
    for step in sorted(by_step):
        vals = by_step[step]
        accs = [a for _, a in vals]
        mean = sum(accs) / len(accs)
        var = sum((a - mean) ** 2 for a in accs) / (len(accs) - 1) if len(accs) > 1 else 0.0
        out.append((step, sum(s for s, _ in vals) / len(vals), mean, math.sqrt(var)))
    return out


def plot_probe_curves(
    curves: dict[str, list[list[dict[str, Any]]]], path: Path, title: str = "",
    networks: dict[str, str] | None = None,
) -> Path | None:
    """Probe accuracy against steps and against seconds, one line per label, and the untrained
    level of each network (``networks``: label -> network name, see :func:`random_levels`);
    None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {label: c for label, runs in curves.items() if len(c := _mean_curve(runs)) > 1}
    if not lines:
        return None
    fig, axs = plt.subplots(1, 2, figsize=(11.0, 4.2), sharey=True)
    for label, pts in lines.items():
        for ax, x in zip(axs, (0, 1)):
            xs = [p[x] for p in pts]
            ys = [100 * p[2] for p in pts]
            sd = [100 * p[3] for p in pts]
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                            alpha=0.15)
    levels = random_levels(curves, networks)
    styles = ("--", ":", "-.", (0, (5, 1, 1, 1)))
    for ax, name in zip(axs, ("optimiser steps", "training seconds (probes excluded)")):
        for i, (net, level) in enumerate(sorted(levels.items())):
            ax.axhline(100 * level, color="gray", linestyle=styles[i % len(styles)],
                       linewidth=1, label=f"untrained {net}" if len(levels) > 1 else
                       "random encoder")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axs[0].set_ylabel("probe accuracy during training (%)")
    axs[1].legend(fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
