"""Subcommands of ``locallearn`` beyond ``rhm info``; each registrar adds one to the parser."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from locallearn.runfiles import CONFIG, RUN_LOCK, check_out_dir, file_lock


def _cmd_run(args: argparse.Namespace) -> int:
    from locallearn import distributed as ddp
    from locallearn.experiments.runs import run
    from locallearn.schema import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.label is None:  # progress bar and summary name the preset
        cfg.label = Path(args.config).stem
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    check_out_dir(out)
    _keep_own_input(Path(args.config), out / CONFIG, cfg)
    if ddp.rank_from_env() == 0:  # one lock per run folder, held by rank 0
        with file_lock(out / RUN_LOCK, blocking=False) as locked:
            if not locked:
                raise ValueError(f"another process is training in {str(out)!r} (it holds "
                                 f"{RUN_LOCK}); wait for it to end, or give another --out")
            summary = run(cfg, out)
    else:
        summary = run(cfg, out)
    if ddp.rank_from_env() != 0:  # under torchrun rank 0 reports for every rank
        return 0
    keys = ("label", "rule", "test_accuracy", "readout", "probe_accuracy", "chance", "epochs",
            "seconds")
    shown = {k: summary[k] for k in keys if summary.get(k) is not None}
    print(json.dumps(shown))
    if summary.get("already_finished"):
        print(f"{out} holds a finished run: nothing to do (kept {out / 'summary.json'})")
    else:
        print(f"wrote {out / 'summary.json'}")
    return 0


def _keep_own_input(preset: Path, written: Path, cfg) -> None:
    """Refuse a preset that is the file the run writes its resolved config to, unless it holds
    exactly that text (a run resumed from its own ``config.yaml``): its comments, ``base:``
    includes or the command line's overrides would be written over."""
    import yaml

    from locallearn.config import to_dict

    if not (written.is_file() and preset.resolve() == written.resolve()):
        return
    if written.read_text() != yaml.safe_dump(to_dict(cfg), sort_keys=False):
        raise ValueError(
            f"the preset {str(preset)!r} is the file this run writes its resolved config to, and "
            "writing it would lose its text (comments, base:, overrides); copy it out of --out "
            "or give another --out"
        )


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
        help="the RHM study in a minute: backprop, no masking, DFA, layer-wise SSL",
        description="Train the demo RHM with each rule, print a table and plot test accuracy "
        "per epoch. key=value overrides apply to every rule.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--rules", nargs="+", default=list(DEMO_RULES), choices=list(DEMO_RULES),
                   help="rules to run (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_align(args: argparse.Namespace) -> int:
    from locallearn.experiments.runs import load_run
    from locallearn.runfiles import write_json_atomic
    from locallearn.train import Trainer

    loaded = load_run(args.run_dir)
    trainer = Trainer(loaded.cfg, loaded.task, loaded.path)
    trainer.load_checkpoint()
    rows = trainer.alignment(n_batches=args.batches, seed=args.seed)
    write_json_atomic(loaded.path / "alignment.json", rows)
    ref = loaded.rule.reference_rule().name
    print(f"alignment of {loaded.rule.name} with {ref} (cosine per block, {args.batches} batches)")
    print(f"{'block':>5} {'mean':>8} {'std':>8}")
    for r in rows:
        print(f"{r['block']:>5} {r['cosine_mean']:>8.4f} {r['cosine_std']:>8.4f}")
    print(f"wrote {loaded.path / 'alignment.json'}")
    return 0


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "align",
        help="per-block cosine between a trained run's rule update and backprop's",
        description="For a run directory of locallearn run: per block, the cosine similarity "
        "between the rule's weight update and the gradient of its backprop reference (BP-SSL "
        "of the top-block loss for self-supervised rules, cross-entropy backprop otherwise), "
        "on the same batches. Writes RUN_DIR/alignment.json.",
    )
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, default=8, help="batches to average over")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and views")
    p.set_defaults(func=_cmd_align)


def _cmd_theory(args: argparse.Namespace) -> int:
    from locallearn import theory
    from locallearn.runfiles import write_json_atomic

    check_out_dir(args.out)  # before the computation, not after it
    inputs = None
    if args.data == "cifar":
        from locallearn.data.images import load_images

        if args.data_root is None:
            raise ValueError("--data cifar needs --data-root (a CIFAR-10 folder: pickles or "
                             "test/<class>/ images)")
        images = load_images("cifar10", args.data_root, "test").images[: args.images]
        inputs = images
    rows = theory.run_all(inputs, seed=args.seed, threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "theory.json", rows)
    theory.plot(rows, out / "theory.png")
    print(f"cosine similarity between the local and the BP-SSL gradient ({args.data} data)")
    print(theory.format_table(rows))
    print("\nrelative error")
    print(theory.format_table(rows, value="rel_error"))
    print(f"wrote {out / 'theory.json'} and {out / 'theory.png'}")
    return 0


def _add_theory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "theory",
        help="when does a local update equal backprop's? deep linear networks, in float64",
        description="Runs the exactness theorem (orthonormal weights, optimal B), its broken "
        "cases (random B, non-orthogonal W, ReLU), direct feedback with shrinking widths and "
        "grid vs global pooling in a linear CNN; prints the cosine between local and BP-SSL "
        "gradients per layer and writes OUT/theory.json and OUT/theory.png.",
    )
    p.add_argument("--out", default="runs/theory", help="output directory")
    p.add_argument("--data", choices=["gaussian", "cifar"], default="gaussian",
                   help="synthetic Gaussian pairs, or patches of CIFAR-10 test images")
    p.add_argument("--data-root", help="CIFAR-10 folder for --data cifar")
    p.add_argument("--images", type=int, default=2000, help="CIFAR-10 images to cut from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on busy machines)")
    p.set_defaults(func=_cmd_theory)


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    from locallearn.experiments.analyze import add_analyze

    add_analyze(sub)


def _sweep_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    from locallearn.experiments.sweep_commands import add_report, add_results, add_sweep

    return [add_sweep, add_results, add_report]


def _add_probe(sub: argparse._SubParsersAction) -> None:
    from locallearn.experiments.probe_command import add_probe

    add_probe(sub)


def _cmd_rules(args: argparse.Namespace) -> int:
    from locallearn.rules import registered, rule_class
    from locallearn.rules.catalog import describe

    names = args.names or registered()
    infos = describe({name: rule_class(name) for name in names})
    for info in infos:
        print(f"{info.name}: {info.summary}")
        seen = "labels" if info.uses_labels else "no labels"
        views = f", views: {info.view_kind}" if info.view_kind else ""
        print(f"  sees: {seen}{views}")
        for opt in info.options:
            print(f"  rule.options.{opt.name} = {opt.default!r}" +
                  (f"  # {opt.meaning}" if opt.meaning else ""))
        print()
    return 0


def _add_rules(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rules", help="list the rules and their options with defaults and meanings",
        description="Every rule.name the package (and installed plugins) offers: what it sees "
                    "and its rule.options, with their defaults and meanings, read from the "
                    "rules' own Options dataclasses.",
    )
    p.add_argument("names", nargs="*", help="rules to show (default: all)")
    p.set_defaults(func=_cmd_rules)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_rules, _add_run, _add_demo, _add_probe, _add_align, _add_analyze, _add_theory,
    *_sweep_registrars(),
]
