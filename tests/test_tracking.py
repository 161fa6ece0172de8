"""``log.tensorboard``, ``log.wandb``: every row of metrics.jsonl also reaches TensorBoard and
W&B, at its step."""

from __future__ import annotations

import json
import sys
import types

import pytest

from locallearn.cli import main
from locallearn.experiments.runs import run
from locallearn.schema import load_config

TINY = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=2", "data.train_size=2P*",
        "data.test_size=40", "net.width=16", "batch_size=16", "progress=false",
        "checkpoint_every=1", "probe.steps=20", "epochs=3", "threads=1"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_number_of_metrics_jsonl_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(load_config(None, TINY + ["log.tensorboard=true"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = _rows(tmp_path)
    for key in ("loss", "test_accuracy", "seconds"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert logged.keys() == expected.keys() and len(logged) >= 3, key
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6), (key, step)
    final = events.Scalars("final/test_accuracy")
    assert [e.value for e in final] == [pytest.approx(summary["test_accuracy"], rel=1e-6)]


def test_wandb_gets_one_run_per_folder_with_the_config_and_every_row(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run(load_config(None, TINY + ["log.wandb=my-project", "epochs=1"]), tmp_path / "a")
    run(load_config(None, TINY + ["log.wandb=my-project", "epochs=2"]), tmp_path / "a")  # extended
    first, second = calls["init"]
    assert first["id"] == second["id"] and first["resume"] == "allow"
    assert first["project"] == "my-project"
    assert first["config"]["data"]["L"] == 2 and calls["finish"] == 2
    steps = [step for step, values in calls["log"] if "loss" in values]
    assert steps == sorted(set(steps)) and len(steps) == 2  # epochs 1 and 2, each once
    assert any("final/test_accuracy" in values for _, values in calls["log"])


def test_a_tracker_that_is_not_installed_or_unknown_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    args = ["run", "configs/rhm/backprop.yaml", "--out", str(tmp_path / "r"), *TINY]
    assert main([*args, "log.wandb=p"]) == 2
    err = capsys.readouterr().err
    assert "log.wandb needs the wandb package" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "log.mlflow=true"]) == 2
    assert "log.mlflow" in capsys.readouterr().err


def test_wandb_offline_writes_its_run_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from locallearn.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(load_config(None, TINY + ["log.wandb=offline-test", "epochs=1"]), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    assert runs[0].name.endswith(Tracker.run_id(tmp_path))  # a resumed run continues this one
