"""The ``locallearn`` command line.

Only this module prints and chooses exit codes: 0 ok, 1 the run failed (a RunError, or any other
error once a run has started, out of memory and a full disk included), 2 bad input (a
ValueError), 130 on Ctrl-C (SIGINT) and 143 on SIGTERM (what a batch scheduler or ``timeout``
sends before it kills): both stop the run as it is, keep its finished work and last checkpoint,
and print one line; the same command then resumes. Errors are one line;
``LOCALLEARN_TRACEBACK=1`` shows the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable, Sequence

from locallearn.errors import RunError
from locallearn.runtime import tune_cpu_allocator

DEFAULT_RHM = {"v": 8, "n_classes": 8, "m": 4, "s": 2, "L": 3, "seed_rules": 0}


def _cmd_rhm_info(args: argparse.Namespace) -> int:
    from locallearn.config import parse_key_values
    from locallearn.data.rhm import RHM

    params: dict[str, object] = dict(DEFAULT_RHM)
    for key, value in parse_key_values(args.params, "RHM parameter").items():
        if key not in DEFAULT_RHM:
            raise ValueError(
                f"unknown RHM parameter {key!r}; valid: {', '.join(DEFAULT_RHM)}"
            )
        try:
            params[key] = int(value)
        except ValueError:
            raise ValueError(f"RHM: {key}={value!r} is not an integer") from None
    rhm = RHM(**params)  # type: ignore[arg-type]
    n = min(args.samples, rhm.P_max)
    print(rhm)
    print(f"P_max  = {rhm.P_max}  (distinct inputs, n_classes * m**((s**L-1)/(s-1)))")
    print(f"P_star = {rhm.P_star}  (n_classes * m**L)")
    print(f"input  = {rhm.input_size} tokens; one-hot shape (batch, {rhm.v}, {rhm.input_size})")
    print(f"rules  = {[tuple(r.shape) for r in rhm.rules]}")
    if n:
        data, _ = rhm.sample(n_train=n, n_test=0, seed_sample=args.seed_sample)
        for row in range(n):
            index = "" if data.indices is None else f" (index {int(data.indices[row])})"
            print(f"\nsample {row}{index}, class {int(data.labels[row])}:")
            print(rhm.describe_tree(data.labels, data.tokens, row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="locallearn",
        description="Train networks with local learning rules and compare them with backprop.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    rhm = sub.add_parser("rhm", help="the Random Hierarchy Model dataset")
    rhm_sub = rhm.add_subparsers(dest="rhm_command", metavar="SUBCOMMAND")
    rhm_sub.required = True
    info = rhm_sub.add_parser(
        "info",
        help="print an RHM's sizes and a few decoded samples with their trees",
        description="Parameters as key=value (defaults): "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_RHM.items()),
    )
    info.add_argument("params", nargs="*", metavar="key=value")
    info.add_argument("--samples", type=int, default=3, help="decoded samples to show")
    info.add_argument("--seed-sample", type=int, default=0, help="seed of the shown samples")
    info.set_defaults(func=_cmd_rhm_info)

    for register in _REGISTRARS:
        register(sub)
    return parser


#: Functions adding more subcommands to the parser (filled by the modules that define them).
_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = []


def _load_registrars() -> None:
    from locallearn.experiments import commands

    _REGISTRARS[:] = commands.REGISTRARS


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as on Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``locallearn`` command. Returns the exit code."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals to the caller
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    _load_registrars()
    tune_cpu_allocator()
    parser = build_parser()
    # key=value overrides may come before or after options such as --out
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except RunError as err:
        return _fail(str(err), 1)
    except ValueError as err:
        return _fail(str(err), 2)
    except Terminated:
        print("locallearn: terminated (SIGTERM); finished work and the last checkpoint are "
              "kept, and the same command resumes", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("locallearn: interrupted; finished work and the last checkpoint are kept",
              file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno == errno.ENOSPC or "no space left" in str(err).lower():
            return _fail(f"the disk is full: {err.strerror or err}", 1)
        return _unexpected(err)
    except Exception as err:  # noqa: BLE001 - anything else: one line, exit 1
        return _unexpected(err)


def _unexpected(err: BaseException) -> int:
    """One line for an error the package did not foresee (exit 1)."""
    if os.environ.get("LOCALLEARN_TRACEBACK") == "1":
        raise err
    what = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return _fail(f"out of memory: {what} (lower batch_size or the net's size)", 1)
    return _fail(f"{type(err).__name__}: {what} (LOCALLEARN_TRACEBACK=1 shows where)", 1)


def _fail(message: str, code: int) -> int:
    """Print one line of error (the first line of ``message``) and return ``code``."""
    line = message.splitlines()[0] if message else "failed"
    print(f"locallearn: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
