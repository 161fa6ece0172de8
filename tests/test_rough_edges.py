"""What a new user runs into: output paths, corrupt checkpoints, diverging runs, resuming with
other settings, errors deep inside a run. Every failure is one line: exit 2 for bad input, 1 for a
run that started and failed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from locallearn.cli import main
from locallearn.errors import RunError
from locallearn.experiments.runs import run
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs/rhm/backprop.yaml")
TINY = [
    "data.v=8", "data.n_classes=4", "data.m=4", "data.L=2", "data.train_size=2P*",
    "data.test_size=40", "net.width=16", "batch_size=16", "progress=false",
    "checkpoint_every=2", "probe.steps=20",
]


def tiny(*extra: str):
    return load_config(None, TINY + list(extra))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("locallearn: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["run", "demo", "sweep"])
def test_out_on_a_file_is_one_line_exit_2(tmp_path, capsys, command):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    args = {"run": ["run", PRESET], "demo": ["demo", "--quiet", "--rules", "dfa"],
            "sweep": ["sweep", PRESET, "--workers", "0", "--quiet"]}[command]
    assert main([*args, "--out", str(target), "epochs=1", *TINY]) == 2
    assert "is a file, not a directory" in one_line_error(capsys)
    assert target.read_text() == "not a folder"


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 10)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_checkpoint_names_the_file_and_the_way_out(tmp_path, capsys, how):
    out = tmp_path / "run"
    assert main(["run", PRESET, "--out", str(out), "epochs=2", *TINY]) == 0
    capsys.readouterr()
    _corrupt(out / "checkpoint.pt", how)
    for args in (["run", PRESET, "--out", str(out), "epochs=2", *TINY],
                 ["analyze", str(out)], ["align", str(out), "--batches", "1"]):
        assert main(args) == 2, args
        err = one_line_error(capsys)
        assert str(out / "checkpoint.pt") in err and "move it aside" in err
        assert "restore it" in err
    # the way out works: moved aside, the run starts again from scratch
    (out / "checkpoint.pt").rename(tmp_path / "broken.pt")
    assert main(["run", PRESET, "--out", str(out), "epochs=2", *TINY]) == 0


def test_divergence_before_any_checkpoint_says_none_was_saved(tmp_path, monkeypatch):
    from locallearn.rules.backprop import Backprop

    original = Backprop.compute_grads
    calls = {"n": 0}

    def blow_up(self, net, batch):
        calls["n"] += 1
        out = original(self, net, batch)
        if calls["n"] > 3:  # epoch 1, before the first checkpoint
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(Backprop, "compute_grads", blow_up)
    with pytest.raises(RunError) as err:
        run(tiny("epochs=4"), tmp_path)
    msg = str(err.value)
    assert "diverged at epoch 1" in msg and "no checkpoint was saved" in msg
    assert "epoch 0" not in msg and not (tmp_path / "checkpoint.pt").exists()


def test_loss_blow_up_guard_stops_a_huge_learning_rate(tmp_path, capsys):
    """A learning rate of 1e6 used to finish "successfully" at chance with a loss of 4e5."""
    out = tmp_path / "run"
    code = main(["run", PRESET, "--out", str(out), "epochs=3", "optim.lr=1e6", *TINY])
    assert code == 1
    err = one_line_error(capsys)
    assert "diverged at epoch 1" in err and "stop_loss_factor=100" in err
    assert "lower optim.lr" in err and not (out / "summary.json").exists()
    # the documented way to train on anyway
    code = main(["run", PRESET, "--out", str(tmp_path / "on"), "epochs=1", "optim.lr=1e6",
                 "stop_loss_factor=null", *TINY])
    assert code == 0


def test_another_config_names_the_differing_key(tmp_path):
    run(tiny("epochs=1"), tmp_path)
    with pytest.raises(ValueError, match=r"differs at optim\.lr: 0\.001 vs 0\.5"):
        run(tiny("epochs=1", "optim.lr=0.5"), tmp_path)
    with pytest.raises(ValueError, match=r"differs at seed: 0 vs 3"):
        run(tiny("epochs=1", "seed=3"), tmp_path)


def test_more_epochs_extend_a_finished_run_exactly(tmp_path):
    direct = run(tiny("epochs=4", "checkpoint_every=1"), tmp_path / "direct")
    first = run(tiny("epochs=2", "checkpoint_every=1"), tmp_path / "extended")
    assert first["epochs"] == 2
    extended = run(tiny("epochs=4", "checkpoint_every=1"), tmp_path / "extended")
    assert extended["epochs"] == 4
    for key in ("test_accuracy", "train_loss", "test_loss"):
        assert extended[key] == direct[key], key
    a = torch.load(tmp_path / "direct/checkpoint.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "extended/checkpoint.pt", weights_only=False)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "extended/metrics.jsonl").read_text().split("\n")
            if x]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    assert "epochs: 4" in (tmp_path / "extended/config.yaml").read_text()
    with pytest.raises(ValueError, match="has trained 4 epochs; epochs=3 would shorten it"):
        run(tiny("epochs=3", "checkpoint_every=1"), tmp_path / "extended")


def test_a_cosine_schedule_is_not_extended(tmp_path):
    run(tiny("epochs=1", "optim.schedule=cosine"), tmp_path)
    with pytest.raises(ValueError, match="cosine anneals over the run's length"):
        run(tiny("epochs=2", "optim.schedule=cosine"), tmp_path)


def test_an_error_inside_a_run_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    from locallearn.rules.backprop import Backprop

    original = Backprop.compute_grads
    calls = {"n": 0}

    def fails(self, net, batch):
        calls["n"] += 1
        if calls["n"] == 20:  # epoch 3
            raise ValueError("a bad value deep inside a step")
        return original(self, net, batch)

    monkeypatch.setattr(Backprop, "compute_grads", fails)
    assert main(["run", PRESET, "--out", str(tmp_path), "epochs=4", *TINY]) == 1
    err = one_line_error(capsys)
    assert "failed at epoch 3" in err and "a bad value deep inside a step" in err
    assert "checkpoint of epoch 2 is kept" in err


def test_out_of_memory_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    from locallearn.rules.backprop import Backprop

    def oom(self, net, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(Backprop, "compute_grads", oom)
    assert main(["run", PRESET, "--out", str(tmp_path), "epochs=1", *TINY]) == 1
    err = one_line_error(capsys)
    assert "out of memory" in err and "lower batch_size" in err


def test_an_unexpected_error_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import locallearn.experiments.commands as commands

    def broken(args):
        raise KeyError("something internal")

    monkeypatch.setattr(commands, "_cmd_run", broken)
    assert main(["run", PRESET, "--out", str(tmp_path)]) == 1
    assert "KeyError" in one_line_error(capsys)


def test_sweep_over_epochs_is_accepted(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", PRESET, "--grid", "epochs=1,2", "--workers", "0", "--quiet",
                 "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["results", str(out), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split(",")
    assert header.count("epochs") == 1
    col = header.index("epochs")
    assert sorted(line.split(",")[col] for line in lines[1:]) == ["1", "2"]
    with pytest.raises(ValueError, match="clashes with a column of the results; rename"):
        from locallearn.experiments.sweep_spec import load_sweep

        load_sweep(None, ["test_accuracy=1,2"])


def test_demo_names_each_preset_and_its_read_out(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "epochs=1", *TINY, "--out", str(out), "--quiet",
                 "--rules", "dfa", "clapp-per-block"])
    assert code == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in rows] == ["dfa", "clapp-per-block"]
    assert rows[1]["rule"] == "layerwise" and rows[1]["readout"] == "linear (frozen features)"
    assert rows[0]["readout"] == "end-to-end"
    assert re.search(r"clapp-per-block\s+\S+\s+linear", table), table
    assert "linear read-out" in table and "end-to-end" in table
    assert "layerwise" not in table.split("\n\n")[0]


def test_readme_states_the_torch_versions_pyproject_requires():
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', pyproject).groups()
    readme = (ROOT / "README.md").read_text()
    assert f"torch from {low} on" in readme
    pinned = re.search(r"pip install torch==([0-9.]+)", readme).group(1)
    as_tuple = [int(x) for x in pinned.split(".")[:2]]
    assert [int(x) for x in low.split(".")] <= as_tuple < [int(x) for x in high.split(".")]


def test_one_key_value_parser_for_every_command(tmp_path, capsys):
    """Every command splits key=value with config.split_key_value: the same one-line error."""
    for args in (["rhm", "info", "v"], ["run", PRESET, "--out", str(tmp_path / "r"), "epochs"]):
        assert main(args) == 2
        assert "is not of the form key=value" in one_line_error(capsys)
    assert main(["sweep", PRESET, "--grid", "epochs", "--dry-run"]) == 2
    assert "is not of the form KEY=V1,V2,..." in one_line_error(capsys)
    splitters = [p.relative_to(ROOT).as_posix() for p in (ROOT / "locallearn").rglob("*.py")
                 if '.partition("=")' in p.read_text()]
    assert splitters == ["locallearn/config.py"]
