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
        "vgg-1/8": dict(config="configs/images/clapp++-cpu.yaml", batch=32, batches=48,
                        overrides=[*image, "net.width_mult=0.125"], unit="pairs/s", repeats=3),
        "vgg-full": dict(config="configs/images/clapp++-cpu.yaml", batch=16, batches=8,
                         overrides=[*image, "net.width_mult=1.0"], unit="pairs/s", repeats=1),
        "rhm-deep": dict(config="configs/rhm/clapp-per-block.yaml", batch=64, batches=48,
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


def command(case: dict, stages: int, threads: int, split: list[int] | None,
            out: Path) -> list[str]:
    """The real command of one epoch of ``case`` (``stages = 1``: one process)."""
    args = [case["config"], "--out", str(out), *case["overrides"], size_key(case),
            f"batch_size={case['batch']}", f"threads={threads}", "progress=false"]
    if stages == 1:
        return [sys.executable, "-m", "locallearn", "run", *args]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    return [torchrun, f"--nproc_per_node={stages}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "locallearn", "run", *args,
            f"parallel.stages={stages}", f"parallel.split=[{','.join(map(str, split))}]"]


def run_epoch(case: dict, stages: int, threads: int, split: list[int] | None,
              timeout: float | None = None, copies: int = 1) -> dict | None:
    """Training seconds of one epoch with the real command (``None``: stopped at timeout), and
    for a pipeline each stage's busy seconds (its ``pipeline.json``). ``copies > 1`` runs that
    many one-process runs at once, each on its own, and gives their mean seconds: what the
    machine gives that many independent processes of the same work."""
    out = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        cmds = [command(case, stages, threads, split, out / f"run{i}") for i in range(copies)]
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for cmd in cmds]
        try:
            errors = [p.communicate(timeout=timeout)[1] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return None
        for cmd, p, err in zip(cmds, procs, errors):
            if p.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
        seconds = [json.loads((out / f"run{i}" / "summary.json").read_text())["seconds"]
                   for i in range(copies)]
        result = {"seconds": sum(seconds) / copies}
        if stages > 1:
            epochs = json.loads((out / "run0" / "pipeline.json").read_text())["epochs"]
            result["busy"] = epochs[-1]["busy_seconds"]
        return result
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


def modes_of(k: int, times: list[float], args) -> list[tuple[str, int, list[int] | None]]:
    """What runs for ``K = k``: ``(mode, threads per process, split)``. One process for
    ``k = 1``; else the model's split, with ``--neighbours`` every split one block away
    from it, one process with ``k`` threads, and ``k`` copies of the one-process run at once."""
    if k == 1:
        return [("stages", 1, [len(times)])]
    split = balanced_split(times, k)
    splits = [split] + (neighbour_splits(split) if args.neighbours else [])
    modes = [("stages", 1, s) for s in splits]
    if args.thread_modes is None or k in args.thread_modes:
        modes.append(("threads", k, None))
    if args.copies:
        modes.append(("copies", 1, None))
    return modes


def neighbour_splits(split: list[int]) -> list[list[int]]:
    """Every split that moves one boundary of ``split`` by one block."""
    out = []
    for i in range(len(split) - 1):
        for step in (-1, 1):
            other = list(split)
            other[i] += step
            other[i + 1] -= step
            if min(other) >= 1 and other not in out:
                out.append(other)
    return out


def model(times: list[float], split: list[int], batches: int) -> dict:
    """The model's speed-up for ``split``: steady state and over an epoch of ``batches``."""
    slowest = max(stage_times(times, split))
    k = len(split)
    return {"model_steady": sum(times) / slowest,
            "model_epoch": batches * sum(times) / ((batches + k - 1) * slowest)}


def measured(case: dict, mode: str, k: int, threads: int, split: list[int] | None,
             args) -> tuple[dict | None, float, float]:
    """One row's run and the load before and after it."""
    before = settle(0.5, args.settle)
    stages = k if mode == "stages" else 1
    copies = k if mode == "copies" else 1
    result = run_epoch(case, stages, threads, split if stages > 1 else None, args.timeout,
                       copies)
    return result, before, os.getloadavg()[0]


def row_line(row: dict) -> str:
    """A row of the printed table."""
    models = (f"{row['model_epoch']:.2f}x | {row['model_steady']:.2f}x"
              if "model_steady" in row else "- | -")
    busy = ("-" if not row["busy"] else
            ", ".join(f"{100 * b / row['seconds']:.0f}%" for b in row["busy"]))
    split = row["split"] if row["split"] and len(row["split"]) > 1 else "-"
    return (f"| {row['case']} | {row['K']} | {row['mode']} | {split} | {row['seconds']:.2f} | "
            f"{row['throughput']:.1f} {row['unit']} | {row['ratio'] or 0:.2f}x | {models} | "
            f"{busy} | {row['load_before']:.2f} / {row['load_after']:.2f} |")


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
    parser.add_argument("--neighbours", action="store_true",
                        help="also run every split one block away from the model's")
    parser.add_argument("--copies", action="store_true",
                        help="also run K copies of the one-process run at once: what the "
                        "machine gives K independent processes (the ceiling of K stages)")
    parser.add_argument("--pingpong", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pingpong:
        pingpong(args.pingpong, args.data)
        return
    all_cases = cases(args.data)
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print("| case | K | mode | split | seconds | throughput | ratio | model (N batches) "
          "| model (steady) | stages busy | load before / after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        case = all_cases[name]
        blocks, data = stage_costs(case)
        times = with_data(blocks, data)  # what stage 0 does: make the batch, run its blocks
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
            for mode, threads, split in modes_of(k, times, args):
                result, before, after = measured(case, mode, k, threads, split, args)
                cores = k * threads
                label = {"stages": f"{k} stage(s), 1 thread each",
                         "threads": f"1 process, {k} threads",
                         "copies": f"{k} one-thread processes at once, each alone"}[mode]
                if result is None:
                    print(f"| {name} | {k} | {label} | stopped after {args.timeout} s |",
                          flush=True)
                    continue
                if max(before, after) > args.max_load * cores:
                    print(f"| {name} | {k} | {label} | refused: load {before:.2f} before, "
                          f"{after:.2f} after, above {args.max_load:g} per core on {cores} "
                          "core(s) |", flush=True)
                    continue
                seconds = result["seconds"]
                if k == 1 and mode == "stages":
                    base = seconds  # the ratios' baseline: one process, one thread
                ratio = None if base is None else (k if mode == "copies" else 1) * base / seconds
                row = {"case": name, "K": k, "mode": label, "split": split,
                       "seconds": seconds, "ratio": ratio, "busy": result.get("busy"),
                       "load_before": before, "load_after": after, "block_seconds": blocks,
                       "data_seconds": data, "model_6": predicted_speedup(times, split6),
                       "message": cost, "unit": case["unit"],
                       "throughput": (k if mode == "copies" else 1) * case["batch"]
                       * case["batches"] / seconds}
                if mode == "stages":
                    row.update(model(times, split, case["batches"]))
                rows.append(row)
                print(row_line(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
