"""Launching a sweep: every run of a specification (:mod:`locallearn.experiments.sweep_spec`)
trained into its own folder, results recorded.

Each run trains into ``DIR/runs/<name>``, with ``<name>`` made of the grid values
(``variant=dfa,data.train_size=2Pstar,seed=1``). A sweep started again skips the runs already
recorded in ``DIR/results.sqlite``, records finished runs that were not recorded yet, resumes the
interrupted ones from their checkpoints and starts the rest. Only the parent process writes the
results store, one row per run (``run_dir`` is unique), in a transaction as each run finishes.

Backends: ``local`` runs a pool of worker processes (spawned; each sets its number of torch
threads and trains one run at a time); ``workers=0`` trains in this process (for debugging).
``ray`` submits each run as a Ray task asking for its CPUs and GPUs, on a local Ray instance
started for the sweep or on an existing cluster (``ray_address``); on a cluster, the package must
be installed on every node and ``DIR`` must be on a filesystem every node sees at the same path.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locallearn.errors import RunError
from locallearn.experiments.sweep_spec import (
    RUNS_DIR,
    RunSpec,
    SweepSpec,
    check_existing,
    expand,
    record_path,
    value_label,
)
from locallearn.runfiles import (
    CHECKPOINT,
    RUN_LOCK,
    SUMMARY,
    check_out_dir,
    file_lock,
    write_text_atomic,
)

LOCK_FILE = ".sweep.lock"

Event = Callable[[str], None]


# ---------------------------------------------------------------------------------- workers
def set_threads(threads: int) -> None:
    """Limit this process to ``threads`` CPU threads (before and after torch is imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _watch_parent(parent: int) -> None:
    """Exit this worker when its parent (the sweep) is gone, so no orphan keeps training."""

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


_STARTED: Any = None  # in a local worker: the queue where it announces each run it starts


def _worker_init(threads: int, parent: int, started: Any = None) -> None:
    global _STARTED
    _STARTED = started
    set_threads(threads)
    _watch_parent(parent)


def run_one(raw: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Train one run of a sweep into ``run_dir`` (resuming its checkpoint) and return its summary.

    Holds a lock on the run folder while training, so two processes never train the same run.
    A run that finished already (``summary.json`` present) returns its summary without training.
    """
    if threads is not None:
        set_threads(threads)
    from locallearn.experiments.runs import run
    from locallearn.schema import build_config

    out = Path(run_dir)
    with file_lock(out / RUN_LOCK):
        summary_path = out / SUMMARY
        if summary_path.is_file():
            summary = _read_summary(summary_path)
            if summary is not None:
                return summary
            if not (out / CHECKPOINT).is_file():
                raise RunError(f"{str(summary_path)!r} cannot be read and the run has no "
                               f"checkpoint to make it again from; move {str(out)!r} aside to "
                               "train the run again")
            # unreadable: the final checkpoint makes it again (its final metrics recomputed)
        return run(build_config(raw), out)


# ---------------------------------------------------------------------------------- the sweep
@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did."""

    total: int
    skipped: int = 0  # recorded before this call
    recorded_late: int = 0  # finished earlier, recorded now
    finished: int = 0  # trained (or resumed) and recorded now
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error)
    seconds: float = 0.0


class _LoadSampler:
    """Samples the 1-minute load average while the sweep runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.last = 0.0

    def sample(self) -> None:
        now = time.monotonic()
        if now - self.last < 5.0 and self.samples:
            return
        self.last = now
        try:
            self.samples.append(os.getloadavg()[0])
        except (AttributeError, OSError):  # pragma: no cover
            pass


def _merge_axes(new: list[dict[str, Any]], old: Any) -> list[dict[str, Any]]:
    """The axes of this start merged with those of earlier starts of the same folder: a folder
    filled part by part (``--grid``) lists every value it holds, in the order they were first
    started (a full sweep first keeps its order when parts are added)."""
    before = {a.get("name"): a for a in old if isinstance(a, dict)} if isinstance(old, list) else {}
    for axis in new:
        prev = before.get(axis["name"])
        if not prev or prev.get("kind") != axis["kind"]:
            continue
        earlier = list(prev.get("values") or [])
        axis["values"] = earlier + [v for v in axis["values"] if v not in earlier]
        if axis.get("variants") is not None and isinstance(prev.get("variants"), dict):
            axis["variants"] = {**prev["variants"], **axis["variants"]}
            axis["variants"] = {v: axis["variants"][v] for v in axis["values"]
                                if v in axis["variants"]}
    return new


def write_sweep_file(spec: SweepSpec, runs: Sequence[RunSpec], out: Path) -> None:
    """Write the sweep's record (``DIR/sweep.yaml``; ``DIR/sweep-record.yaml`` when the sweep
    file is ``DIR/sweep.yaml`` itself): the definition of the sweep as last started, its axes
    and seeds holding the values of earlier starts too (first started first), and the runs of
    every start."""
    record = record_path(out, spec.source)
    try:
        old = yaml.safe_load(record.read_text()) or {}
    except (OSError, yaml.YAMLError):
        old = {}
    old = old if isinstance(old, dict) else {}
    names = [r.name for r in runs]
    earlier = old.get("runs") if isinstance(old.get("runs"), list) else []
    seeds = old.get("seeds") if isinstance(old.get("seeds"), list) else []
    doc = {
        "source": None if spec.source is None else str(spec.source),
        "config": None if spec.config is None else str(spec.config),
        "description": spec.description,
        "settings": spec.settings,
        "overrides": spec.overrides,
        "axes": _merge_axes([
            {"name": a.name, "kind": a.kind,
             "values": [value_label(v) for v in a.values]}
            | ({"variants": dict(a.variants)} if a.variants is not None else {})
            for a in spec.axes
        ], old.get("axes")),
        "seeds": seeds + [s for s in spec.seeds if s not in seeds],
        "runs": earlier + [n for n in names if n not in earlier],
    }
    write_text_atomic(record, yaml.safe_dump(doc, sort_keys=False))


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    threads: int | None = None,
    retries: int = 2,
    on_event: Event | None = None,
    start_method: str = "spawn",
) -> SweepOutcome:
    """Run every run of ``spec`` into ``out`` not recorded yet, recording each as it finishes.

    Args:
        spec: the sweep (see :func:`load_sweep`).
        out: the sweep folder (``runs/``, ``results.sqlite``, ``sweep.yaml``).
        workers: local worker processes (``0``: train in this process); with ``ray``, the CPUs
            of a local Ray instance are ``workers * threads``.
        backend: ``local`` or ``ray``.
        ray_address: an existing Ray cluster (``ray`` backend); ``None`` starts a local one.
        threads: torch threads per run (default: the CPUs divided among the workers).
        retries: how many times a local run whose worker process died is started again.
        on_event: called with one line of text per event (start, finish, failure).
        start_method: how local workers start (``spawn``: fresh interpreters; ``fork``).

    Raises:
        ValueError: a bad config, backend or option (nothing is started).
        RunError: some runs failed; the others finished and are recorded.
    """
    from locallearn.experiments.results import ResultsStore, code_version

    in_process_threads = threads  # workers=0: change this process's threads only if asked
    threads = _check_options(backend, workers, threads, retries, start_method)
    emit = on_event or (lambda _msg: None)
    runs = expand(spec, threads)  # validates every config before anything starts
    out = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with file_lock(out / LOCK_FILE, blocking=False) as locked:
        if not locked:
            raise ValueError(f"another sweep is running in {str(out)!r}")
        check_existing(runs, out)
        store = ResultsStore(out)
        store.set_axes([(a.name, a.kind) for a in spec.axes])
        write_sweep_file(spec, runs, out)
        version = code_version()
        outcome = SweepOutcome(total=len(runs))
        todo = _pending(runs, out, store, version, outcome)
        emit(f"sweep: {len(runs)} runs; {outcome.skipped + outcome.recorded_late} recorded, "
             f"{len(todo)} to run ({backend}, workers={workers}, threads={threads})")
        sampler = _LoadSampler()
        sampler.sample()
        session = None
        if todo:
            session = store.start_session(backend, workers, threads, len(runs), len(todo))

        done, failed = _recorders(store, version, outcome, len(runs), emit)
        try:
            if todo and backend == "ray":
                _run_ray(todo, out, workers, threads, ray_address, done, failed, sampler)
            elif todo and workers == 0:
                _run_here(todo, out, in_process_threads, done, failed, emit)
            elif todo:
                _run_local(todo, out, workers, threads, retries, done, failed, emit, sampler,
                           start_method)
        finally:
            outcome.seconds = time.monotonic() - t0
            sampler.sample()
            if session is not None:
                store.end_session(session, outcome.finished, len(outcome.failed),
                                  sampler.samples)
            store.close()
    if outcome.failed:
        name, msg = outcome.failed[0]
        raise RunError(
            f"{len(outcome.failed)} of {len(runs)} runs failed (first: {name}: {msg}); the other "
            f"runs are recorded in {str(out / 'results.sqlite')!r}; start the sweep again to "
            "retry the failed ones"
        )
    return outcome


def _recorders(store: Any, version: str, outcome: SweepOutcome, total: int, emit: Event
               ) -> tuple[Callable[[RunSpec, dict[str, Any]], None],
                          Callable[[RunSpec, BaseException], None]]:
    """What happens when a run finishes (recorded, counted, announced) or fails."""

    def done(run: RunSpec, summary: dict[str, Any]) -> None:
        inserted = store.record(f"{RUNS_DIR}/{run.name}", run.values, summary, version)
        outcome.finished += int(inserted)
        n = outcome.skipped + outcome.recorded_late + outcome.finished
        acc = summary.get("test_accuracy")
        shown = f"test_accuracy {acc:.3f}" if isinstance(acc, float) else ""
        emit(f"[{n}/{total}] finished {run.name} {shown} "
             f"({float(summary.get('seconds') or 0):.0f} s)")

    def failed(run: RunSpec, err: BaseException) -> None:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        outcome.failed.append((run.name, msg))
        emit(f"failed {run.name}: {msg}")

    return done, failed


def _check_options(backend: str, workers: int, threads: int | None, retries: int,
                   start_method: str) -> int:
    """One-line ValueErrors for the launcher's options; returns the threads per run."""
    import multiprocessing

    if backend not in ("local", "ray"):
        raise ValueError(f"backend {backend!r} is unknown; valid: local, ray")
    if workers < 0:
        raise ValueError(f"workers={workers} is invalid: must be >= 0")
    if backend == "ray" and workers == 0:
        raise ValueError("workers=0 (in-process) is for the local backend")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if threads < 1:
        raise ValueError(f"threads={threads} is invalid: must be >= 1")
    if retries < 0:
        raise ValueError(f"retries={retries} is invalid: must be >= 0")
    if start_method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start method {start_method!r} is unknown here; valid: "
            f"{', '.join(multiprocessing.get_all_start_methods())}"
        )
    return threads


def _pending(runs: list[RunSpec], out: Path, store: Any, version: str,
             outcome: SweepOutcome) -> list[RunSpec]:
    """The runs left to train: recorded runs are skipped, finished but unrecorded ones are
    recorded now (counted in ``outcome``)."""
    recorded = store.recorded_dirs()
    todo: list[RunSpec] = []
    for run in runs:
        rel = f"{RUNS_DIR}/{run.name}"
        if rel in recorded:
            outcome.skipped += 1
            continue
        summary_path = run.run_dir(out) / SUMMARY
        summary = _read_summary(summary_path) if summary_path.is_file() else None
        if summary is not None:
            store.record(rel, run.values, summary, version)
            outcome.recorded_late += 1
            continue
        todo.append(run)
    return todo


def _run_here(todo: list[RunSpec], out: Path, threads: int | None,
              done: Callable[[RunSpec, dict[str, Any]], None],
              failed: Callable[[RunSpec, BaseException], None], emit: Event) -> None:
    """``workers=0``: every run in this process, one after the other."""
    for run in todo:
        emit(f"start {run.name}")
        try:
            summary = run_one(run.raw, str(run.run_dir(out)), threads)
        except Exception as err:  # noqa: BLE001 - a failed run, reported
            failed(run, err)
            continue
        done(run, summary)


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_local(
    todo: list[RunSpec],
    out: Path,
    workers: int,
    threads: int,
    retries: int,
    done: Callable[[RunSpec, dict[str, Any]], None],
    failed: Callable[[RunSpec, BaseException], None],
    emit: Event,
    sampler: _LoadSampler,
    start_method: str = "spawn",
) -> None:
    """A pool of worker processes; a pool broken by a dead worker is started again."""
    import multiprocessing

    ctx = multiprocessing.get_context(start_method)
    pending = list(todo)
    deaths: dict[str, int] = {}
    while pending:
        started = ctx.Queue()
        in_flight: dict[str, RunSpec] = {}
        broken = False
        finished: set[str] = set()
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(pending)), mp_context=ctx,
            initializer=_worker_init, initargs=(threads, os.getpid(), started),
            **_fresh_process_per_run(start_method),
        )
        interrupted = True
        try:
            futures: dict[Future, RunSpec] = {
                pool.submit(_pool_task, run.raw, str(run.run_dir(out)), run.name): run
                for run in pending
            }
            remaining = set(futures)
            while remaining:
                ready, remaining = wait(remaining, timeout=2.0, return_when=FIRST_COMPLETED)
                sampler.sample()
                _drain(started, in_flight, pending, emit)
                for fut in ready:
                    run = futures[fut]
                    try:
                        summary = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as err:  # noqa: BLE001 - a failed run, reported
                        failed(run, err)
                        finished.add(run.name)
                        continue
                    done(run, summary)
                    finished.add(run.name)
            interrupted = False
        finally:
            if interrupted:  # Ctrl-C or an error here: stop the workers now (checkpoints stay)
                procs = list((getattr(pool, "_processes", None) or {}).values())
                for proc in procs:
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in procs:
                    proc.join(timeout=10)
                started.close()
            pool.shutdown(wait=True)
        _drain(started, in_flight, pending, emit)
        started.close()
        pending = [r for r in pending if r.name not in finished]
        if not broken:
            break
        dead = [name for name in in_flight if name not in finished]
        for name in dead:
            deaths[name] = deaths.get(name, 0) + 1
        emit(f"a worker process died (runs in flight: {', '.join(dead) or 'none'}); "
             "starting the pool again")
        keep = []
        for run in pending:
            if deaths.get(run.name, 0) > retries:
                failed(run, RunError(f"its worker process died {deaths[run.name]} times"))
            else:
                keep.append(run)
        pending = keep


def _fresh_process_per_run(start_method: str) -> dict[str, Any]:
    """Each run in a process of its own where the pool allows it (Python >= 3.11, not forked):
    a run's peak memory (``peak_rss_mib``) is then its own, not the largest of the runs its
    worker trained before."""
    if sys.version_info >= (3, 11) and start_method != "fork":
        return {"max_tasks_per_child": 1}
    return {}


def _drain(queue: Any, in_flight: dict[str, RunSpec], pending: list[RunSpec], emit: Event) -> None:
    by_name = {r.name: r for r in pending}
    while True:
        try:
            name = queue.get_nowait()
        except Exception:  # noqa: BLE001 - queue.Empty, or a queue closed with a dead worker
            return
        if name in by_name and name not in in_flight:
            in_flight[name] = by_name[name]
            emit(f"start {name}")


def _pool_task(raw: dict[str, Any], run_dir: str, name: str) -> dict[str, Any]:
    if _STARTED is not None:
        _STARTED.put(name)
    return run_one(raw, run_dir)


def _ray_task(raw: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    return run_one(raw, run_dir, threads)


def _run_ray(
    todo: list[RunSpec],
    out: Path,
    workers: int,
    threads: int,
    address: str | None,
    done: Callable[[RunSpec, dict[str, Any]], None],
    failed: Callable[[RunSpec, BaseException], None],
    sampler: _LoadSampler,
) -> None:
    """Each run as a Ray task asking for its CPUs and GPUs; results recorded as they come."""
    try:
        import ray
    except ImportError:
        raise ValueError(
            "backend ray needs Ray: pip install 'locallearn[ray]' (or ray[default])"
        ) from None
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs["num_cpus"] = workers * threads
        ray.init(address=address, **kwargs)
        started_here = True
    elif address is not None:
        raise ValueError("Ray is already initialised in this process; drop --ray-address")
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(_ray_task)
        refs: dict[Any, RunSpec] = {}
        for run in todo:
            gpus = run.gpus
            if run.raw.get("device") == "auto" and has_gpu:
                gpus = 1.0
            ref = task.options(
                num_cpus=run.cpus, num_gpus=gpus, max_retries=2, retry_exceptions=False,
                name=f"locallearn:{run.name}",
            ).remote(run.raw, str(run.run_dir(out).resolve()), run.cpus)
            refs[ref] = run
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=2.0)
                sampler.sample()
                for ref in ready:
                    run = refs[ref]
                    try:
                        summary = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - unwrap the task's own error
                        cause = getattr(err, "cause", None)
                        failed(run, cause if isinstance(cause, BaseException) else err)
                        continue
                    done(run, summary)
        except BaseException:
            for ref in waiting:  # an interrupted sweep leaves no task training on a cluster
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()
