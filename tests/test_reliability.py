"""What a demanding user meets first: the user's own files are never written over, a checkpoint
is never continued under another config, include cycles and a full disk are one line, SIGTERM
ends a run as Ctrl-C does (exit 143) and the same command resumes it, writes are durable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from locallearn.cli import main
from locallearn.runfiles import write_durably

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "rhm" / "backprop.yaml"
ARGS = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=2", "data.train_size=2P*",
        "data.test_size=40", "net.width=16", "batch_size=16", "progress=false",
        "checkpoint_every=1", "threads=1", "optim.name=sgd", "optim.lr=0.1"]


def test_a_checkpoint_is_not_continued_under_another_config_without_config_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(PRESET), "--out", str(out), *ARGS, "epochs=1"]) == 0
    (out / "config.yaml").unlink()
    capsys.readouterr()
    code = main(["run", str(PRESET), "--out", str(out), *ARGS, "epochs=2", "optim.lr=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "its checkpoint.pt records it" in err and "optim.lr" in err
    assert len(err.strip().splitlines()) == 1
    # the same config (a longer run) continues from the checkpoint, config.yaml or not
    assert main(["run", str(PRESET), "--out", str(out), *ARGS, "epochs=2"]) == 0
    assert (out / "config.yaml").is_file()


def test_a_preset_named_config_yaml_inside_out_is_never_written_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    mine = out / "config.yaml"
    text = f"# my preset\nbase: {PRESET}\nepochs: 1\n"
    mine.write_text(text)
    code = main(["run", str(mine), "--out", str(out), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "writes its resolved config to" in err
    assert mine.read_text() == text and not (out / "checkpoint.pt").exists()
    # the run's own resolved config.yaml is a valid preset to resume from
    other = tmp_path / "other"
    assert main(["run", str(PRESET), "--out", str(other), *ARGS, "epochs=1"]) == 0
    resolved = (other / "config.yaml").read_text()
    assert main(["run", str(other / "config.yaml"), "--out", str(other)]) == 0
    assert (other / "config.yaml").read_text() == resolved


def test_a_sweep_file_inside_its_own_out_is_kept_and_the_command_resumes(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    sweep = out / "sweep.yaml"
    text = yaml.safe_dump({"config": str(PRESET), "settings": {"epochs": 1},
                           "grid": {"optim.lr": [0.05, 0.1]}, "seeds": [0]})
    sweep.write_text(text)
    args = ["sweep", str(sweep), "--out", str(out), "--workers", "0", *ARGS[:-1]]
    assert main(args) == 0
    assert sweep.read_text() == text and (out / "sweep-record.yaml").is_file()
    assert main(args) == 0  # the same command again: nothing run twice, nothing recorded twice
    import sqlite3

    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT run_dir FROM runs").fetchall()
    assert sorted(r[0] for r in rows) == ["runs/optim.lr=0.05,seed=0", "runs/optim.lr=0.1,seed=0"]
    assert main(["report", str(out)]) == 0
    assert "optim.lr" in (out / "report.md").read_text()


def test_an_include_cycle_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nepochs: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    code = main(["run", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "form a cycle through base:" in err and "a.yaml -> " in err
    assert len(err.strip().splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code = main(["run", str(PRESET), "--out", str(out), *ARGS, "epochs=1"])
    err = capsys.readouterr().err
    assert code == 1 and "the disk is full" in err and "checkpoint.pt" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.pt").exists()


def test_writes_are_flushed_before_the_rename(tmp_path, monkeypatch):
    flushed = []
    real = os.fsync

    def spy(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "summary.json"
    write_durably(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}"
    assert flushed == [str(tmp_path / "summary.json.tmp"), str(tmp_path)]


def test_sigterm_ends_a_run_with_143_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "locallearn", "run", str(PRESET), "--out", str(out),
           *ARGS, "epochs=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "locallearn: terminated (SIGTERM); finished work and the last checkpoint are kept, and "
        "the same command resumes"]
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    assert 1 <= saved < 400
    done = subprocess.run([*cmd[:-1], f"epochs={saved + 1}"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == saved + 1


@pytest.mark.parametrize("case", ["no test split", "one class"])
def test_data_that_cannot_be_probed_fails_before_training(tmp_path, capsys, case):
    from image_folder import folder_config, write_dataset

    root = tmp_path / "data"
    write_dataset(root, {"train": 6, "test": 4})
    if case == "no test split":
        import shutil

        shutil.rmtree(root / "test")
        expected = "test"
    else:
        import shutil

        for split in ("train", "test"):
            shutil.rmtree(root / split / "red")
        expected = "holds 1 class (blue); the linear probe needs at least 2"
    config = folder_config(tmp_path, root, epochs=3)
    out = tmp_path / "run"
    code = main(["run", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_bad_places_and_files_are_exit_2_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["theory", "--out", str(a_file)], "is a file, not a directory"),
        (["run", str(PRESET), "--out", str(a_file / "x"), *ARGS, "epochs=1"],
         "cannot be made: "),
    ]
    broken = tmp_path / "sweep"
    broken.mkdir()
    (broken / "results.sqlite").write_text("not a database")
    cases.append((["results", str(broken)], "is not a readable results database"))
    for argv, expected in cases:
        started = time.perf_counter()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert time.perf_counter() - started < 10, argv  # nothing computed first


def test_probe_takes_threads_as_the_readme_says(tmp_path, capsys):
    from image_folder import folder_config, write_dataset

    root = tmp_path / "data"
    write_dataset(root, {"train": 6, "test": 4})
    out = tmp_path / "run"
    assert main(["run", str(folder_config(tmp_path, root, epochs=1)), "--out", str(out)]) == 0
    assert main(["probe", str(out), "threads=1", "probe.epochs=1"]) == 0
    assert main(["probe", str(out), "epochs=3"]) == 2
    assert "valid: probe.*, threads," in capsys.readouterr().err


def test_two_runs_never_train_in_one_folder(tmp_path, capsys):
    from locallearn.runfiles import RUN_LOCK, file_lock

    out = tmp_path / "run"
    with file_lock(out / RUN_LOCK) as locked:  # another process training there
        assert locked
        code = main(["run", str(PRESET), "--out", str(out), *ARGS, "epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and "another process is training in" in err
    assert not (out / "checkpoint.pt").exists()
    assert main(["run", str(PRESET), "--out", str(out), *ARGS, "epochs=1"]) == 0


def test_a_finished_sweep_run_with_an_unreadable_summary_is_made_again(tmp_path, capsys):
    from locallearn.config import to_dict
    from locallearn.experiments.sweep import run_one
    from locallearn.schema import load_config

    raw = to_dict(load_config(PRESET, [*ARGS, "epochs=1"]))
    out = tmp_path / "run"
    first = run_one(raw, str(out))
    (out / "summary.json").write_text('{"torn')
    again = run_one(raw, str(out))  # from the final checkpoint: no training, the same numbers
    assert again["epochs"] == 1 and again["test_accuracy"] == first["test_accuracy"]
    assert again["seconds"] == first["seconds"]
    (out / "summary.json").write_text('{"torn')
    (out / "checkpoint.pt").unlink()
    with pytest.raises(Exception, match="summary.json' cannot be read and the run has no "
                                        "checkpoint"):
        run_one(raw, str(out))


def test_a_rank_whose_launcher_dies_stops_instead_of_training_as_an_orphan(tmp_path):
    child = ("from locallearn.distributed import exit_with_parent; "
             "exit_with_parent(0.1); print('watching', flush=True); import time; time.sleep(60)")
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                f"{child!r}]); print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE,
                              text=True)
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "watching"  # the rank watches its launcher
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] \
            if Path(f"/proc/{pid}/stat").exists() else "X"
        if state == "Z":  # exited, waiting to be reaped by its new parent
            break
        time.sleep(0.1)
    gone = not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    if not gone:
        os.kill(pid, signal.SIGKILL)
    assert gone, "the orphaned rank kept running"


def test_a_peer_timeout_is_one_line_naming_parallel_timeout(tmp_path, monkeypatch, capsys):
    from locallearn import distributed
    from locallearn.train import Trainer

    def frozen(self):
        raise RuntimeError("[gloo] Timed out waiting 600000ms for recv operation to complete")

    monkeypatch.setattr(Trainer, "_train_and_summarise", frozen)
    # as on a rank of a process group (the frozen-peer wait itself: tests/test_distributed.py)
    monkeypatch.setattr(distributed, "peer_timeout", lambda err: "timed out" in str(err).lower())
    code = main(["run", str(PRESET), "--out", str(tmp_path / "r"), *ARGS, "epochs=1",
                 "parallel.timeout=600"])
    err = capsys.readouterr().err
    assert code == 1 and "did not answer within parallel.timeout=600 s" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["run", str(PRESET), "--out", str(tmp_path / "s"), "parallel.timeout=0"]) == 2


def test_one_rhm_size_in_two_spellings_is_refused(tmp_path):
    from locallearn.experiments.sweep_spec import expand, load_sweep

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "settings": {"data": {"name": "rhm", "v": 4, "n_classes": 2, "m": 2, "s": 2, "L": 3,
                              "test_size": 50}, "net.width": 16, "epochs": 1},
        "grid": {"data.train_size": [16, "1P*"]}}))  # P* = n_classes * m**L = 16
    with pytest.raises(ValueError, match=r"have the same config.*a size in samples and in P"):
        expand(load_sweep(sweep))
    assert len(expand(load_sweep(sweep, grid=["data.train_size=16,2P*"]))) == 2
