"""Throughput of the batched self-supervised views (locallearn.data.augment.SSLViews).

Prints pairs of views per second for CIFAR-sized images (32x32) in batches of 32 pairs (64 views,
the batch of the local-learning experiments) and of 256 pairs, and the ratio against 310 pairs/s,
the figure measured for per-image augmentation in DataLoader worker processes. Asserts nothing.

    python benchmarks/views.py [--device cpu] [--seconds 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from locallearn.data.augment import SSLViews

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="torch intra-op thread counts to try (default: the current one)")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
