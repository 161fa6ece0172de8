"""Text table and figure of the per-layer similarity rows from :mod:`locallearn.theory.cases`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

VALUES = ("cosine", "rel_error")
_KEYS = ("case", "layer", "cosine", "rel_error")

# panels of the figure: a case goes to the first panel whose prefix it starts with
_PANELS = (
    ("exactness (orthonormal, optimal B)", ("exact", "forward-forward")),
    ("broken conditions", ("random-B", "non-orthogonal", "relu")),
    ("direct feedback, shrinking widths", ("shrinking",)),
    ("2D spatial dependence (linear CNN)", ("conv",)),
)


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        raise ValueError("no rows to report")
    for row in rows:
        missing = [k for k in _KEYS if k not in row]
        if missing:
            raise ValueError(f"row {row!r} lacks {', '.join(missing)}")


def _by_case(rows: Sequence[dict[str, Any]], value: str) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for row in rows:
        table.setdefault(str(row["case"]), {})[int(row["layer"])] = float(row[value])
    return table


def format_table(rows: Sequence[dict[str, Any]], value: str = "cosine") -> str:
    """Plain-text table: one line per case (in order of appearance), one column per layer."""
    if value not in VALUES:
        raise ValueError(f"value {value!r} is unknown; valid: {', '.join(VALUES)}")
    _check_rows(rows)
    table = _by_case(rows, value)
    layers = sorted({layer for per in table.values() for layer in per})
    width = max(len("case"), *(len(c) for c in table))
    fmt = "{:>10.7f}" if value == "cosine" else "{:>10.2e}"
    head = "case".ljust(width) + "".join(f"{'layer ' + str(la):>11}" for la in layers)
    lines = [f"{value} per layer", head, "-" * len(head)]
    for case, per in table.items():
        cells = [" " + (fmt.format(per[la]) if la in per else f"{'-':>10}") for la in layers]
        lines.append(case.ljust(width) + "".join(cells))
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG figure of the cosine per layer, one line per case, grouped in panels."""
    _check_rows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _by_case(rows, "cosine")
    groups: dict[str, list[str]] = {title: [] for title, _ in _PANELS}
    other: list[str] = []
    for case in table:
        title = next((t for t, prefixes in _PANELS if case.startswith(prefixes)), None)
        (groups[title] if title else other).append(case)
    panels = [(t, cs) for t, cs in groups.items() if cs]
    if other:
        panels.append(("other", other))
    low = min(0.0, *(v for per in table.values() for v in per.values())) - 0.05
    markers = ("o", "s", "^", "D", "v")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, cases) in zip(axes[0], panels):
        for i, case in enumerate(cases):
            layers = sorted(table[case])
            ax.plot(
                layers,
                [table[case][la] for la in layers],
                marker=markers[i % len(markers)],
                markersize=7 - 1.5 * (i % 3),  # overlapping (exact) curves stay visible
                linestyle=("-", "--", ":")[i % 3],
                label=case,
            )
            ax.set_xticks(layers)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(low, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("cosine(local update, BP gradient)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
