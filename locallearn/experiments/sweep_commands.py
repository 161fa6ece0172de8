"""``locallearn sweep``, ``locallearn results`` and ``locallearn report`` (CLI code: may print)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_sweep(args: argparse.Namespace) -> int:
    from locallearn.experiments.sweep import run_sweep
    from locallearn.experiments.sweep_spec import expand, load_sweep

    spec = load_sweep(args.config, args.grid, args.seeds, args.overrides)
    out = Path(args.out) if args.out else Path("sweeps") / Path(args.config).stem
    if args.dry_run:
        runs = expand(spec, args.threads or 1)
        for run in runs:
            print(out / "runs" / run.name)
        print(f"{len(runs)} runs (dry run: nothing started)")
        return 0

    def event(message: str) -> None:
        print(message, flush=True)

    outcome = run_sweep(
        spec, out, workers=args.workers, backend=args.backend, ray_address=args.ray_address,
        threads=args.threads, retries=args.retries,
        on_event=None if args.quiet else event,
    )
    print(
        f"{outcome.total} runs: {outcome.finished} finished now, "
        f"{outcome.skipped + outcome.recorded_late} recorded before "
        f"({outcome.seconds:.0f} s); results in {out / 'results.sqlite'}"
    )
    return 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    """``locallearn sweep CONFIG --grid KEY=V1,V2 --seeds 0,1 --out DIR``."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of configs x seeds, each into its own folder; resumable",
        description="Run every grid point x seed of CONFIG (a sweep file with grid:, variants:, "
        "seeds:, or a run preset) into DIR/runs/<name>, recording each finished run in "
        "DIR/results.sqlite. Started again, it skips recorded runs and resumes interrupted ones. "
        "key=value overrides apply to every run; training sizes may be given in units of P* "
        "(--grid data.train_size=0.5P*,1P*,2P*).",
    )
    p.add_argument("config", help="sweep file or run preset (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="an axis of the grid (repeatable); for an axis of named variants in "
                   "the sweep file, picks variants by name")
    p.add_argument("--seeds", help="seeds of every grid point, e.g. 0,1,2 (default: the file's, "
                   "else 0)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<config name>)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time on this machine (default 1; 0 = in this process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPUs / workers)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes (default) or Ray tasks")
    p.add_argument("--ray-address", default=None,
                   help="address of an existing Ray cluster (default: start a local instance)")
    p.add_argument("--retries", type=int, default=2,
                   help="restarts of a run whose worker process died (default 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every config and list the runs; start nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_sweep)


def _cmd_results(args: argparse.Namespace) -> int:
    from locallearn.config import parse_key_values
    from locallearn.experiments.results import (
        format_table,
        read_results,
        table_columns,
        to_csv,
    )

    filters = parse_key_values(args.filter, "filter")
    columns, rows, axes = read_results(args.dir, filters)
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in columns]
        if unknown:
            raise ValueError(f"column {unknown[0]!r} is unknown; valid: {', '.join(columns)}")
        shown = wanted
    elif args.csv:
        shown = columns
    else:
        shown = table_columns(columns, rows, axes)
    if args.csv:
        sys.stdout.write(to_csv(shown, rows))
    else:
        print(format_table(shown, rows))
        print(f"{len(rows)} runs")
    return 0


def add_results(sub: argparse._SubParsersAction) -> None:
    """``locallearn results DIR [--filter key=value ...] [--csv]``."""
    p = sub.add_parser(
        "results",
        help="print the recorded runs of a sweep as a table or CSV",
        description="Rows of DIR/results.sqlite (one per finished run). The table shows the grid "
        "axes, the seed and the main metrics; --csv prints every column.",
    )
    p.add_argument("dir", help="sweep folder (holds results.sqlite)")
    p.add_argument("--filter", action="append", default=[], metavar="key=value",
                   help="keep rows whose column equals the value (repeatable)")
    p.add_argument("--csv", action="store_true", help="CSV with every column")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.set_defaults(func=_cmd_results)


def _cmd_report(args: argparse.Namespace) -> int:
    from locallearn.experiments.report import write_report

    path = write_report(args.dir, target_error=args.target_error, out=args.out,
                        at_minutes=args.at_minutes)
    print(f"wrote {path}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    """``locallearn report DIR [--target-error 0.1] [--at-minutes M] [--out FILE]``."""
    p = sub.add_parser(
        "report",
        help="write DIR/report.md with tables and figures of a sweep's results",
        description="Tables of mean and std over seeds per grid point; for RHM sweeps test error "
        "against P/P* and each rule's sample complexity; for image sweeps the rule x dataset "
        "table of linear-probe accuracy; learning curves; alignment where recorded.",
    )
    p.add_argument("dir", help="sweep folder (holds results.sqlite)")
    p.add_argument("--target-error", type=float, default=0.1,
                   help="test error defining the sample complexity (default 0.1)")
    p.add_argument("--at-minutes", type=float, default=None,
                   help="image sweeps: also give each rule's learning-curve probe after this "
                   "many minutes of training (default: the runs' shared max_seconds, if any)")
    p.add_argument("--out", default=None, help="report file (default DIR/report.md)")
    p.set_defaults(func=_cmd_report)
