"""Time and memory to draw, decode and one-hot encode RHM samples.

Run: ``python benchmarks/rhm_generate.py [--n 1000000]``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from locallearn.data.rhm import RHM, sample_indices


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, fn, repeat: int = 3):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    print(f"{label:<48} {best:8.3f} s   peak RSS {peak_rss_mib():7.0f} MiB")
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    rhm = RHM(v=16, n_classes=16, m=4, s=2, L=4, seed_rules=0)
    print(f"{rhm}  P_max={rhm.P_max}  P_star={rhm.P_star}  threads={torch.get_num_threads()}")
    print(f"baseline RSS after import and rules: {peak_rss_mib():.0f} MiB")
    idx, t_draw = timed(
        f"draw {args.n:,} indices without replacement",
        lambda: torch.tensor(sample_indices(random.Random(0), rhm.P_max, args.n)),
        repeat=1,
    )
    data, t_dec = timed(f"decode {args.n:,} samples (vectorised)", lambda: rhm.decode(idx))
    _, t_parse = timed(
        f"parse {args.n:,} samples back to their trees", lambda: rhm.parse(data.tokens)
    )
    mib = data.tokens.numel() * data.tokens.element_size() / 2**20
    lab = data.labels.numel() * 8 / 2**20
    print(f"token storage: {mib:.1f} MiB ({data.tokens.dtype}); labels {lab:.1f} MiB")

    def one_hot_all():
        for start in range(0, args.n, args.batch):
            rhm.one_hot(data.tokens[start : start + args.batch])

    _, t_hot = timed(f"one-hot batches of {args.batch} over all samples", one_hot_all, repeat=1)
    rate = args.n / t_dec / 1e6
    print(f"decode rate: {rate:.2f} M samples/s; time / aim (1 s for 1M): {t_dec / 1.0:.2f}")
    print(f"one-hot rate: {args.n / t_hot / 1e6:.2f} M samples/s")
    del t_draw, t_parse


if __name__ == "__main__":
    main()
