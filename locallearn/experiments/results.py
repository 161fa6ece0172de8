"""The results store of a sweep: ``DIR/results.sqlite``.

Table ``runs``: one row per finished run, with a column per grid axis (the variant's name for axes
of variants), ``seed``, ``run_dir`` (relative to ``DIR``, unique: a run is never recorded twice),
the scalar entries of the run's ``summary.json`` (``test_accuracy``, ``best_test_accuracy``,
``probe_accuracy`` where present, ``chance``, ``epochs``, ``seconds``, ``peak_rss_mib``, ``host``,
``train_size``, ``P_star``, ...), ``code_version`` (package version and git commit), ``recorded_at``
and ``summary_json`` (the whole summary). Table ``axes`` lists the grid axes in order; table
``sessions`` records each start of the sweep (backend, workers, machine load while it ran).

One writer at a time: the sweep's parent process records each run in its own transaction.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DB_NAME = "results.sqlite"

#: summary entries shown first, in this order (others follow as they appear)
METRIC_COLUMNS = (
    "rule", "test_accuracy", "best_test_accuracy", "probe_accuracy", "train_accuracy",
    "test_loss", "train_loss", "best_epoch", "chance", "epochs", "stopped_early", "seconds",
    "peak_rss_mib", "train_size", "test_size", "P_star", "P_max", "train_size_over_P_star",
    "host", "torch",
)
BOOKKEEPING = ("id", "run_dir", "seed", "code_version", "recorded_at", "summary_json")
#: names a grid axis may not take (a grid axis that is a run config key, such as ``epochs``, takes
#: the column of the summary entry of that name; the summary's value stays in ``summary_json``)
RESERVED_COLUMNS = frozenset(BOOKKEEPING + METRIC_COLUMNS)
#: shown by ``locallearn results`` without ``--csv`` (with the axes and the seed)
TABLE_METRICS = (
    "test_accuracy", "best_test_accuracy", "probe_accuracy", "chance", "epochs", "seconds",
    "peak_rss_mib",
)


def quote(name: str) -> str:
    """An SQL identifier (column names may hold dots: ``data.train_size``)."""
    return '"' + name.replace('"', '""') + '"'


def db_value(value: Any) -> Any:
    """A Python value as stored in a column (numbers and text as they are; others as text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return float(value)  # beyond SQLite's integers (an RHM's P_max at depth): as a real
    if value is None or isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, separators=(",", ":"))


def code_version() -> str:
    """The package version plus the git commit of its checkout (``+dirty`` with local edits)."""
    from locallearn import __version__

    version = str(__version__)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, env=env, check=False,
        )
        if head.returncode != 0 or not head.stdout.strip():
            return version
        version += f"+g{head.stdout.strip()}"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--", "locallearn"],
            capture_output=True, timeout=10, env=env, check=False,
        )
        if dirty.returncode == 1:
            version += ".dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


class ResultsStore:
    """``DIR/results.sqlite``; create it with ``create=True`` (the sweep does)."""

    def __init__(self, sweep_dir: str | Path, create: bool = True):
        self.dir = Path(sweep_dir)
        self.path = self.dir / DB_NAME
        if not create and not self.path.is_file():
            raise ValueError(
                f"{str(self.dir)!r} holds no results ({DB_NAME} is missing; "
                "made by locallearn sweep)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            self.db.execute("PRAGMA schema_version").fetchone()
            if create:
                self._create()
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise ValueError(
                f"{str(self.path)!r} is not a readable results database ({err}); move it aside: "
                "the run folders under runs/ are kept, and the sweep started again records "
                "them anew"
            ) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema
    def _create(self) -> None:
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS runs (
                id INTEGER PRIMARY KEY,
                run_dir TEXT NOT NULL UNIQUE,
                seed INTEGER,
                code_version TEXT,
                recorded_at TEXT,
                summary_json TEXT
            );
            CREATE TABLE IF NOT EXISTS axes (
                name TEXT PRIMARY KEY, kind TEXT NOT NULL, position INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS sessions (
                id INTEGER PRIMARY KEY, host TEXT, cpu_count INTEGER, backend TEXT,
                workers INTEGER, threads INTEGER, runs_total INTEGER, runs_todo INTEGER,
                started_at TEXT, ended_at TEXT, seconds REAL, finished INTEGER, failed INTEGER,
                load_mean REAL, load_max REAL, load_samples INTEGER
            );
            """
        )

    def columns(self) -> list[str]:
        """Columns of ``runs`` in table order."""
        return [row[1] for row in self.db.execute("PRAGMA table_info(runs)")]

    def _ensure_columns(self, names: Iterable[str]) -> None:
        have = set(self.columns())
        for name in names:
            if name not in have:
                self.db.execute(f"ALTER TABLE runs ADD COLUMN {quote(name)}")
                have.add(name)

    def set_axes(self, axes: Sequence[tuple[str, str]]) -> None:
        """Record the grid axes (name, kind) in order; axes of earlier sweeps stay, after them."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            old = [r[0] for r in self.db.execute("SELECT name FROM axes ORDER BY position")]
            names = [n for n, _ in axes]
            order = names + [n for n in old if n not in names]
            kinds = dict(self.db.execute("SELECT name, kind FROM axes").fetchall())
            kinds.update(dict(axes))
            self.db.execute("DELETE FROM axes")
            self.db.executemany(
                "INSERT INTO axes (name, kind, position) VALUES (?, ?, ?)",
                [(n, kinds[n], i) for i, n in enumerate(order)],
            )
            self._ensure_columns(names)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def axes(self) -> list[tuple[str, str]]:
        """The grid axes (name, kind) in order."""
        return list(self.db.execute("SELECT name, kind FROM axes ORDER BY position"))

    # ------------------------------------------------------------------ writing
    def recorded_dirs(self) -> set[str]:
        """``run_dir`` of every recorded run."""
        return {r[0] for r in self.db.execute("SELECT run_dir FROM runs")}

    def record(
        self, run_dir: str, values: dict[str, Any], summary: dict[str, Any], version: str
    ) -> bool:
        """Insert one finished run; return False (and change nothing) if it is recorded already.

        ``values``: the run's grid values and ``seed``; ``summary``: its ``summary.json``.
        """
        axes = {n for n, _ in self.axes()}
        row: dict[str, Any] = {}
        for key, value in summary.items():
            if key in axes or key in BOOKKEEPING:
                continue  # a grid column of that name wins; the summary keeps the value
            if value is None or isinstance(value, (bool, int, float, str)):
                row[key] = db_value(value)
        for key, value in values.items():
            row[key] = db_value(value)
        row.update(
            run_dir=run_dir,
            code_version=version,
            recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            summary_json=json.dumps(summary, sort_keys=True),
        )
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._ensure_columns(row)
            names = list(row)
            cur = self.db.execute(
                f"INSERT INTO runs ({', '.join(quote(n) for n in names)}) "
                f"VALUES ({', '.join('?' for _ in names)}) ON CONFLICT(run_dir) DO NOTHING",
                [row[n] for n in names],
            )
            inserted = cur.rowcount == 1
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return inserted

    def start_session(
        self, backend: str, workers: int, threads: int, total: int, todo: int
    ) -> int:
        """Record the start of a sweep; returns the session's id."""
        cur = self.db.execute(
            "INSERT INTO sessions (host, cpu_count, backend, workers, threads, runs_total, "
            "runs_todo, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (platform.node(), os.cpu_count(), backend, workers, threads, total, todo,
             time.strftime("%Y-%m-%dT%H:%M:%S")),
        )
        return int(cur.lastrowid or 0)

    def end_session(
        self, session: int, finished: int, failed: int, loads: Sequence[float]
    ) -> None:
        """Record the end of a sweep with the load averages sampled while it ran."""
        started = self.db.execute(
            "SELECT started_at FROM sessions WHERE id = ?", (session,)
        ).fetchone()
        seconds = None
        if started and started[0]:
            seconds = time.time() - time.mktime(time.strptime(started[0], "%Y-%m-%dT%H:%M:%S"))
        self.db.execute(
            "UPDATE sessions SET ended_at = ?, seconds = ?, finished = ?, failed = ?, "
            "load_mean = ?, load_max = ?, load_samples = ? WHERE id = ?",
            (time.strftime("%Y-%m-%dT%H:%M:%S"), seconds, finished, failed,
             sum(loads) / len(loads) if loads else None, max(loads) if loads else None,
             len(loads), session),
        )

    # ------------------------------------------------------------------ reading
    def sessions(self) -> list[dict[str, Any]]:
        """Every recorded start of the sweep, oldest first."""
        cur = self.db.execute("SELECT * FROM sessions ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def ordered_columns(self) -> list[str]:
        """Columns for display: axes, seed, known metrics, other entries, bookkeeping."""
        cols = self.columns()
        axes = [n for n, _ in self.axes() if n in cols]
        first = axes + ["seed"] + [c for c in METRIC_COLUMNS if c in cols and c not in axes]
        tail = ["code_version", "recorded_at", "run_dir"]
        rest = [c for c in cols if c not in first and c not in tail
                and c not in ("id", "summary_json")]
        return first + rest + tail

    def rows(self, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Recorded runs (oldest first) matching every ``column=value`` filter.

        A value matches as written or as the number it spells: ``optim.lr=0.0005`` finds the
        runs of a grid written ``5e-4`` (which YAML reads as text) and the other way round.
        """
        cols = self.columns()
        for key in filters or {}:
            if key not in cols:
                shown = [c for c in self.ordered_columns() if c != "recorded_at"]
                raise ValueError(f"filter key {key!r} is not a column; valid: {', '.join(shown)}")
        # each filter value as written, as YAML, as a number: parsed once, not once per row
        wanted = [(key, raw, _parse_scalar(raw), _number(raw))
                  for key, raw in (filters or {}).items()]
        cur = self.db.execute("SELECT * FROM runs ORDER BY id")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
        return [row for row in rows
                if all(_matches(row.get(key), *forms) for key, *forms in wanted)]


def _number(value: Any) -> float | None:
    """The number a cell or a filter value spells (``5e-4``, ``0.0005``, 3), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _matches(cell: Any, raw: str, parsed: Any, number: float | None) -> bool:
    """Whether a stored cell equals a ``--filter`` value ``raw`` (as text, as YAML: ``parsed``,
    or as a number: ``number``)."""
    if cell is None:
        return False
    if str(cell) == raw or cell == parsed:
        return True
    value = _number(cell)
    return value is not None and number is not None and value == number


def _parse_scalar(text: str) -> Any:
    from locallearn.config import parse_value

    value = parse_value(text)
    return db_value(value) if not isinstance(value, (list, dict)) else text


def read_results(
    sweep_dir: str | Path, filters: dict[str, str] | None = None
) -> tuple[list[str], list[dict[str, Any]], list[tuple[str, str]]]:
    """``(display columns, rows, axes)`` of a sweep folder; ValueError if it has no results."""
    with ResultsStore(sweep_dir, create=False) as store:
        return store.ordered_columns(), store.rows(filters), store.axes()


def format_cell(value: Any) -> str:
    """A cell of the text table: 4 significant digits for floats, ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of ``rows`` (numbers right-aligned)."""
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def to_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV text with a header line."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


def table_columns(columns: Sequence[str], rows: Sequence[dict[str, Any]],
                  axes: Sequence[tuple[str, str]]) -> list[str]:
    """The columns ``locallearn results`` shows by default: axes, seed, main metrics, run_dir."""
    names = [n for n, _ in axes if any(r.get(n) is not None for r in rows)]
    metrics = [m for m in TABLE_METRICS if m in columns and m not in names
               and any(r.get(m) is not None for r in rows)]
    if not names:
        metrics = ["rule"] + metrics
    return names + ["seed"] + metrics + ["run_dir"]
