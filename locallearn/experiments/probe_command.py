"""``locallearn probe RUN_DIR [key=value]``: the linear probe of a saved image run.

Rebuilds the run from its directory (config and last checkpoint; a run of zero epochs probes the
random encoder), runs the probe of :mod:`locallearn.eval.image_probe` with the run's settings or
overridden ones, writes ``RUN_DIR/probe.json`` and updates the probe keys of
``RUN_DIR/summary.json`` (when the run has one). Only probe settings may be overridden:
``probe.*`` (``epochs``, ``lr``, ``weight_decay``, ``steps``, ``augment``, ``per_block``,
``batch_size``, ``grid``) and the images the probe sees (``data.probe_split``,
``data.probe_subset``, ``data.test_split``, ``data.test_subset``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from locallearn.config import deep_merge, parse_overrides, to_dict

PROBE_KEYS_DATA = ("probe_split", "probe_subset", "test_split", "test_subset")


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flat_keys(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


#: settings of the machine, not of the run, that a probe may take (``threads=1`` on a busy one)
PROBE_RUNTIME_KEYS = ("threads",)


def _check_override_keys(overrides: dict[str, Any]) -> None:
    for key in _flat_keys(overrides):
        ok = (key.startswith("probe.") or key in {f"data.{k}" for k in PROBE_KEYS_DATA}
              or key in PROBE_RUNTIME_KEYS)
        if not ok:
            raise ValueError(
                f"override {key!r} cannot change a saved run; valid: probe.*, threads, "
                + ", ".join(f"data.{k}" for k in PROBE_KEYS_DATA)
            )


def probe_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Probe the encoder saved in ``run_dir``; write ``probe.json``; return the probe keys.

    Raises ValueError when ``run_dir`` holds no image run or an override is not a probe setting.
    """
    from locallearn.experiments.image_task import ImageTask, write_probe
    from locallearn.experiments.runs import load_run
    from locallearn.runfiles import SUMMARY, write_json_atomic
    from locallearn.schema import build_config

    parsed = parse_overrides(overrides or [])
    _check_override_keys(parsed)
    run = load_run(run_dir, device)
    if not isinstance(run.task, ImageTask):
        raise ValueError(
            f"{str(run_dir)!r} holds a run on data.name={run.cfg.data.name!r}; "
            "locallearn probe works on image runs"
        )
    cfg = build_config(deep_merge(to_dict(run.cfg), parsed))
    if "threads" in parsed and cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    result = run.task.probe(run.net, cfg.probe, cfg.data, progress=progress)
    keys = write_probe(run.path, result)
    summary_path = run.path / SUMMARY
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for key in ("probe_block_accuracies", "probe_block_silent", "probe_top_accuracy",
                    "probe_top_silent"):
            summary.pop(key, None)
        summary.update(keys)
        write_json_atomic(summary_path, summary)
    return {"run": str(run.path), "epoch": run.epoch, **keys}


def _cmd_probe(args: argparse.Namespace) -> int:
    out = probe_run(args.run_dir, args.overrides, args.device, progress=not args.quiet)
    shown = {k: v for k, v in out.items() if k != "probe_protocol"}
    print(json.dumps(shown))
    print(out["probe_protocol"])
    print(f"wrote {Path(args.run_dir) / 'probe.json'}")
    return 0


def add_probe(sub: argparse._SubParsersAction) -> None:
    """Add ``locallearn probe RUN_DIR [key=value]`` to the command line."""
    p = sub.add_parser(
        "probe",
        help="linear probe of a saved image run (also of a zero-epoch run: random encoder)",
        description="Probe the encoder saved in RUN_DIR (made by locallearn run) and write "
        "RUN_DIR/probe.json; summary.json's probe_accuracy is updated. Overrides change only "
        "probe settings, e.g. probe.epochs=100 probe.augment=true probe.per_block=true.",
    )
    p.add_argument("run_dir", help="output directory of a locallearn run")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--device", default=None, help="device to probe on (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_probe)
