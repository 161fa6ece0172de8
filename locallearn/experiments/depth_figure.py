"""Sample complexity against the RHM depth: the frontier figure of ``locallearn report``.

For sweeps whose RHM runs span several depths ``L``: per rule and depth, the smallest training
set ``P`` whose test error reaches the target (per seed, interpolated as in the report's
sample-complexity table; geometric mean over the seeds that reach it), drawn against ``L`` on
log axes next to the two scalings of *Learn from your own latents and not from tokens* (arXiv
2605.27734): ``v m^3`` (latent prediction, independent of ``L``) and ``P* = n_c m^L``
(supervised learning and token-level self-supervision). A depth where a rule misses the target
at every size of the grid is drawn as an open triangle at the largest ``P`` tried (the sample
complexity is above it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_depth(run: Any) -> int | None:
    """``data.L`` of a run (from its config), or ``None``."""
    data = (run.config or {}).get("data") or {}
    value = data.get("L")
    return int(value) if isinstance(value, (int, float)) else None


def complexity_by_depth(
    runs: Sequence[Any], rule_label: Callable[[Any], str], target: float,
    crossing: Callable[[Sequence[tuple[float, float]], float], tuple[float | None, bool]],
) -> dict[str, dict[int, tuple[float | None, float, int, int, bool]]]:
    """``{rule: {L: (P at target or None, largest P, seeds reaching, seeds, censored)}}``;
    ``censored``: every seed that reaches the target does so at the smallest ``P`` of the grid
    (the value is an upper bound)."""
    groups: dict[tuple[str, int], list[Any]] = {}
    for run in runs:
        depth = run_depth(run)
        if depth is None or run.get("test_accuracy") is None or run.get("train_size") is None:
            continue
        groups.setdefault((rule_label(run), depth), []).append(run)
    out: dict[str, dict[int, tuple[float | None, float, int, int, bool]]] = {}
    for (rule, depth), truns in groups.items():
        seeds = sorted({r.seed for r in truns})
        reached = []
        censored = []
        for seed in seeds:
            pts = [(float(r.get("train_size")), 1.0 - float(r.get("test_accuracy")))
                   for r in truns if r.seed == seed]
            p, upper = crossing(pts, target)
            if p is not None:
                reached.append(p)
                censored.append(upper)
        largest = max(float(r.get("train_size")) for r in truns)
        geo = math.exp(sum(map(math.log, reached)) / len(reached)) if reached else None
        out.setdefault(rule, {})[depth] = (geo, largest, len(reached), len(seeds),
                                           bool(censored) and all(censored))
    return out


def theory_lines(runs: Sequence[Any]) -> dict[str, dict[int, float]]:
    """``v m^3`` and ``n_c m^L`` at the depths of the runs (runs sharing ``v, m, n_c``)."""
    lines: dict[str, dict[int, float]] = {}
    for run in runs:
        data = (run.config or {}).get("data") or {}
        depth = run_depth(run)
        if depth is None or not all(isinstance(data.get(k), int) for k in ("v", "m", "n_classes")):
            continue
        v, m, nc = data["v"], data["m"], data["n_classes"]
        lines.setdefault(f"v m^3 (latent prediction; v={v}, m={m})", {})[depth] = float(v * m**3)
        lines.setdefault(f"n_c m^L = P* (supervised, tokens; n_c={nc})", {})[depth] = float(
            nc * m**depth)
    return lines


def plot_complexity_vs_depth(
    table: dict[str, dict[int, tuple[float | None, float, int, int, bool]]],
    lines: dict[str, dict[int, float]], rule_order: Sequence[str], path: Path, target: float,
) -> Path:
    """The figure (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    depths = sorted({d for per in table.values() for d in per})
    for rule in [r for r in rule_order if r in table] + sorted(set(table) - set(rule_order)):
        per = table[rule]
        xs = [d for d in depths if d in per and per[d][0] is not None]
        line = ax.plot(xs, [per[d][0] for d in xs], marker="o", label=rule)[0]
        above = [d for d in depths if d in per and per[d][0] is None]
        if above:
            ax.plot(above, [per[d][1] for d in above], linestyle="none", marker="^",
                    markerfacecolor="none", color=line.get_color())
        upper = [d for d in xs if per[d][4]]
        if upper:
            ax.plot(upper, [per[d][0] for d in upper], linestyle="none", marker="v",
                    markersize=9, markerfacecolor="none", color=line.get_color())
    for (name, per), style in zip(sorted(lines.items()), ("--", ":", "-.")):
        xs = sorted(per)
        ax.plot(xs, [per[d] for d in xs], color="black", linestyle=style, linewidth=1,
                label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("depth L")
    ax.set_ylabel(f"P at test error {target:g} (samples)")
    ax.set_title("open triangle up: not reached up to this P; down: reached at the smallest P",
                 fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def depth_axes(runs: Sequence[Any], axes: Sequence[str]) -> set[str]:
    """Axes that only set the depth: each of their values goes with one ``data.L``."""
    out = set()
    for axis in axes:
        depths: dict[str, set[int | None]] = {}
        for run in runs:
            depths.setdefault(run.values.get(axis), set()).add(run_depth(run))
        if len(depths) > 1 and all(len(d) == 1 for d in depths.values()):
            out.add(axis)
    return out


def label_without_depth(rule_axes: Sequence[str], runs: Sequence[Any]) -> Callable[[Any], str]:
    """A run's rule label (its rule axes' values) without the axes that set the depth."""
    keep = [a for a in rule_axes if a not in depth_axes(runs, rule_axes)]

    def label(run: Any) -> str:
        return " / ".join(run.values[a] for a in keep) if keep else str(run.get("rule") or "run")

    return label


def depth_section(
    runs: Sequence[Any], rule_label: Callable[[Any], str], rule_order: Sequence[str],
    figs: Path, rel: Callable[[Path], str], target: float,
    crossing: Callable[[Sequence[tuple[float, float]], float], tuple[float | None, bool]],
    md_table: Callable[[Sequence[str], Sequence[Sequence[str]]], str],
) -> list[str]:
    """Markdown lines of the section (empty when the runs span fewer than two depths)."""
    if len({run_depth(r) for r in runs} - {None}) < 2:
        return []
    table = complexity_by_depth(runs, rule_label, target, crossing)
    path = plot_complexity_vs_depth(table, theory_lines(runs), rule_order,
                                    figs / "complexity_vs_depth.png", target)
    depths = sorted({d for per in table.values() for d in per})
    rows = []
    for rule in [r for r in rule_order if r in table] + sorted(set(table) - set(rule_order)):
        cells = []
        for d in depths:
            if d not in table[rule]:
                cells.append("-")
                continue
            p, largest, k, n, upper = table[rule][d]
            cells.append(f"> {largest:.0f}" if p is None else
                         ("≤ " if upper else "") + f"{p:.0f}"
                         + ("" if k == n else f" ({k}/{n} seeds)"))
        rows.append([rule] + cells)
    return [f"## Sample complexity against depth (test error ≤ {target:g})", "",
            "P (samples) at the target per rule and depth L, geometric mean over the seeds that "
            "reach it; '> P' when no size of the grid reaches it, '≤ P' when the smallest size "
            "already does. The lines are the scalings "
            "v m^3 (latent prediction, arXiv 2605.27734) and n_c m^L = P*.", "",
            f"![sample complexity against depth]({rel(path)})", "",
            md_table(["rule"] + [f"L = {d}" for d in depths], rows), ""]
