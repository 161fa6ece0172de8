"""Speed and memory of one training step: layer-wise CLAPP++ against end-to-end BP-SSL.

For VGG-6 at full width and at 1/8 width, a batch of 32 image pairs (64 views) of 32x32, and
each of

* ``clapp++ block``: the layer-wise rule stepped block by block, each block's graph freed before
  the next block runs;
* ``clapp++ block mb2`` (``mb4``): the same, the batch taken through the encoder in 2 (4)
  micro-batches (the same gradients; the activation memory of one block of one part);
* ``clapp++ summed``: the same losses summed and backpropagated once (inputs still detached);
* ``bp-clapp++``: the CLAPP++ loss on the top block, backpropagated end to end (``mb2``: in 2
  micro-batches, the same gradients: its context is detached too);
* ``bp-infonce``: InfoNCE with a linear projection, backpropagated end to end;

it prints the seconds per step (gradients + AdamW step, and the gradients alone; median over
``--steps`` timed steps after one warm-up step), the activation memory held for backward (the peak
bytes of tensors saved by autograd, counted exactly with saved-tensor hooks, parameters excluded)
and the peak resident memory above the baseline of the built model (parameters, gradients and
optimiser state allocated before any activation; gradients are zeroed in place), while the
gradients are computed and over the whole step. Each measurement runs in its own process. Ratios
are against BP-CLAPP++ (same loss, end-to-end backprop). Asserts nothing.

Every mode runs as the presets train: channels-last encoder, fused AdamW, the allocator tuned by
:func:`locallearn.runtime.tune_cpu_allocator` (``--plain`` turns the three off).

The layer-wise rules own one dense prediction matrix per block on the flattened grid-pooled map
(at full width 830 MiB of parameters in all, against 126 MiB for BP-CLAPP++): their optimiser
step costs time and temporary memory in proportion, which the "whole step" figures include.

    python benchmarks/train_step.py [--widths 0.125 1.0] [--steps 2] [--threads N]
        [--modes "clapp++ block" "clapp++ block mb2" bp-clapp++ ...] [--plain] [--repeat R]

Full width on a CPU takes a few seconds per step; ``--widths 0.125`` runs in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

MODES = ("clapp++ block", "clapp++ block mb2", "clapp++ block mb4", "clapp++ summed",
         "bp-clapp++", "bp-clapp++ mb2", "bp-infonce")
EXTRA_MODES = ("clapp++dfb block", "clapp++both block", "clapp block")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_rule(mode: str):
    """The rule of a benchmark mode."""
    from locallearn.rules.image_bp import BPSSL
    from locallearn.rules.image_local import LocalImageRule

    if mode.startswith("bp-clapp++"):
        parts = int(mode.split()[1][2:]) if " " in mode else 1
        return BPSSL("clapp", "auto", micro_batches=parts)
    if mode == "bp-infonce":
        return BPSSL("infonce")
    name, step, *rest = mode.split()
    parts = int(rest[0][2:]) if rest else 1
    context = {"clapp++": "same", "clapp++dfb": "top", "clapp++both": "both", "clapp": "same"}
    pool = "global" if name == "clapp" else "auto"
    return LocalImageRule(context[name], pool, "hinge", "next", step=step, micro_batches=parts)


def _encoder_and_batch(width: float, pairs: int, side: int, plain: bool):
    """VGG-6 at ``width`` and a batch of random view pairs, set up as the presets train
    (channels-last, tuned allocator) unless ``plain``."""
    import torch

    from locallearn.nets.vgg import vgg6
    from locallearn.rules.base import Batch
    from locallearn.runtime import tune_cpu_allocator

    if not plain:
        tune_cpu_allocator()
    torch.manual_seed(0)
    net = vgg6(width, seed=0)
    if not plain:
        net = net.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(pairs, 3, side, side, generator=g)
    v2 = torch.randn(pairs, 3, side, side, generator=g)
    return net, Batch(v1, None, (v1, v2), g)


def _rule_and_optimiser(mode: str, net, batch, plain: bool):
    """The rule of ``mode`` set up for ``net`` and its AdamW (fused unless ``plain``)."""
    import torch

    rule = build_rule(mode)
    rule.setup(net, batch.x)
    opt = torch.optim.AdamW(rule.trained_parameters(net), lr=2e-4,
                            fused=None if plain else True)
    return rule, opt


def measure(width: float, mode: str, steps: int, pairs: int, side: int, plain: bool) -> dict:
    """One measurement, in this process."""
    import gc

    import torch

    from locallearn.eval.memory import saved_activation_meter

    net, batch = _encoder_and_batch(width, pairs, side, plain)
    rule, opt = _rule_and_optimiser(mode, net, batch, plain)
    params = rule.trained_parameters(net)

    def step() -> tuple[float, float, int, int]:
        """One step: (seconds of the gradients, of the optimiser, peak RSS KiB during each)."""
        opt.zero_grad(set_to_none=False)
        _reset_peak_rss()
        t0 = time.perf_counter()
        rule.compute_grads(net, batch)
        t1 = time.perf_counter()
        hwm_grads = _status_kib("VmHWM")
        opt.step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, hwm_grads, _status_kib("VmHWM")

    # gradients and optimiser state exist before the baseline; no activation was ever allocated
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    gc.collect()
    baseline = _status_kib("VmRSS")
    exact_rss = _reset_peak_rss()
    with saved_activation_meter(net, rule) as meter:
        step()  # warm-up (not timed)
        runs = [step() for _ in range(steps)]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    peak_grads = max(r[2] for r in runs)
    peak_step = max(r[3] for r in runs)
    return {
        "width": width,
        "mode": mode,
        "seconds_per_step": statistics.median(r[0] + r[1] for r in runs),
        "seconds_grads": statistics.median(r[0] for r in runs),
        "saved_mib": meter.peak_bytes / 2**20,
        "rss_grads_mib": (peak_grads - baseline) / 1024 if exact_rss else None,
        "rss_step_mib": (peak_step - baseline) / 1024 if exact_rss else None,
        "param_mib": param_bytes / 2**20,
        "threads": torch.get_num_threads(),
    }


def time_interleaved(width: float, modes: list[str], steps: int, pairs: int, side: int,
                     plain: bool) -> dict[str, tuple[float, float]]:
    """Seconds per step and of the gradients of every mode, timed in turns in this process.

    One encoder and batch for all modes (each with its own rule and optimiser); every round
    runs one step of each mode, so a slow spell of a shared machine hits all modes alike.
    Medians over ``steps`` rounds after one warm-up round.
    """
    net, batch = _encoder_and_batch(width, pairs, side, plain)
    setups = [(mode, *_rule_and_optimiser(mode, net, batch, plain)) for mode in modes]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for round_ in range(steps + 1):
        for mode, rule, opt in setups:
            opt.zero_grad(set_to_none=False)
            t0 = time.perf_counter()
            rule.compute_grads(net, batch)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if round_:
                times[mode].append((t2 - t0, t1 - t0))
    return {m: (statistics.median(a for a, _ in ts), statistics.median(b for _, b in ts))
            for m, ts in times.items()}


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child_mode == "interleaved":
        result = time_interleaved(args.child_width, args.modes, args.interleave, args.pairs,
                                  args.side, args.plain)
    else:
        result = measure(args.child_width, args.child_mode, args.steps, args.pairs, args.side,
                         args.plain)
    print("RESULT " + json.dumps(result))


def _run_child(width: float, mode: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-width", str(width),
           "--child-mode", mode, "--steps", str(args.steps), "--pairs", str(args.pairs),
           "--side", str(args.side), "--interleave", str(args.interleave), "--modes", *args.modes]
    if args.plain:
        cmd.append("--plain")
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {mode} at width {width} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def _median_row(results: list[dict]) -> dict:
    """One row per mode: the median of every figure over the repeats."""
    row = dict(results[0])
    for key, value in row.items():
        if isinstance(value, float) and all(r[key] is not None for r in results):
            row[key] = statistics.median(r[key] for r in results)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 1.0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measurements per mode (modes in turn; medians are shown)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="time the modes in turns in one process, ROUNDS steps each (the "
                             "times shown; memory still from one process per mode)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's default)")
    parser.add_argument("--pairs", type=int, default=32, help="image pairs per batch")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels")
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        choices=list(MODES) + list(EXTRA_MODES))
    parser.add_argument("--plain", action="store_true",
                        help="contiguous layout, AdamW's default implementation, default allocator")
    parser.add_argument("--child-width", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mode is not None:
        _child(args)
        return

    threads = args.threads if args.threads is not None else "default"
    print(f"VGG-6, {args.pairs} pairs ({2 * args.pairs} views) of {args.side}x{args.side}, "
          f"threads: {threads}, median of {args.steps} steps after 1 warm-up, "
          f"{args.repeat} process(es) per mode")
    header = (f"{'width':>6} {'mode':<18} {'s/step':>7} {'s grads':>8} {'saved MiB':>9} "
              f"{'RSS+ grads':>10} {'RSS+ step':>9} {'params MiB':>10} {'time/BP':>7} "
              f"{'saved/BP':>8} {'RSS+g/BP':>8}")
    for width in args.widths:
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for _ in range(args.repeat):  # modes in turn, so that a slow spell hits all of them
            for m in args.modes:
                result = _run_child(width, m, args)
                if result is not None:
                    runs[m].append(result)
        rows = [_median_row(rs) for rs in runs.values() if rs]
        if args.interleave:
            timed = _run_child(width, "interleaved", args)
            for r in rows:
                if timed is not None and r["mode"] in timed:
                    r["seconds_per_step"], r["seconds_grads"] = timed[r["mode"]]
        ref = next((r for r in rows if r["mode"] == "bp-clapp++"), None)
        print()
        print(header)
        for r in rows:
            t_ratio = s_ratio = m_ratio = None
            if ref is not None:
                t_ratio = r["seconds_per_step"] / ref["seconds_per_step"]
                s_ratio = r["saved_mib"] / ref["saved_mib"] if ref["saved_mib"] else None
                if r["rss_grads_mib"] is not None and ref["rss_grads_mib"]:
                    m_ratio = r["rss_grads_mib"] / ref["rss_grads_mib"]
            print(f"{width:>6g} {r['mode']:<18} {r['seconds_per_step']:>7.3f} "
                  f"{r['seconds_grads']:>8.3f} {r['saved_mib']:>9.1f} "
                  f"{_fmt(r['rss_grads_mib'], '>10.1f')} {_fmt(r['rss_step_mib'], '>9.1f')} "
                  f"{r['param_mib']:>10.1f} {_fmt(t_ratio, '>7.2f')} {_fmt(s_ratio, '>8.2f')} "
                  f"{_fmt(m_ratio, '>8.2f')}")
    if args.interleave:
        print(f"\ntimes: medians of {args.interleave} rounds of one step per mode, in turns in "
              "one process")
    print("\ns/step: gradients + AdamW step; s grads: the rule's gradients only. saved MiB: peak "
          "activations held for backward (saved-tensor hooks, exact). RSS+ grads / step: peak "
          "resident memory above the built model (parameters, gradients, optimiser state) while "
          "the gradients are computed / over the whole step (the optimiser's temporaries scale "
          "with the parameters, e.g. the prediction matrices B). Ratios against bp-clapp++.")


if __name__ == "__main__":
    main()
