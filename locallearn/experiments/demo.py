"""``locallearn demo``: the RHM study in a few minutes on a laptop.

One RHM (``v = n_classes = 8, m = 4, s = 2, L = 3``; ``m < v`` so that the inputs carry structure
a label-free rule can find), ``P = 4 P*`` training samples, the same hierarchical CNN and the same
optimiser budget for every rule: backprop, backprop without masking, DFA, and layer-wise CLAPP
with per-block synonym views (a view that uses knowledge of the generator). Each rule runs into
its own folder under the output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from locallearn.config import deep_merge, parse_overrides
from locallearn.experiments.runs import run
from locallearn.runfiles import check_out_dir, read_metrics, write_json_atomic
from locallearn.schema import build_config

DEMO_CONFIG: dict[str, Any] = {
    "data": {"name": "rhm", "v": 8, "n_classes": 8, "m": 4, "s": 2, "L": 3,
             "train_size": "4P*", "test_size": 2000},
    "net": {"width": 256},
    "optim": {"name": "adam", "lr": 1e-2},
    "epochs": 30,
    "batch_size": 64,
    "eval_every": 3,
    "checkpoint_every": 10,
    "threads": 1,  # small tensors: one thread is as fast, and far faster on a busy machine
}

DEMO_RULES: dict[str, dict[str, Any]] = {
    "backprop": {"rule": {"name": "backprop"}},
    "backprop-nomask": {"rule": {"name": "backprop-nomask"}},
    "dfa": {"rule": {"name": "dfa"}},
    "clapp-per-block": {
        "rule": {"name": "layerwise", "loss": "clapp", "view": "synonyms-per-block"}
    },
}


def demo_config(rule: str, overrides: list[str] | None = None, progress: bool = True):
    """The config of one demo rule (labelled with its preset name), with ``key=value``
    overrides applied."""
    raw = deep_merge(deep_merge({}, DEMO_CONFIG), DEMO_RULES[rule])
    raw = deep_merge(raw, {"progress": progress, "label": rule})
    return build_config(deep_merge(raw, parse_overrides(overrides or [])))


def run_demo(
    out_dir: str | Path,
    overrides: list[str] | None = None,
    rules: list[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every demo rule; write ``summary.json`` (one object per rule) and ``accuracy.png``."""
    from locallearn.experiments.plots import plot_curves

    out = check_out_dir(out_dir)
    names = list(rules or DEMO_RULES)
    unknown = [r for r in names if r not in DEMO_RULES]
    if unknown:
        raise ValueError(f"demo rule {unknown[0]!r} is unknown; valid: {', '.join(DEMO_RULES)}")
    configs = {name: demo_config(name, overrides, progress) for name in names}  # check all first
    rows = []
    curves = {}
    for name, cfg in configs.items():
        summary = run(cfg, out / name)
        summary["name"] = name
        rows.append(summary)
        curves[legend(summary)] = read_metrics(out / name)
        write_json_atomic(out / "summary.json", rows)
    title = _title(configs[names[0]]) if names else ""
    if any(r["readout"] != "end-to-end" for r in rows):
        title += "\nlabel-free rules: linear read-out of the frozen top block (at epoch 0 too)"
    plot_curves(curves, out / "accuracy.png", chance=rows[0]["chance"] if rows else None,
                title=title)
    return rows


def legend(summary: dict[str, Any]) -> str:
    """A run's name in the figure: its preset, and how its accuracy is read out."""
    how = "" if summary.get("readout") == "end-to-end" else " (linear read-out)"
    return f"{summary.get('label') or summary['rule']}{how}"


def _title(cfg) -> str:
    d = cfg.data
    return (f"RHM v={d.v} n_c={d.n_classes} m={d.m} s={d.s} L={d.L}, "
            f"P={d.train_size}, width {cfg.net.width}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's table: preset, test accuracy, how it is read out, chance, epochs, seconds."""
    head = (f"{'preset':<18} {'test acc':>8}  {'read-out':<10} {'chance':>7} {'epochs':>6} "
            f"{'seconds':>8}")
    lines = [head, "-" * len(head)]
    linear = False
    for r in rows:
        how = "end-to-end" if r.get("readout") == "end-to-end" else "linear"
        linear = linear or how == "linear"
        lines.append(
            f"{r.get('label') or r.get('name', r['rule']):<18} {r['test_accuracy']:>8.3f}  "
            f"{how:<10} {r['chance']:>7.3f} {r['epochs']:>6d} {r['seconds']:>8.1f}"
        )
    notes = ["", "end-to-end: the network's own read-out, trained with the labels."]
    if linear:
        notes.append("linear: a linear read-out fitted on the frozen top block of a label-free "
                     "rule (its accuracy before training is that of random features).")
    return "\n".join(lines + notes)
