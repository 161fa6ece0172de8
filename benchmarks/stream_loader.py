"""Reading throughput and memory of the streaming image loader (locallearn.data.streaming).

Writes (once) an ImageNet-shaped tree of JPEG files into ``--root`` when it is missing:
``--classes`` wnid folders holding ``--images`` files in all, of ImageNet-like sizes (sides
drawn in 250-500 px, smooth random content plus grain, quality 90). Then, for each worker count,
decodes ``--batches`` batches of ``--batch`` images into ``load_size`` squares in a fresh
process and prints images per second, the peak resident memory of the main process and of the
largest worker, and the loader's bound on the pixel bytes in flight. ``--sizes`` repeats the
measurement on the first N files of the tree, to show that memory does not follow the dataset
size. Finally it prints the memory of the file index for 1,281,167 ImageNet-style names.
Asserts nothing.

    python benchmarks/stream_loader.py --root /tmp/fake-imagenet [--workers 0 1 2]
        [--sizes 500 4000] [--batch 64] [--batches 20] [--load-size 246]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(root: Path, classes: int, images: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    per = -(-images // classes)
    written = 0
    for c in range(classes):
        wnid = f"n{1440764 + 1000 * c:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            if written == images:
                return
            w, h = int(rng.integers(250, 501)), int(rng.integers(250, 501))
            small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.uint8)
            img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
            img = (img + rng.integers(-12, 12, img.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{wnid}_{i}.JPEG", quality=90)
            written += 1


def child(args: argparse.Namespace) -> None:
    import torch

    from locallearn.data.streaming import StreamLoader, open_stream

    torch.set_num_threads(1)
    data = open_stream("imagenet", args.root, "train", args.load_size)
    if args.size and args.size < len(data):
        data = data.subset(torch.arange(args.size))
    workers = args.workers[0]
    loader = StreamLoader(data, workers=workers, prefetch=2, persistent=False)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    need = args.batch * (args.batches + 1)
    order = order.repeat(-(-need // len(data)))[:need]
    chunks = [order[s:s + args.batch].tolist() for s in range(0, need, args.batch)]
    it = loader.batches(chunks)
    next(it)  # the first batch includes starting the workers
    t0 = time.perf_counter()
    n = sum(int(x.shape[0]) for x, _ in it)
    seconds = time.perf_counter() - t0
    del it
    print(json.dumps({
        "workers": workers, "dataset": len(data), "images_per_s": n / seconds,
        "main_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "bound_mib": loader.bytes_in_flight(args.batch) / 2**20,
        "index_bytes_per_image": data.paths.nbytes / len(data),
    }))


def index_memory() -> None:
    from locallearn.data.streaming import PathList

    names = [f"n{1440764 + 1000 * (i % 1000):08d}/n{1440764 + 1000 * (i % 1000):08d}_{i}.JPEG"
             for i in range(1_281_167)]
    t0 = time.perf_counter()
    pl = PathList(names)
    print(f"file index of 1,281,167 ImageNet-style names: {pl.nbytes / 2**20:.1f} MiB "
          f"({pl.nbytes / len(pl):.1f} bytes per image), built in {time.perf_counter() - t0:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--load-size", type=int, default=246)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not (args.root / "train").is_dir():
        t0 = time.perf_counter()
        generate(args.root, args.classes, args.images)
        seconds = time.perf_counter() - t0
        print(f"wrote {args.images} JPEG files into {args.root} in {seconds:.0f} s")
    files = list((args.root / "train").rglob("*.JPEG"))
    mean_kib = np.mean([f.stat().st_size for f in files[:500]]) / 1024
    print(f"{len(files)} files, mean {mean_kib:.0f} KiB; batch {args.batch}, "
          f"load size {args.load_size}, {args.batches} batches timed; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| workers | dataset | images/s | main peak RSS MiB | largest worker peak RSS MiB "
          "| pixel bound MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for workers in args.workers:
            cmd = [sys.executable, __file__, "--child", "--root", str(args.root),
                   "--workers", str(workers), "--size", str(size), "--batch", str(args.batch),
                   "--batches", str(args.batches), "--load-size", str(args.load_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['workers']} | {r['dataset']} | {r['images_per_s']:.0f} | "
                  f"{r['main_peak_rss_mib']:.0f} | {r['worker_peak_rss_mib']:.0f} | "
                  f"{r['bound_mib']:.1f} |", flush=True)
    index_memory()


if __name__ == "__main__":
    main()
