"""The image sections of ``locallearn report``: the leaderboard and the gains over the untrained
encoder.

A trained run is compared with the untrained run (``epochs=0``, or ``rule.options.plastic=false``:
a pass that changes no weight) of the same seed, network config and data set: the same initial
weights, so the difference is what training added. The leaderboard puts every rule of the sweep
in one table, best first: the probe of all blocks and of the top block, those gains, the
optimiser steps, the training seconds and the peak memory, each the mean ± std over seeds; with
a time budget (``max_seconds`` or ``--at-minutes``), also the learning curve's probe at it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from locallearn.experiments.probe_curves import probe_at
from locallearn.experiments.report_runs import (
    Layout,
    Run,
    fmt_mean_std,
    md_table,
    mean_std,
    read_curve,
)

__all__ = ["against_untrained", "budget_seconds", "leaderboard", "untrained"]

GAIN_KEYS = ("probe_accuracy", "probe_top_accuracy")


def untrained(run: Run) -> bool:
    """Whether a run's encoder is untrained: ``epochs=0``, or a rule told to change no weight
    (``rule.options.plastic=false``: SoftHebb's pass that only gathers batch-norm statistics)."""
    if not isinstance(run.config, dict):
        return False
    rule = run.config.get("rule") or {}
    options = rule.get("options") if isinstance(rule, dict) else None
    return run.config.get("epochs") == 0 or (isinstance(options, dict)
                                             and options.get("plastic") is False)


def start_key(run: Run) -> tuple[int, str, str]:
    """What two runs share when they start from the same weights: the seed, the network, the
    data set."""
    config = run.config if isinstance(run.config, dict) else {}
    data = config.get("data") or {}
    return (run.seed, json.dumps(config.get("net"), sort_keys=True, default=str),
            str(data.get("name") if isinstance(data, dict) else data))


def _points(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if len(values) > 1 else "")


def _gains(pairs: Sequence[tuple[Run, Run]], key: str) -> list[float]:
    return [100 * (float(r.get(key)) - float(b.get(key))) for r, b in pairs
            if r.get(key) is not None and b.get(key) is not None]


def _baselines(runs: Sequence[Run]) -> dict[tuple[int, str, str], Run]:
    start: dict[tuple[int, str, str], Run] = {}
    for run in runs:
        if untrained(run):
            start.setdefault(start_key(run), run)
    return start


def _groups(lay: Layout, runs: Sequence[Run], position: Callable[[Run], Any]
            ) -> dict[str, list[Run]]:
    """The runs of each table row (rule, section, dataset), in the tables' order."""
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=position):
        parts = (lay.rule_label(run), lay.section_label(run),
                 run.values[lay.dataset] if lay.dataset else "")
        groups.setdefault(" / ".join(v for v in parts if v), []).append(run)
    return groups


def against_untrained(lay: Layout, runs: Sequence[Run], position: Callable[[Run], Any]
                      ) -> list[str]:
    """Each trained encoder's probes minus those of the untrained one of its seed, network and
    data, in points, per row of the tables."""
    start = _baselines(runs)
    rows = []
    for name, group in _groups(lay, runs, position).items():
        pairs = [(r, start[start_key(r)]) for r in group
                 if not untrained(r) and start_key(r) in start]
        if not pairs:
            continue
        cells = [(_points(g) if (g := _gains(pairs, key)) else "-") for key in GAIN_KEYS]
        rows.append([name, ", ".join(str(r.seed) for r, _ in pairs)] + cells)
    if not rows:
        return []
    return ["## Against the untrained encoder", "",
            "Each trained run's linear probe minus that of the untrained encoder (`epochs=0`) of "
            "the same seed, network and data (the same initial weights), in points; mean ± std "
            "over the seeds that have both.", "",
            md_table(["run", "seeds", "all blocks", "top block"], rows), ""]


def _steps(rows: Sequence[dict[str, Any]]) -> float | None:
    """The optimiser steps a run took: the last ``step`` of its ``metrics.jsonl`` rows."""
    steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
    return float(max(steps)) if steps else None


def _percent(runs: Sequence[Run], key: str) -> str:
    values = [100 * float(r.get(key)) for r in runs if r.get(key) is not None]
    return fmt_mean_std(values, 1) if values else "-"


def budget_seconds(runs: Sequence[Run]) -> float | None:
    """The training budget the trained runs share (their ``max_seconds``), or None."""
    budgets = {run.config.get("max_seconds") for run in runs
               if isinstance(run.config, dict) and not untrained(run)}
    return float(next(iter(budgets))) if len(budgets) == 1 and None not in budgets else None


def _curve_at(curves: Sequence[list[dict[str, Any]]], seconds: float) -> str:
    values = [100 * v for rows in curves if (v := probe_at(rows, seconds)) is not None]
    return fmt_mean_std(values, 1) if values else "-"


def leaderboard(lay: Layout, runs: Sequence[Run], position: Callable[[Run], Any],
                at_seconds: float | None = None) -> list[str]:
    """One table of every row (rule, section, dataset) of an image sweep, best probe first;
    with ``at_seconds``, also the learning curve's probe after that much training."""
    start = _baselines(runs)
    table = []
    for name, group in _groups(lay, runs, position).items():
        probes = [float(r.get("probe_accuracy")) for r in group
                  if r.get("probe_accuracy") is not None]
        pairs = [(r, start[start_key(r)]) for r in group
                 if not untrained(r) and start_key(r) in start]
        if all(untrained(r) for r in group):
            gains = ["untrained", "untrained"]
        else:
            gains = [(_points(g) if (g := _gains(pairs, key)) else "-") for key in GAIN_KEYS]
        seconds = [float(r.get("seconds")) / 60 for r in group if r.get("seconds") is not None]
        curves = [read_curve(r.path) for r in group]  # each metrics.jsonl read once
        row = [name, ", ".join(str(seed) for seed in sorted({r.seed for r in group})),
               _percent(group, "probe_accuracy"), _percent(group, "probe_top_accuracy"),
               *gains, *([_curve_at(curves, at_seconds)] if at_seconds else []),
               fmt_mean_std([_steps(rows) for rows in curves], 0),
               fmt_mean_std(seconds, 1) if seconds else "-",
               fmt_mean_std([r.get("peak_rss_mib") for r in group], 1)]
        table.append((-(sum(probes) / len(probes)) if probes else 0.0, row))
    table.sort(key=lambda item: item[0])
    at_head = [f"curve at {at_seconds / 60:.4g} min"] if at_seconds else []
    at_text = (f" The curve's probe (`probe_every`) after {at_seconds / 60:.4g} minutes of "
               "training (%), interpolated between the probes around it, makes the time budget "
               "visible: a run that ended sooner (an untrained encoder too) counts with its "
               "last probe." if at_seconds else "")
    return ["## Leaderboard", "",
            "Every row of the sweep, best linear probe (all blocks) first: the probe of all "
            "blocks and of the top block alone (%), the gain of each over the untrained encoder "
            "of the same seed, network and data (points), the optimiser steps, the training "
            "time (minutes, probes excluded) and the "
            "peak memory of the run's process (MiB); mean ± std over seeds." + at_text, "",
            md_table(["rule", "seeds", "probe, all blocks", "probe, top block",
                      "gain, all", "gain, top", *at_head, "steps", "train min", "peak MiB"],
                     [row for _, row in table]), ""]
