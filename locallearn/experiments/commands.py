"""Subcommands of ``locallearn`` beyond ``rhm info``; each registrar adds one to the parser."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    from locallearn.experiments.schema import load_config
    from locallearn.train import run

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = run(cfg, out)
    keys = ("rule", "test_accuracy", "probe_accuracy", "chance", "epochs", "seconds")
    shown = {k: summary[k] for k in keys if summary.get(k) is not None}
    print(json.dumps(shown))
    print(f"wrote {out / 'summary.json'}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="train one config into an output directory (resumes an interrupted run)",
        description="Train CONFIG (a YAML preset, e.g. configs/rhm/backprop.yaml) with "
        "key=value overrides (e.g. data.train_size=2P* optim.lr=3e-3 epochs=0).",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", help="output directory (default: runs/<config name>)")
    p.set_defaults(func=_cmd_run)


def _cmd_demo(args: argparse.Namespace) -> int:
    from locallearn.experiments.demo import format_table, run_demo

    rows = run_demo(args.out, args.overrides, rules=args.rules, progress=not args.quiet)
    print(format_table(rows))
    print(f"wrote {Path(args.out) / 'summary.json'} and {Path(args.out) / 'accuracy.png'}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from locallearn.experiments.demo import DEMO_RULES

    p = sub.add_parser(
        "demo",
        help="the RHM study in three minutes: backprop, no masking, DFA, layer-wise SSL",
        description="Train the demo RHM with each rule, print a table and plot test accuracy "
        "per epoch. key=value overrides apply to every rule.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--rules", nargs="+", default=list(DEMO_RULES), choices=list(DEMO_RULES),
                   help="rules to run (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_run, _add_demo]
