"""Throughput of layer-parallel training (``parallel.stages``) and the speed-up model.

For each case (VGG-6 CLAPP++ at 1/8 and at full width on CIFAR-10, and a deep RHM network with
layer-wise CLAPP and per-block views) it

1. measures the step time of every block in this process (one thread, one batch, the fastest of
   ``--repeats``) and stage 0's time to make a batch (read it, draw its views and negatives),
   and from them the balanced split and the model's speed-up for ``K`` stages:
   ``sum(t) / slowest stage`` in steady state, and ``N sum(t) / ((N + K - 1) slowest stage)``
   for an epoch of ``N`` batches (the pipeline fills at the start of every epoch);
2. runs one epoch of ``N`` batches with the real command for each ``K`` in ``--stages``:
   ``torchrun --nproc_per_node=K -m locallearn run ... parallel.stages=K parallel.split=<balanced>
   threads=1`` (``K = 1``: one process, one thread), and one process with ``threads=K``;
3. prints the training throughput (pairs/s for images, samples/s for the RHM; the run's own
   training seconds, without start-up, evaluation and probe), its ratio to one process with one
   thread, and the model's prediction for the same ``K`` and for 6 devices.

4. measures the cost of one message between two stages: the carry that stage 0 sends for the
   balanced 2-stage split, sent back and forth between two processes (``--pingpong``), and its
   size.

Timings are only worth reporting on free cores. Before each run the benchmark waits (up to
``--settle`` seconds) for the 1-minute load average to fall below 0.5, and it refuses to report a
row whose load, before or after the run, exceeds ``--max-load`` (default 1.0) per core the row
uses (processes x threads): such a row prints ``refused`` with the loads. Asserts nothing.

    python benchmarks/pipeline.py [--cases vgg-1/8 vgg-full rhm-deep] [--stages 1 2 3]
        [--data /work/data] [--json FILE] [--max-load 1.0] [--settle 180]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locallearn.experiments.tasks import build_task  # noqa: E402
from locallearn.parallel.split import (  # noqa: E402
    balanced_split,
    measure_data_seconds,
    measure_on_fresh_batch,
    predicted_speedup,
    stage_times,
    with_data,
)
from locallearn.schema import load_config  # noqa: E402
from locallearn.train import Trainer  # noqa: E402


def cases(data_root: str) -> dict[str, dict]:
    """Config, overrides, items per epoch and the unit of each case."""
    image = ["epochs=1", f"data.root={data_root}", "probe.epochs=0", "probe.steps=1",
             "data.probe_subset=2", "data.test_subset=2", "checkpoint_every=1",
             "probe_every=0"]  # the -cpu presets probe every half epoch, which a pipeline refuses
    return {
        "vgg-1/8": dict(config="configs/images/clapp++-cpu.yaml", batch=32, batches=24,
                        overrides=[*image, "net.width_mult=0.125"], unit="pairs/s", repeats=3),
        "vgg-full": dict(config="configs/images/clapp++-cpu.yaml", batch=16, batches=4,
                         overrides=[*image, "net.width_mult=1.0"], unit="pairs/s", repeats=1),
        "rhm-deep": dict(config="configs/rhm/clapp-per-block.yaml", batch=64, batches=24,
                         overrides=["epochs=1", "data.L=6", "data.test_size=64",
                                    "probe.steps=1", "net.width=256"],
                         unit="samples/s", repeats=3),
    }


def size_key(case: dict) -> str:
    n = case["batch"] * case["batches"]
    image = case["config"].startswith("configs/images")
    return f"data.subset={n}" if image else f"data.train_size={n}"


def case_trainer(case: dict) -> Trainer:
    """The case's run, built here with one thread (its output folder removed)."""
    torch.set_num_threads(1)
    cfg = load_config(ROOT / case["config"],
                      [*case["overrides"], size_key(case), f"batch_size={case['batch']}",
                       "threads=1", "progress=false"])
    with tempfile.TemporaryDirectory() as tmp:
        return Trainer(cfg, build_task(cfg), tmp)


def block_times(case: dict) -> list[float]:
    """Per-block step seconds, measured here with one thread."""
    return stage_costs(case)[0]


def stage_costs(case: dict) -> tuple[list[float], float]:
    """Per-block step seconds and stage 0's seconds to make a batch, with one thread."""
    t = case_trainer(case)
    args = (t.task, t.cfg.batch_size, t.cfg.seed, t.device)
    return (measure_on_fresh_batch(t.net, t.rule, *args, repeats=case["repeats"]),
            measure_data_seconds(t.rule, t.net, *args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_epoch(case: dict, stages: int, threads: int, split: list[int] | None,
              timeout: float | None = None) -> float | None:
    """Training seconds of one epoch with the real command (``None``: stopped at timeout)."""
    out = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        args = [case["config"], "--out", str(out / "run"), *case["overrides"], size_key(case),
                f"batch_size={case['batch']}", f"threads={threads}", "progress=false"]
        if stages > 1:
            torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
            cmd = [torchrun, f"--nproc_per_node={stages}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", "-m", "locallearn", "run", *args,
                   f"parallel.stages={stages}",
                   f"parallel.split=[{','.join(map(str, split))}]"]
        else:
            cmd = [sys.executable, "-m", "locallearn", "run", *args]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return json.loads((out / "run" / "summary.json").read_text())["seconds"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def settle(limit: float, seconds: float) -> float:
    """Wait up to ``seconds`` for the 1-minute load average to fall below ``limit``; return it."""
    deadline = time.monotonic() + seconds
    load = os.getloadavg()[0]
    while load >= limit and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def stage0_carry(case: dict, split: list[int]):
    """The carry that stage 0 of ``split`` sends for one batch of ``case`` (no gradients)."""
    t = case_trainer(case)
    net, rule = t.net, t.rule
    gen = torch.Generator().manual_seed(1)
    carry = rule.start_carry(net, next(iter(t.task.batches(gen, t.cfg.batch_size,
                                                           rule.view_kind))))
    for level in range(split[0]):
        carry = rule.frozen_carry(net, carry, level, level + 1)
    carry.pop("generator", None)
    return carry


def pingpong(case_name: str, data: str, repeats: int = 20) -> None:
    """Child of ``--pingpong`` under torchrun (2 processes): rank 0 sends the case's stage-0
    carry to rank 1 and back ``repeats`` times; prints the one-way milliseconds and the size."""
    import torch.distributed as dist

    from locallearn.delay import tensor_bytes
    from locallearn.parallel import messages

    dist.init_process_group("gloo")
    case = cases(data)[case_name]
    carry = stage0_carry(case, balanced_split(block_times(case), 2))
    rank = dist.get_rank()
    messages.send(carry, 1 - rank) if rank == 0 else messages.recv(0, "cpu")  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:
            messages.send(carry, 1)
            messages.recv(1, "cpu")
        else:
            messages.send(messages.recv(0, "cpu"), 0)
    one_way = (time.perf_counter() - t0) / (2 * repeats)
    if rank == 0:
        print(json.dumps({"ms": 1000 * one_way, "mib": tensor_bytes(carry) / 2**20}))
    dist.destroy_process_group()


def message_cost(case_name: str, data: str) -> dict | None:
    """One message's milliseconds and MiB for the case (two processes, gloo)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), "--pingpong",
           case_name, "--data", data]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if done.returncode == 0 and lines else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["vgg-1/8", "rhm-deep", "vgg-full"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--data", default="/work/data", help="CIFAR-10 folder (train/, test/)")
    parser.add_argument("--thread-modes", nargs="*", type=int, default=None,
                        help="K for which one process with K threads runs too (default: all)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which a run is stopped and reported as such")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="refuse a row whose load exceeds this per core it uses")
    parser.add_argument("--settle", type=float, default=180.0,
                        help="seconds to wait for the load to fall below 0.5 before a run")
    parser.add_argument("--pingpong", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pingpong:
        pingpong(args.pingpong, args.data)
        return
    all_cases = cases(args.data)
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print("| case | K | mode | split | seconds | throughput | ratio | model (N batches) "
          "| model (steady) | load before / after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        case = all_cases[name]
        blocks, data = stage_costs(case)
        times = with_data(blocks, data)  # what stage 0 does: make the batch, run its blocks
        items = case["batch"] * case["batches"]
        n = case["batches"]
        ms = ", ".join(f"{1000 * t:.0f}" for t in blocks) + f"; making a batch {1000 * data:.0f}"
        six = min(6, len(times))
        split6 = balanced_split(times, six)
        cost = message_cost(name, args.data) if len(times) > 1 else None
        sent = (f"; one message (stage 0 -> 1): {cost['ms']:.2f} ms, {cost['mib']:.2f} MiB"
                if cost else "")
        print(f"\n{name}: block step ms [{ms}]; model for {six} devices: split {split6}, "
              f"speed-up {predicted_speedup(times, split6):.2f}x (steady state){sent}\n",
              file=sys.stderr, flush=True)
        base = None
        for k in args.stages:
            split = balanced_split(times, k)
            slowest = max(stage_times(times, split))
            steady = sum(times) / slowest
            filled = n * sum(times) / ((n + k - 1) * slowest)
            with_threads = k > 1 and (args.thread_modes is None or k in args.thread_modes)
            modes = [("stages", 1), ("threads", k)] if with_threads else [("stages", 1)]
            for mode, threads in modes:
                stages = k if mode == "stages" else 1
                before = settle(0.5, args.settle)
                seconds = run_epoch(case, stages, threads, split if stages > 1 else None,
                                    args.timeout)
                after = os.getloadavg()[0]
                cores = stages * threads
                if seconds is None:
                    print(f"| {name} | {k} | {mode} x{threads} | stopped after {args.timeout} s "
                          "|", flush=True)
                    continue
                if max(before, after) > args.max_load * cores:
                    print(f"| {name} | {k} | {mode} x{threads} | refused: load {before:.2f} "
                          f"before, {after:.2f} after, above {args.max_load:g} per core on "
                          f"{cores} core(s) |", flush=True)
                    continue
                if k == 1 and mode == "stages":
                    base = seconds  # the ratios' baseline: one process, one thread
                row = {
                    "case": name, "K": k, "mode": f"{k} stage(s), 1 thread each" if mode ==
                    "stages" else f"1 process, {k} threads", "split": split if mode == "stages"
                    else None, "seconds": seconds, "throughput": items / seconds,
                    "unit": case["unit"], "ratio": base / seconds if base else None,
                    "model_epoch": filled if mode == "stages" else None,
                    "model_steady": steady if mode == "stages" else None,
                    "load_before": before, "load_after": after, "block_seconds": blocks,
                    "data_seconds": data,
                    "model_6": predicted_speedup(times, split6), "message": cost,
                }
                rows.append(row)
                model = (f"{filled:.2f}x | {steady:.2f}x" if mode == "stages" else "- | -")
                print(f"| {name} | {k} | {row['mode']} | {row['split'] or '-'} | "
                      f"{seconds:.2f} | {row['throughput']:.1f} {case['unit']} | "
                      f"{row['ratio'] or 0:.2f}x | {model} | {before:.2f} / {after:.2f} |",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
