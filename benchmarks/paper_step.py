"""The CLAPP++ step of the library against the paper's public code, side by side.

With the paper's public code (arXiv 2601.21683) checked out in ``--paper-code DIR``, it builds for
each width one VGG-6 (``locallearn.nets.vgg.vgg6``, as the ``clapp++`` preset trains it:
channels-last) and one batch of 32 image pairs, and two ways to fill the gradients of one step:

* ``library``: the ``clapp++`` preset's rule (``rule.compute_grads``: block by block, the paper's
  pairing of negatives, grid pooling 4-4-4-2-2-1);
* ``paper``: the code's own step: every block on its detached input, its ``CPLoss`` with
  ``--asymmetric_W_pred --customize_loss_pool 4-4-4-2-2-1`` on the outputs, the sum of the
  per-block losses backpropagated once, on the same channels-last network (so the two differ
  only in the loss and its gradient);
* ``paper, channels-first``: the same, on a copy of the network in PyTorch's default layout,
  as the paper's code runs it;

with the same encoder weights and the same prediction matrices (the code's channel-major
flattening mapped to the library's position-major one). It checks once that the two fill the same
gradients (the largest relative difference is printed), then times the modes in turns for
``--rounds`` rounds in one process (gradients only; ``--optimizer`` adds an AdamW step to both)
and prints the median seconds of each, the ratio of the medians and the median of the rounds'
ratios, with the load average before and after. Asserts nothing.

    python benchmarks/paper_step.py --paper-code DIR [--widths 0.125 1.0] [--rounds 15]
        [--threads 1] [--optimizer] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locallearn.nets.vgg import vgg6  # noqa: E402
from locallearn.rules import build_rule  # noqa: E402
from locallearn.rules.base import Batch  # noqa: E402
from locallearn.rules.image_grid import channel_major_order  # noqa: E402
from locallearn.runtime import tune_cpu_allocator  # noqa: E402
from locallearn.schema import load_config  # noqa: E402

POOLS = "4-4-4-2-2-1"
PAIRS = 32


def paper_loss(code_dir: str, shapes: list[tuple[int, ...]]):
    """The code's CPLoss for CLAPP++ (the options of its CIFAR-10 script's CLAPP++ run)."""
    sys.path.insert(0, code_dir)
    from vision.arg_parser import arg_parser  # the paper's code, run, not copied
    from vision.models.SSLLoss import CPLoss

    argv, sys.argv = sys.argv, ["x", "--asymmetric_W_pred", "--customize_loss_pool", POOLS]
    try:
        opt = arg_parser.parse_args()
    finally:
        sys.argv = argv
    opt.device = torch.device("cpu")
    return CPLoss(opt, shapes)


def build(width: float, code_dir: str):
    """The network, the library's rule, the code's loss (same matrices) and a batch."""
    cfg = load_config(ROOT / "configs" / "images" / "clapp++.yaml",
                      [f"net.width_mult={width}"])
    net = vgg6(width, seed=0).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * PAIRS, 3, 32, 32, generator=gen).contiguous(
        memory_format=torch.channels_last)
    rule = build_rule(cfg.rule, 0)
    rule.setup(net, x[:2])
    with torch.no_grad():
        shapes = [tuple(h.shape) for h in net.features(x[:2])]
    loss = paper_loss(code_dir, shapes)
    for level, (B, W) in enumerate(zip(rule.B_same, loss.W_k)):
        d, channels = B.shape[0], shapes[level][1]
        w = torch.randn(d, d, generator=torch.Generator().manual_seed(10 + level)) / d
        order = channel_major_order(d, channels)
        with torch.no_grad():
            W.weight.copy_(w)
            B.copy_(w[order][:, order])
    return net, rule, loss, x


def library_step(net, rule, x) -> None:
    rule.compute_grads(net, Batch(x[:PAIRS], None, (x[:PAIRS], x[PAIRS:]), None))


def paper_step(net, loss, x) -> None:
    h, outs = x, []
    for block in net.blocks:
        h = block(h.detach())
        outs.append(h)
    losses, *_ = loss(outs)
    losses["loss"].sum().backward()


#: operator families of the profile's breakdown (the rest is "elementwise and other")
FAMILIES = {
    "convolutions": ("convolution", "conv2d", "mkldnn_conv"),
    "matrix products": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"),
    "pooling": ("pool",),
    "copies and fills": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone",
                         "aten::contiguous", "aten::empty"),
}


def family(name: str) -> str:
    for fam, keys in FAMILIES.items():
        if any(k in name for k in keys):
            return fam
    return "elementwise and other"


def breakdown(step, rounds: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each operator family, over ``rounds`` profiled steps."""
    with torch.profiler.profile() as prof:
        for _ in range(rounds):
            step()
    out: dict[str, float] = {}
    for event in prof.key_averages():
        fam = family(event.key)
        out[fam] = out.get(fam, 0.0) + event.self_cpu_time_total / 1000 / rounds
    return out


def zeroed(step, modules) -> None:
    """``step`` after the gradients of ``modules`` are cleared."""
    zero(*modules)
    step()


def zero(*modules) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def gradient_difference(net, rule, loss, x) -> float:
    """Largest relative difference of the encoder's gradients between the two steps."""
    zero(net, rule, loss)
    library_step(net, rule, x)
    ours = [p.grad.clone() for p in net.parameters()]
    zero(net, rule, loss)
    paper_step(net, loss, x)
    worst = 0.0
    for a, p in zip(ours, net.parameters()):
        worst = max(worst, float((a - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)))
    zero(net, rule, loss)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paper-code", required=True, help="checkout of the paper's code")
    parser.add_argument("--widths", nargs="+", type=float, default=[0.125, 1.0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimizer", action="store_true", help="add an AdamW step to both")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU seconds instead of wall seconds (less "
                        "sensitive to other work on the machine; one thread only)")
    parser.add_argument("--profile", action="store_true",
                        help="print the self CPU time of each operator family in each mode, "
                        "profiled over a third of --rounds steps")
    args = parser.parse_args()
    if not (Path(args.paper_code) / "vision" / "models" / "SSLLoss.py").is_file():
        raise SystemExit(f"--paper-code {args.paper_code!r} holds no vision/models/SSLLoss.py; "
                         "give a checkout of the paper's public code")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    tune_cpu_allocator()
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs), "
          f"{args.threads} thread(s), {'CPU' if args.cpu_time else 'wall'} seconds")
    for width in args.widths:
        net, rule, loss, x = build(width, args.paper_code)
        diff = gradient_difference(net, rule, loss, x)
        # the paper code as it runs: its network in the default (channels-first) layout
        net_cf = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
        x_cf = x.contiguous()
        nets = (net, net_cf, rule, loss)
        opts = {}
        if args.optimizer:
            opts = {"library": torch.optim.AdamW([*net.parameters(), *rule.parameters()]),
                    "paper": torch.optim.AdamW([*net.parameters(), *loss.parameters()]),
                    "paper, channels-first": torch.optim.AdamW([*net_cf.parameters(),
                                                                *loss.parameters()])}
        modes = {"library": functools.partial(library_step, net, rule, x),
                 "paper": functools.partial(paper_step, net, loss, x),
                 "paper, channels-first": functools.partial(paper_step, net_cf, loss, x_cf)}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds + 1):  # the first round warms up
            for name, step in modes.items():
                zero(*nets)
                t0 = clock()
                step()
                if name in opts:
                    opts[name].step()
                if r:
                    times[name].append(clock() - t0)
        ours = statistics.median(times["library"])
        print(f"width {width:g}: gradients equal to {diff:.1e} (relative); library {ours:.4f} s "
              f"(medians of {args.rounds} rounds)", flush=True)
        for name, label in (("paper", "on the library's channels-last network"),
                            ("paper, channels-first", "on its own channels-first layout")):
            theirs = statistics.median(times[name])
            per_round = statistics.median(p / o for o, p in zip(times["library"], times[name]))
            print(f"   paper code {label}: {theirs:.4f} s; paper / library {theirs / ours:.2f}x "
                  f"(median of the rounds' ratios {per_round:.2f}x)", flush=True)
        if args.profile:
            parts = {}
            for name, step in modes.items():
                stepped = functools.partial(zeroed, step, nets)
                parts[name] = breakdown(stepped, max(3, args.rounds // 3))
            print(f"-- width {width:g}: self CPU ms per step by operator family (profiled; "
                  "library / paper code on the same network / paper code channels-first)")
            for fam in [*FAMILIES, "elementwise and other"]:
                row = " ".join(f"{parts[m].get(fam, 0.0):9.2f}" for m in modes)
                print(f"   {fam:24s} {row}")
            totals = " ".join(f"{sum(parts[m].values()):9.2f}" for m in modes)
            shared = sum(min(parts["library"].get(f, 0.0), parts["paper"].get(f, 0.0))
                         for f in ("convolutions", "matrix products"))
            print(f"   {'total':24s} {totals}; the convolutions and products that both need "
                  f"on the same network: {shared:.2f} ms, so the library's step could be at "
                  f"most {sum(parts['paper'].values()) / shared:.2f}x the paper code's with "
                  "nothing else (profiled times: the profiler's cost per operator inflates the "
                  "step with more operators)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
