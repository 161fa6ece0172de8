"""The figures of ``locallearn report`` (matplotlib, no screen needed): test error against the
training size, learning curves, alignment per block."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from locallearn.experiments.report_runs import Run, mean_std


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
