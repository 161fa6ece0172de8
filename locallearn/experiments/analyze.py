"""``locallearn analyze RUN_DIR``: what each block of a finished RHM run has learned.

Runs the measures of :mod:`locallearn.eval.rhm_measures` on the run's last checkpoint:

- latent probes, fitted on (up to ``n_samples`` of) the run's training set and scored on (up to
  ``n_samples`` of) its test set; a run without a test set is scored on fresh samples drawn with
  replacement from ``seed`` (these may repeat training samples);
- synonym sensitivity ``S(k, l)`` on the same test samples, synonyms redrawn from ``seed``;
- masking (input specificity of the feedback from the blocks above) on the same test samples,
  for the backprop path of the trained network and of the initial network (the same config
  rebuilt from its seed); for direct-feedback runs also the rule's own fixed feedback, for the
  no-masking control its batch-mean gates.

Writes ``analysis.json`` (the rows, NaN written as ``null``), ``probes.png``,
``sensitivity.png`` and ``masking.png`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from locallearn.eval.rhm_measures import latent_probes, masking, synonym_sensitivity
from locallearn.runfiles import ANALYSIS, CONFIG, SUMMARY

PLOTS = ("probes.png", "sensitivity.png", "masking.png")


def analyze_run(
    run_dir: str | Path,
    n_samples: int = 2000,
    seed: int = 0,
    plots: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Measure a finished (or interrupted) RHM run of any rule; write its analysis files.

    Args:
        run_dir: a directory written by ``locallearn run`` with ``data.name=rhm``.
        n_samples: at most this many training samples fit the probes and this many test samples
            score them and feed the sensitivity and masking measures (``>= 2``).
        seed: seed of the redrawn synonyms, random pairs and any fresh samples.
        plots: write the PNG figures.
        device: where the network and data are loaded.

    Returns:
        The rows of every measure (see :mod:`locallearn.eval.rhm_measures`); masking rows carry
        ``state`` (``init`` or ``trained``) and ``feedback``.

    Raises:
        ValueError: missing directory, not a run, not an RHM run, bad arguments.
    """
    from locallearn.experiments.runs import load_run

    path = _check_arguments(Path(run_dir), n_samples, seed)
    run = load_run(path, device=device)
    task = run.task
    rhm = getattr(task, "rhm", None)
    if rhm is None:
        raise ValueError(f"analyze: {str(path)!r} is not an RHM run")
    gen = torch.Generator().manual_seed(seed)

    train_tokens = task.train.tokens[:n_samples]
    test_tokens = task.test.tokens[:n_samples]
    if len(test_tokens) < 2:
        test_tokens = rhm.sample_with_replacement(n_samples, gen).tokens.to(train_tokens.device)
    if len(train_tokens) < 2:
        raise ValueError(f"analyze: {str(path)!r} has fewer than 2 training samples")

    net = run.net.eval()
    probe_cfg = run.cfg.probe
    rows = latent_probes(
        net, rhm, train_tokens, test_tokens, encode=task.encode,
        weight_decay=probe_cfg.weight_decay, steps=probe_cfg.steps,
    )
    rows += synonym_sensitivity(net, rhm, test_tokens, gen, encode=task.encode)
    rows += _masking_rows(run, task.encode(test_tokens))

    _write_json(path / ANALYSIS, rows)
    if plots:
        d, r = run.cfg.data, run.cfg.rule
        rule = (f"{r.name} ({r.options.get('loss')}, {r.options.get('view')})"
                if r.name == "layerwise" else run.rule.name)
        title = (f"{rule}, epoch {run.epoch}: RHM v={d.v} n_c={d.n_classes} m={d.m} "
                 f"s={d.s} L={d.L}, P={task.n_train}")
        plot_analysis(rows, path, title)
    return rows


def _check_arguments(path: Path, n_samples: int, seed: int) -> Path:
    """One-line ValueErrors for bad arguments or a folder that holds no RHM run."""
    from locallearn.config import load_yaml

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"analyze: n_samples={n_samples!r} is invalid: must be an integer >= 2")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"analyze: seed={seed!r} is invalid: must be an integer >= 0")
    if not path.is_dir():
        raise ValueError(f"analyze: run directory {str(path)!r} does not exist")
    if (path / CONFIG).is_file():
        data = load_yaml(path / CONFIG).get("data") or {}
        name = data.get("name", "rhm") if isinstance(data, dict) else None
        if name != "rhm":
            raise ValueError(f"analyze: {str(path)!r} is a run on data.name={name!r}, not rhm")
    return path


def _masking_rows(run: Any, x: torch.Tensor) -> list[dict[str, Any]]:
    """Masking of the untrained and the trained network, and through the rule's own backward
    path where it has one (DFA's fixed feedback, backprop's batch-averaged gates)."""
    from locallearn.rules.backprop import BackpropNoMask
    from locallearn.rules.feedback import DirectFeedback

    net = run.net
    torch.manual_seed(run.cfg.seed)
    init_net = run.task.build_net().eval()
    rows: list[dict[str, Any]] = []
    if all(hasattr(block, "post") for block in net.blocks):  # not for discrete codes
        rows += masking(init_net, x, state="init")
        rows += masking(net, x, state="trained")
    if isinstance(run.rule, DirectFeedback) and run.rule.n_blocks:
        fixed = [run.rule.feedback(level) for level in range(run.rule.n_blocks)]
        rows += masking(net, x, feedback=fixed, state="trained")
    elif isinstance(run.rule, BackpropNoMask):
        rows += masking(net, x, mode="mean-gates", state="trained")
    return rows


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    clean = [{k: _clean(v) for k, v in row.items()} for row in rows]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- tables
def _grid(
    rows: list[dict[str, Any]], measure: str, **match: Any
) -> tuple[list[int], list[int], dict[tuple[int, int], float]]:
    sel = [r for r in rows if r["measure"] == measure
           and all(r.get(k) == v for k, v in match.items())]
    layers = sorted({r["layer"] for r in sel})
    depths = sorted({r["depth"] for r in sel})
    return layers, depths, {(r["layer"], r["depth"]): r["value"] for r in sel}


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "   -  "
    return f"{value:6.3f}"


def format_analysis(rows: list[dict[str, Any]]) -> str:
    """A compact text table of probe accuracies, sensitivities and masking."""
    lines: list[str] = []
    layers, depths, grid = _grid(rows, "probe", features="position", split="random")
    if layers:
        flat = {r["layer"]: r for r in rows
                if r["measure"] == "probe" and r.get("features") == "flat"}
        split = {r["layer"]: r for r in rows
                 if r["measure"] == "probe" and r.get("split") == "synonyms"}
        lines.append("latent probe accuracy (held-out), layer x depth of the node; "
                     "[input patch]; flat = class from the whole layer;")
        lines.append("unseen synonyms = own node's symbol, fitted and scored on disjoint "
                     "synonyms")
        lines.append("layer " + "".join(f"   depth {d:<6d}" for d in depths)
                     + "   flat   unseen synonyms")
        for layer in layers:
            cells = []
            for d in depths:
                row = next((r for r in rows if r["measure"] == "probe"
                            and r.get("features") == "position" and r.get("split") == "random"
                            and r["layer"] == layer and r["depth"] == d), None)
                if row is None:
                    cells.append(" " * 15)
                else:
                    base = row.get("input_patch")
                    cells.append(f"{_fmt(row['value'])} [{_fmt(base).strip():>5}]")
            f = flat.get(layer)
            u = split.get(layer)
            lines.append(f"{layer:>5} " + "".join(f" {c:<14}" for c in cells)
                         + ("  " + _fmt(f["value"]) if f else " " * 8)
                         + (f"  {_fmt(u['value'])} [{_fmt(u.get('input_patch')).strip()}]"
                            if u else ""))
        chances = {r["depth"]: r["chance"] for r in rows if r["measure"] == "probe"
                   and r.get("features") == "position" and r.get("split") == "random"}
        split_chance = " ".join(_fmt(split[layer]["chance"]).strip() for layer in sorted(split))
        lines.append("chance" + "".join(f"   {_fmt(chances[d])}      " for d in depths)
                     + "  (majority)" + (f" unseen: {split_chance}" if split else ""))
    layers, depths, grid = _grid(rows, "sensitivity")
    if layers:
        lines.append("")
        lines.append("synonym sensitivity S(k, l), synonyms at depth >= k redrawn "
                     "(layer 0 = input; low = invariant)")
        lines.append("layer " + "".join(f"   k={k:<4d}" for k in depths))
        for layer in layers:
            lines.append(f"{layer:>5} " + "".join(f"   {_fmt(grid.get((layer, k)))}"
                                                   for k in depths))
    masks = [r for r in rows if r["measure"] == "masking"]
    if masks:
        lines.append("")
        lines.append("masking: input-specific share of the feedback from the blocks above")
        cols = sorted({(r.get("state", ""), r.get("feedback", "")) for r in masks},
                      key=lambda c: (c[0] != "init", c[1] != "backprop", c))
        lines.append("layer " + "".join(f" {s + '/' + f:>18}" for s, f in cols))
        for layer in sorted({r["layer"] for r in masks}):
            vals = {(r.get("state", ""), r.get("feedback", "")): r["value"]
                    for r in masks if r["layer"] == layer}
            lines.append(f"{layer:>5} " + "".join(f" {_fmt(vals.get(c)):>18}" for c in cols))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures
def _heat(ax, layers, depths, grid, title, xlabel, vmax: float = 1.0):
    import numpy as np

    data = np.full((len(layers), len(depths)), np.nan)
    for i, layer in enumerate(layers):
        for j, d in enumerate(depths):
            v = grid.get((layer, d))
            if v is not None:
                data[i, j] = v
    im = ax.imshow(data, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
    for i in range(len(layers)):
        for j in range(len(depths)):
            if np.isfinite(data[i, j]):
                color = "black" if data[i, j] > 0.6 * vmax else "white"
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color=color)
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    return im


def plot_names(rows: list[dict[str, Any]]) -> list[str]:
    """The PNGs :func:`plot_analysis` writes for ``rows``: no masking plot for a network of
    discrete codes (it has no masking rows: nothing is sent back through it)."""
    return [p for p in PLOTS if p != PLOTS[2] or any(r["measure"] == "masking" for r in rows)]


def plot_analysis(rows: list[dict[str, Any]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``probes.png``, ``sensitivity.png`` and ``masking.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = []
    # probes: network | input-patch baseline
    layers, depths, grid = _grid(rows, "probe", features="position", split="random")
    base = {(r["layer"], r["depth"]): r.get("input_patch") for r in rows
            if r["measure"] == "probe" and r.get("features") == "position"
            and r.get("split") == "random"}
    base = {k: v for k, v in base.items() if v is not None}
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8), layout="constrained")
    im = _heat(axes[0], layers, depths, grid, "latent probe accuracy", "depth of the node")
    _heat(axes[1], layers, depths, base, "same probe on the input patch", "depth of the node")
    fig.colorbar(im, ax=axes[:2], shrink=0.8)
    split = sorted((r for r in rows if r["measure"] == "probe" and r.get("split") == "synonyms"),
                   key=lambda r: r["layer"])
    ax = axes[2]
    if split:
        xs = [r["layer"] for r in split]
        ax.bar([x - 0.2 for x in xs], [r["value"] for r in split], 0.4, label="network")
        ax.bar([x + 0.2 for x in xs], [r.get("input_patch") or 0.0 for r in split], 0.4,
               label="input patch")
        ax.plot(xs, [r["chance"] for r in split], "k--", linewidth=1, label="chance")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (node at depth L - layer)")
    ax.set_title("own node's symbol, unseen synonyms", fontsize=9)
    fig.suptitle(title, fontsize=9)
    paths.append(out / PLOTS[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # sensitivity
    layers, depths, grid = _grid(rows, "sensitivity")
    finite = [v for v in grid.values() if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(5.2, 3.8), layout="constrained")
    im = _heat(ax, layers, depths, grid, "synonym sensitivity S(k, l)",
               "k (synonyms at depth >= k redrawn)", vmax=max([1.0, *finite]))
    fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=8)
    paths.append(out / PLOTS[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # masking
    if PLOTS[2] not in plot_names(rows):
        return paths
    masks = [r for r in rows if r["measure"] == "masking"]
    cols = sorted({(r.get("state", ""), r.get("feedback", "")) for r in masks},
                  key=lambda c: (c[0] != "init", c[1] != "backprop", c))
    layer_ids = sorted({r["layer"] for r in masks})
    fig, ax = plt.subplots(figsize=(5.2, 3.8), layout="constrained")
    width = 0.8 / max(len(cols), 1)
    for i, col in enumerate(cols):
        vals = {r["layer"]: r["value"] for r in masks
                if (r.get("state", ""), r.get("feedback", "")) == col}
        xs = [layer + (i - (len(cols) - 1) / 2) * width for layer in layer_ids]
        ax.bar(xs, [vals.get(layer, 0.0) for layer in layer_ids], width,
               label=f"{col[0]}, {col[1]}")
    ax.set_xticks(layer_ids, [str(layer) for layer in layer_ids])
    ax.set_xlabel("layer")
    ax.set_ylabel("Var_x[M_l(x)] / E_x[M_l(x)^2]")
    ax.set_ylim(0, 1.0)
    ax.set_title("input specificity of the feedback from above", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    paths.append(out / PLOTS[2])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------- command
def analysis_targets(paths: list[str], redo: bool = False) -> list[Path]:
    """The run folders ``locallearn analyze`` measures: each path that is a run, and every
    finished RHM run of each path that is a sweep folder (``runs/*`` with a summary), less
    those already analysed unless ``redo``."""
    from locallearn.config import load_yaml

    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if (path / CONFIG).is_file() or not (path / "runs").is_dir():
            out.append(path)  # a run (analyze_run says what is wrong with it)
            continue
        for run in sorted(p for p in (path / "runs").iterdir() if (p / SUMMARY).is_file()):
            data = load_yaml(run / CONFIG).get("data") if (run / CONFIG).is_file() else None
            rhm = isinstance(data, dict) and data.get("name", "rhm") == "rhm"
            if rhm and (redo or not (run / ANALYSIS).is_file()):
                out.append(run)
    return out


def _cmd_analyze(args: argparse.Namespace) -> int:
    targets = analysis_targets(args.run_dir, args.redo)
    if len(args.run_dir) == 1 and targets == [Path(args.run_dir[0])]:
        rows = analyze_run(targets[0], n_samples=args.samples, seed=args.seed)
        print(format_analysis(rows))
        out = targets[0]
        print(f"wrote {out / ANALYSIS} and {', '.join(str(out / p) for p in plot_names(rows))}")
        return 0
    # several runs (or a sweep folder): each writes its own files as it finishes, so an
    # interrupted call loses nothing and the next call goes on with the runs not yet analysed
    print(f"analyze: {len(targets)} run(s) to measure")
    for i, run in enumerate(targets, 1):
        rows = analyze_run(run, n_samples=args.samples, seed=args.seed)
        unseen = {r["layer"]: r["value"] for r in rows
                  if r["measure"] == "probe" and r.get("split") == "synonyms"}
        text = " ".join(f"{layer}:{value:.3f}" for layer, value in sorted(unseen.items()))
        print(f"[{i}/{len(targets)}] {run}: unseen-synonym probe per layer {text}", flush=True)
    return 0


def add_analyze(sub: argparse._SubParsersAction) -> None:
    """Register ``locallearn analyze RUN_DIR [--samples N] [--seed S]``."""
    p = sub.add_parser(
        "analyze",
        help="what each layer of a finished RHM run has learned: latent probes, synonym "
        "sensitivity, masking",
        description="Measure the last checkpoint of an RHM run made by locallearn run: linear "
        "probes from every layer to the hidden latents, sensitivity to redrawn synonyms, and the "
        "input specificity of backprop's feedback. Writes analysis.json and PNGs into RUN_DIR. "
        "Given a sweep folder, measures its finished RHM runs; locallearn report then draws the "
        "unseen-synonym probes against the training-set size.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="+",
                   help="output directory of locallearn run, or a sweep folder (every finished "
                   "RHM run in it that has no analysis yet)")
    p.add_argument("--redo", action="store_true",
                   help="in a sweep folder, measure again the runs already analysed")
    p.add_argument("--samples", type=int, default=2000,
                   help="training samples for the probes and test samples for every measure "
                   "(default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of redrawn synonyms and pairs")
    p.set_defaults(func=_cmd_analyze)
