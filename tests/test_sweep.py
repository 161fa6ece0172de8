"""Sweeps: grid expansion, folder names, validation, idempotence, kills and restarts, Ray."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from locallearn.experiments.results import DB_NAME, ResultsStore
from locallearn.experiments.sweep import run_sweep
from locallearn.experiments.sweep_spec import (
    expand,
    load_sweep,
    parse_grid_arg,
    run_name,
    sanitise,
    split_values,
)

# P* = 16, P_max = 256: runs of a second or so
TINY = {
    "data": {"name": "rhm", "v": 4, "n_classes": 2, "m": 2, "s": 2, "L": 3, "test_size": 50},
    "net.width": 16,
    "optim": {"lr": 0.01},
    "epochs": 2,
    "batch_size": 8,
    "checkpoint_every": 1,
}
VARIANTS = {
    "bp": {"rule.name": "backprop"},
    "clapp-syn": {"rule.name": "layerwise", "rule.loss": "clapp", "rule.view": "synonyms"},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this process: on a busy machine, more threads than free cores make
    tiny ops ten times slower or worse (the sweep's workers get ``threads`` explicitly)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_sweep(tmp_path: Path, name: str = "sweep.yaml", **doc) -> Path:
    body = {"settings": TINY, "variants": VARIANTS, "grid": {"data.train_size": ["1P*"]},
            "seeds": [0]}
    body.update(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def db_rows(out: Path) -> list[tuple]:
    with sqlite3.connect(out / DB_NAME) as db:
        return db.execute("SELECT run_dir, seed, test_accuracy FROM runs ORDER BY id").fetchall()


def children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


# ---------------------------------------------------------------------------------- expansion
def test_grid_expands_variants_sizes_and_seeds(tmp_path):
    path = write_sweep(tmp_path, grid={"data.train_size": ["0.5P*", "2P*"]}, seeds=[0, 1])
    runs = expand(load_sweep(path))
    assert len(runs) == 2 * 2 * 2
    assert runs[0].name == "variant=bp,data.train_size=0.5Pstar,seed=0"
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # seeds outermost
    clapp = next(r for r in runs if r.values["variant"] == "clapp-syn")
    assert clapp.raw["rule"]["name"] == "layerwise"
    options = clapp.raw["rule"]["options"]  # the variant's rule.loss, rule.view, translated
    assert (options["loss"], options["view"]) == ("clapp", "synonyms")
    assert clapp.raw["data"]["train_size"] in ("0.5P*", "2P*")  # P* units resolved per run
    assert clapp.raw["net"]["width"] == 16 and clapp.raw["progress"] is False
    assert {r.values["data.train_size"] for r in runs} == {"0.5P*", "2P*"}
    assert len({r.name for r in runs}) == len(runs)


def test_command_line_grid_seeds_and_overrides(tmp_path):
    path = write_sweep(tmp_path)
    spec = load_sweep(path, grid=["variant=clapp-syn", "net.width=8,16", "optim.lr=1e-3,3e-3"],
                      seeds="3,4", overrides=["epochs=1"])
    runs = expand(spec)
    assert len(runs) == 1 * 1 * 2 * 2 * 2
    assert {r.values["variant"] for r in runs} == {"clapp-syn"}
    assert {r.raw["net"]["width"] for r in runs} == {8, 16}
    assert {r.raw["optim"]["lr"] for r in runs} == {1e-3, 3e-3}
    assert {r.seed for r in runs} == {3, 4}
    assert all(r.raw["epochs"] == 1 for r in runs)
    assert runs[0].name == (
        "variant=clapp-syn,data.train_size=1Pstar,net.width=8,optim.lr=1e-3,seed=3"
    )
    # a run preset (no sweep keys) is a sweep of one point; the grid comes from the command line
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"data": TINY["data"], "epochs": 1}))
    runs = expand(load_sweep(preset, grid=["data.train_size=0.5P*,1P*,2P*"], seeds="0"))
    assert [r.raw["data"]["train_size"] for r in runs] == ["0.5P*", "1P*", "2P*"]
    assert runs[2].name == "data.train_size=2Pstar,seed=0"


def test_folder_names_are_sanitised_and_deterministic():
    assert sanitise("data.train_size=2P*") == "data.train_size=2Pstar"
    assert run_name({"a": "x/y z", "b": [16, 8], "seed": 1}) == "a=x_y_z,b=_16_8_,seed=1"
    long = {"k" * 50: "v" * 100, "q" * 50: "w" * 100, "seed": 0}
    assert run_name(long) == run_name(dict(long)) and len(run_name(long)) <= 180
    assert split_values("1,[2,3],'a,b'") == ["1", "[2,3]", "'a,b'"]
    assert parse_grid_arg("data.train_size=0.5P*,1P*") == ("data.train_size", ["0.5P*", "1P*"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid": ["data.vv=1,2"]}, r"unknown config key 'data\.vv'"),
        ({"grid": ["net.width=wide"]}, r"net\.width='wide' is invalid"),
        ({"grid": ["data.train_size=1P*,2Q*"]}, r"data\.train_size='2Q\*' is invalid"),
        ({"grid": ["data.train_size=1P*,100P*"]}, r"P_max = 256"),
        ({"grid": ["variant=bp,nope"]}, r"variant 'nope' is unknown"),
        ({"grid": ["seed=1,2"]}, r"use seeds"),
        ({"grid": ["net.width"]}, r"not of the form KEY=V1,V2"),
        ({"seeds": "0,x"}, r"seed 'x' is invalid"),
        ({"overrides": ["data.bogus=1"]}, r"unknown config key 'data\.bogus'"),
        ({"grid": ["rule.name=backprop,telepathy"]}, r"rule\.name='telepathy' is unknown"),
        ({"grid": ["optim.lr=1e-3,0.001"]}, r"lr=1e-3,.* and .*lr=0\.001,.* have the same config"),
    ],
)
def test_bad_input_is_one_line_value_error_and_starts_nothing(tmp_path, kwargs, match):
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as err:
        spec = load_sweep(path, **kwargs)
        run_sweep(spec, out, workers=0)
    assert "\n" not in str(err.value)
    assert not (out / "runs").exists()


def test_bad_sweep_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {a: [1]}\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown sweep key 'bogus'"):
        load_sweep(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="backend 'spark' is unknown"):
        run_sweep(load_sweep(write_sweep(tmp_path)), tmp_path / "o", backend="spark")


# ---------------------------------------------------------------------------------- running
def test_sweep_is_idempotent_and_records_each_run_once(tmp_path):
    path = write_sweep(tmp_path, seeds=[0, 1])
    out = tmp_path / "out"
    spec = load_sweep(path)
    first = run_sweep(spec, out, workers=0)
    assert (first.total, first.finished) == (4, 4)
    rows = db_rows(out)
    assert len(rows) == 4 and len({r[0] for r in rows}) == 4
    assert all((out / r[0] / "summary.json").is_file() for r in rows)

    again = run_sweep(load_sweep(path), out, workers=0)
    assert (again.skipped, again.finished) == (4, 0)
    assert db_rows(out) == rows

    # finished runs not recorded yet (killed between the two) are recorded, not trained again
    stamp = {r[0]: (out / r[0] / "summary.json").stat().st_mtime_ns for r in rows}
    (out / DB_NAME).unlink()
    late = run_sweep(load_sweep(path), out, workers=0)
    assert (late.recorded_late, late.finished) == (4, 0)
    assert sorted(db_rows(out)) == sorted(rows)
    assert stamp == {r[0]: (out / r[0] / "summary.json").stat().st_mtime_ns for r in rows}

    # the report of the sweep renders its table and figures
    from locallearn.experiments.report import write_report

    text = write_report(out).read_text()
    assert "| variant | data.train_size | seeds | test acc |" in text
    assert "| clapp-syn | 1P* | 2 |" in text
    assert (out / "figures" / "curves_all.png").stat().st_size > 1000

    # the same folder with another config is refused before anything runs
    with pytest.raises(ValueError, match="holds a run of another config.*epochs"):
        run_sweep(load_sweep(path, overrides=["epochs=3"]), out, workers=0)
    # but not for a key that never changes a result (the thread count): its runs are done
    same = run_sweep(load_sweep(path, overrides=["threads=2"]), out, workers=0)
    assert (same.skipped, same.finished) == (4, 0)


def test_worker_killed_mid_run_is_resumed_and_recorded_once(tmp_path):
    path = write_sweep(tmp_path, grid={"data.train_size": ["1P*", "2P*"]}, variants={
        "bp": VARIANTS["bp"]})
    spec = load_sweep(path, overrides=["epochs=6"])
    out = tmp_path / "out"
    target = out / "runs" / "variant=bp,data.train_size=1Pstar,seed=0" / "checkpoint.pt"
    before = children(os.getpid())
    killed: list[int] = []

    def kill_after_checkpoint() -> None:
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in children(os.getpid()) - before:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass

    events: list[str] = []
    killer = threading.Thread(target=kill_after_checkpoint)
    killer.start()
    outcome = run_sweep(spec, out, workers=1, threads=1, on_event=events.append,
                        start_method="fork" if sys.platform == "linux" else "spawn")
    killer.join()
    assert killed, "no worker process to kill"
    assert any("worker process died" in e for e in events)
    assert outcome.finished == 2 and not outcome.failed
    rows = db_rows(out)
    assert len(rows) == 2 and len({r[0] for r in rows}) == 2
    metrics = [json.loads(line) for line in
               (target.parent / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(7))
    # resumed from its checkpoint, it ends as an uninterrupted run of the same config does
    ref = run_sweep(load_sweep(path, overrides=["epochs=6"], grid=["data.train_size=1P*"]),
                    tmp_path / "ref", workers=0)
    assert ref.finished == 1
    assert db_rows(tmp_path / "ref")[0][2] == rows[0][2]


SWEEP_SCRIPT = textwrap.dedent(
    """
    import sys
    from locallearn.experiments.sweep import run_sweep
    from locallearn.experiments.sweep_spec import load_sweep

    if __name__ == "__main__":
        spec = load_sweep(sys.argv[1], overrides=["epochs=4"])
        run_sweep(spec, sys.argv[2], workers=1, threads=1,
                  on_event=lambda m: print(m, flush=True))
    """
)


def test_sweep_killed_mid_way_and_restarted(tmp_path):
    """Kill the sweep's parent (SIGKILL) after its first run; the restart completes the rest."""
    path = write_sweep(tmp_path, grid={"data.train_size": ["1P*", "2P*"]})
    out = tmp_path / "out"
    script = tmp_path / "sweep_script.py"
    script.write_text(SWEEP_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "finished" in line:  # the first run is recorded; the next one is starting
                break
        workers = children(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("finished" in line for line in lines), "".join(lines)
    assert len(db_rows(out)) >= 1
    # the orphaned worker notices its parent is gone and exits (it would hold the run's lock)
    deadline = time.monotonic() + 120  # a bound on waiting for the exit, not a measurement
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}/status").exists()
                   and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in workers)
    outcome = run_sweep(load_sweep(path, overrides=["epochs=4"]), out, workers=0)
    assert outcome.skipped + outcome.recorded_late >= 1
    rows = db_rows(out)
    assert len(rows) == outcome.total == 4
    assert len({r[0] for r in rows}) == 4
    with ResultsStore(out) as store:
        # the restart records a session of its own when it has runs left to do (on a fast
        # machine the orphaned workers may have finished every run before they noticed)
        assert len(store.sessions()) == 1 + (1 if outcome.finished else 0)


def test_ray_backend_on_a_local_instance(tmp_path):
    """Runs wherever Ray is installed: the ``ray`` extra, which CI installs (``.ci/run``)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_sweep(load_sweep(path), out, workers=1, threads=1, backend="ray")
    finally:
        ray.shutdown()
    assert outcome.finished == 2 and not outcome.failed
    rows = db_rows(out)
    assert sorted(r[0] for r in rows) == [
        "runs/variant=bp,data.train_size=1Pstar,seed=0",
        "runs/variant=clapp-syn,data.train_size=1Pstar,seed=0",
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs"
                                                          / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_expand(name):
    path = Path(__file__).parents[1] / "configs" / "sweeps" / name
    runs = expand(load_sweep(path))
    assert len(runs) > 1 and len({r.name for r in runs}) == len(runs)


def test_sweep_file_keeps_the_values_of_every_start(tmp_path):
    """A folder filled part by part (--grid, --seeds) lists every value, seed and run it holds,
    first started first, so the report orders and describes the whole folder."""
    from locallearn.experiments.sweep import write_sweep_file

    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    first = load_sweep(path, grid=["variant=clapp-syn", "optim.lr=1e-3"])
    write_sweep_file(first, expand(first), out)
    second = load_sweep(path, grid=["variant=bp", "optim.lr=3e-3,1e-3"], seeds="2,0")
    write_sweep_file(second, expand(second), out)
    doc = yaml.safe_load((out / "sweep.yaml").read_text())
    assert doc["seeds"] == [0, 2]
    axes = {a["name"]: a for a in doc["axes"]}
    assert axes["variant"]["values"] == ["clapp-syn", "bp"]
    assert list(axes["variant"]["variants"]) == ["clapp-syn", "bp"]
    assert axes["optim.lr"]["values"] == ["1e-3", "3e-3"]
    names = {r.name for r in expand(first)} | {r.name for r in expand(second)}
    assert set(doc["runs"]) == names and len(doc["runs"]) == len(names)


def test_each_local_run_gets_a_fresh_process_so_its_peak_memory_is_its_own():
    """The pool the sweep builds (spawned workers) starts a new process for every run: two runs
    on one worker see two process ids (with fork, where the pool cannot, one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from locallearn.experiments.sweep import _fresh_process_per_run

    if sys.version_info < (3, 11):
        assert _fresh_process_per_run("spawn") == {}
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx,
                             **_fresh_process_per_run("spawn")) as pool:
        pids = [pool.submit(os.getpid).result() for _ in range(2)]
    assert pids[0] != pids[1]
    assert _fresh_process_per_run("fork") == {}
