"""Throughput of the batched self-supervised views (locallearn.data.augment.SSLViews).

Prints pairs of views per second for CIFAR-sized images (32x32) in batches of 32 pairs (64 views,
the batch of the local-learning experiments) and of 256 pairs, and the ratio against 310 pairs/s,
the figure measured for per-image augmentation in DataLoader worker processes. With
``--end-to-end`` it also measures views + one training step of block-by-block CLAPP++ on VGG-6 at
1/8 width (gradients and AdamW), the figure the 310 pairs/s of the paper's code also included.
Asserts nothing.

    python benchmarks/views.py [--device cpu] [--seconds 3] [--threads 1 2] [--end-to-end]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from locallearn.data.augment import SSLViews
from locallearn.runtime import tune_cpu_allocator

BASELINE_PAIRS_PER_S = 310.0


def measure(aug: SSLViews, pairs: int, side: int, device: torch.device, seconds: float) -> float:
    """Pairs per second of ``aug.two_views`` on random uint8 batches of ``pairs`` images."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (pairs, 3, side, side), dtype=torch.uint8, generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(5):  # warm-up: first calls allocate and pick kernels
        aug.two_views(x)
    sync()
    n = 0
    start = time.perf_counter()
    while True:
        aug.two_views(x)
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return n * pairs / elapsed


def measure_end_to_end(aug: SSLViews, pairs: int, side: int, device: torch.device,
                       seconds: float, width: float = 0.125, micro_batches: int = 1) -> float:
    """Pairs per second of views + a CLAPP++ step (block by block) on VGG-6 at ``width``,
    trained as the presets train (channels-last encoder, fused AdamW)."""
    from locallearn.nets.vgg import vgg6
    from locallearn.rules.base import Batch
    from locallearn.rules.image_local import LocalImageRule

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (pairs, 3, side, side), dtype=torch.uint8, generator=g).to(device)
    net = vgg6(width, seed=0).to(device).to(memory_format=torch.channels_last)
    rule = LocalImageRule("same", "auto", "hinge", "next", step="block",
                          micro_batches=micro_batches)
    v1, v2 = aug.two_views(x)
    rule.setup(net, v1)
    rule.to(device)
    params = rule.trained_parameters(net)
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)

    def steps(count: int) -> None:
        for _ in range(count):
            views = aug.two_views(x)
            opt.zero_grad(set_to_none=True)
            rule.compute_grads(net, Batch(views[0], None, views, g))
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps(2)
    n = 0
    start = time.perf_counter()
    while True:
        steps(5)
        n += 5
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return n * pairs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="torch intra-op thread counts to try (default: the current one)")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also views + a CLAPP++ training step at 1/8 width")
    args = parser.parse_args()

    tune_cpu_allocator()
    device = torch.device(args.device)
    threads = args.threads or [torch.get_num_threads()]
    aug = SSLViews("cifar10").to(device)
    print(f"SSL views (crop, flip, jitter, grayscale, blur, normalise), {args.side}x{args.side}, "
          f"device {device}, torch {torch.__version__}")
    print(f"baseline: {BASELINE_PAIRS_PER_S:.0f} pairs/s (per-image augmentation in DataLoader "
          "workers)")
    if hasattr(os, "getloadavg"):
        # Other busy processes make multi-threaded CPU figures collapse; show the load.
        print(f"cpus {os.cpu_count()}, load average (1 min) {os.getloadavg()[0]:.1f}")
    for t in threads:
        torch.set_num_threads(t)
        for pairs in (32, 256):
            rate = measure(aug, pairs, args.side, device, args.seconds)
            print(f"threads {t}  batch {pairs:4d} pairs ({2 * pairs:4d} views): "
                  f"{rate:8.0f} pairs/s  = {rate / BASELINE_PAIRS_PER_S:5.2f} x baseline")
        if args.end_to_end:
            rate = measure_end_to_end(aug, 32, args.side, device, args.seconds)
            print(f"threads {t}  views + CLAPP++ step, VGG-6 1/8 width, 32 pairs: "
                  f"{rate:8.0f} pairs/s  = {rate / BASELINE_PAIRS_PER_S:5.2f} x baseline")


if __name__ == "__main__":
    main()
