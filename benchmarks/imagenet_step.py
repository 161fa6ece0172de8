"""Throughput and peak memory of the ImageNet presets' training step, on random images.

For each preset of ``configs/imagenet/`` (CLAPP++DFB, BP-CLAPP++, BP-InfoNCE): VGG-8 at
``--width``, a batch of ``--batch`` random ``uint8`` images of ``--load-size`` px on the device, the
two views made there (random resized crop to ``--side`` px and the rest of the SSL pipeline), the
rule's gradients and the LARS step, as ``locallearn run`` trains. Prints the median seconds per
step over ``--steps`` timed steps (after ``--warmup`` steps), images per second, the peak device
memory (CUDA: ``max_memory_allocated``) or the peak resident memory of the process (CPU), and the
projected time of ``--epochs`` epochs of ImageNet's 1,281,167 training images at that speed
(data loading not included: see ``benchmarks/stream_loader.py``). Each preset runs in its own
process. Asserts nothing.

    python benchmarks/imagenet_step.py --device cuda            # the paper's size: 224 px, width 1
    python benchmarks/imagenet_step.py --device cpu --width 0.0625 --side 64 --load-size 70
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("clapp++dfb", "bp-clapp++", "bp-infonce")
IMAGENET_TRAIN = 1_281_167


def child(args: argparse.Namespace) -> dict:
    import torch

    from locallearn.data.augment import SSLViews, center_crop, normalize
    from locallearn.nets.vgg import VGG_KINDS
    from locallearn.optim import build_optimizer
    from locallearn.rules import build_rule
    from locallearn.rules.base import Batch
    from locallearn.schema import load_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = load_config(ROOT / "configs" / "imagenet" / f"{args.preset}.yaml",
                      [f"net.width_mult={args.width}", f"batch_size={args.batch}"])
    net = VGG_KINDS[cfg.net.kind](args.width, bias=cfg.net.bias, seed=0).to(dev)
    net = net.to(memory_format=torch.channels_last)
    views = SSLViews("imagenet", size=args.side).to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.load_size, args.load_size), generator=g,
                      dtype=torch.uint8).to(dev)

    def clean(images: torch.Tensor) -> torch.Tensor:
        return normalize(center_crop(images, args.side), "imagenet")

    rule = build_rule(cfg.rule, 0)
    rule.setup(net, clean(x[:2]))
    rule.to(dev)
    params = rule.trained_parameters(net)
    opt, sched = build_optimizer(cfg, params, steps_per_epoch=IMAGENET_TRAIN // args.batch)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step() -> None:
        v1, v2 = views.two_views(x)
        opt.zero_grad(set_to_none=True)
        rule.compute_grads(net, Batch(clean(x), None, (v1, v2), g))
        opt.step()
        sched.step()

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"preset": args.preset, "seconds_per_step": sec, "images_per_s": args.batch / sec,
            "peak_gib": peak, "memory": "device" if dev.type == "cuda" else "process RSS",
            "projected_hours": args.epochs * IMAGENET_TRAIN / args.batch * sec / 3600}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--load-size", type=int, default=246)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.preset:
        print(json.dumps(child(args)))
        return
    print(f"VGG-8 width {args.width}, {args.batch} images ({2 * args.batch} views) of "
          f"{args.side} px cut from {args.load_size} px, LARS; device {args.device}; "
          f"{args.steps} timed steps; load average {os.getloadavg()[0]:.1f}")
    print("| preset | s/step | images/s | peak memory GiB | projected hours, "
          f"{args.epochs} epochs |")
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--preset", preset] + [
            a for k, v in vars(args).items() if k not in ("preset", "presets")
            for a in (f"--{k.replace('_', '-')}", str(v))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"| {preset} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {preset} | {r['seconds_per_step']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['peak_gib']:.2f} ({r['memory']}) | {r['projected_hours']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
