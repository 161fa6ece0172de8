"""The training loop, configs and the run/demo commands."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch

from locallearn.cli import main
from locallearn.errors import RunError
from locallearn.experiments.runs import run
from locallearn.experiments.tasks import build_task
from locallearn.schema import load_config, resolve_size
from locallearn.train import Trainer, saved_cuda_rng

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.v=8", "data.n_classes=4", "data.m=4", "data.L=2", "data.train_size=2P*",
    "data.test_size=40", "net.width=16", "batch_size=16", "progress=false",
    "checkpoint_every=2", "probe.steps=20",
]


def tiny(*extra: str):
    return load_config(None, TINY + list(extra))


def test_resolve_size():
    assert resolve_size("4P*", 32, "k") == 128
    assert resolve_size("0.5P*", 32, "k") == 16
    assert resolve_size("1.5 P*", 32, "k") == 48
    assert resolve_size(100, 32, "k") == 100
    for bad in ("4P", "P*", "x4P*", "-1P*"):
        with pytest.raises(ValueError, match="expected an integer or a multiple of P"):
            resolve_size(bad, 32, "data.train_size")


def test_run_writes_outputs_and_learns(tmp_path):
    cfg = tiny("epochs=6", "optim.lr=1e-2", "rule.name=backprop")
    summary = run(cfg, tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (tmp_path / name).exists()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    for key in ("rule", "test_accuracy", "chance", "epochs", "seconds"):
        assert key in on_disk
    assert on_disk["rule"] == "backprop" and on_disk["epochs"] == 6
    assert on_disk["chance"] == 0.25 and on_disk["train_size"] == 2 * 4 * 4**2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(7))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_epochs_zero_is_the_untrained_network(tmp_path):
    summary = run(tiny("epochs=0"), tmp_path)
    assert summary["epochs"] == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    task = build_task(tiny("epochs=0"))
    fresh = Trainer(tiny("epochs=0"), task, tmp_path / "other").net
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state["net"][key])
    # the recorded accuracy is the untrained network's on the test set (not a trained one's)
    with torch.no_grad():
        hits = task.logits(fresh, task.test.tokens).argmax(1) == task.test.labels
    assert summary["test_accuracy"] == pytest.approx(float(hits.float().mean()))
    assert len(task.test) == 40


@pytest.mark.parametrize(
    "rule",
    [
        ["rule.name=backprop"],
        ["rule.name=layerwise", "rule.view=synonyms"],
        ["rule.name=layerwise", "rule.view=mask", "rule.negatives=random"],
        ["rule.name=layerwise", "rule.view=synonyms-per-block", "rule.loss=vicreg"],
    ],
    ids=["backprop", "clapp-synonyms", "clapp-mask", "vicreg-per-block"],
)
def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch, rule):
    cfg = tiny("epochs=5", *rule)
    full = run(cfg, tmp_path / "full")

    calls = {"n": 0}
    original = Trainer.train_epoch

    def crash_on_fourth(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / "summary.json").exists()
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = run(cfg, tmp_path / "cut")
    for key in ("test_accuracy", "test_loss", "train_loss", "epochs"):
        assert resumed[key] == full[key]
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in a]
    strip_b = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in b]
    assert strip == strip_b
    w_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["net"]
    w_cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["net"]
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


def test_finished_run_is_not_trained_again(tmp_path):
    cfg = tiny("epochs=2")
    first = run(cfg, tmp_path)
    second = run(cfg, tmp_path)
    assert second["test_accuracy"] == first["test_accuracy"]
    assert second["seconds"] == first["seconds"]


def test_checkpoints_keep_the_run_device_cuda_state_only(tmp_path):
    """A CPU run saves no CUDA state; a GPU run restores its own GPU's state, also from an
    older checkpoint listing every GPU then visible, and where fewer GPUs are visible now."""
    run(tiny("epochs=1"), tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["cuda_rng"] is None
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]
    assert saved_cuda_rng(states[1], torch.device("cuda:0")) is states[1]
    assert saved_cuda_rng(states, torch.device("cuda:2")) is states[2]
    assert saved_cuda_rng(states[:1], torch.device("cuda:1")) is states[0]
    assert saved_cuda_rng(states, torch.device("cpu")) is None
    assert saved_cuda_rng(None, torch.device("cuda:0")) is None


def test_other_config_in_same_directory_is_refused(tmp_path):
    run(tiny("epochs=1"), tmp_path)
    with pytest.raises(ValueError, match="holds a run of another config"):
        run(tiny("epochs=1", "optim.lr=0.5"), tmp_path)


def test_divergence_stops_with_one_line_and_keeps_checkpoint(tmp_path, monkeypatch):
    from locallearn.rules.backprop import Backprop

    calls = {"n": 0}
    original = Backprop.compute_grads

    def blow_up(self, net, batch):
        calls["n"] += 1
        out = original(self, net, batch)
        if calls["n"] > 2 * 8 + 1:  # during epoch 3 (8 batches per epoch)
            out["loss"] = math.nan
        return out

    monkeypatch.setattr(Backprop, "compute_grads", blow_up)
    with pytest.raises(RunError) as err:
        run(tiny("epochs=5"), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "epoch 3" in msg and "backprop" in msg and "epoch 2" in msg
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["net"].values())


def test_divergence_from_the_cli_exits_1(tmp_path, monkeypatch, capsys):
    from locallearn.rules.backprop import Backprop

    monkeypatch.setattr(Backprop, "compute_grads", lambda self, net, batch: {"loss": math.inf})
    code = main(["run", str(ROOT / "configs/rhm/backprop.yaml"), "--out", str(tmp_path)] + TINY)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged at epoch 1" in err


@pytest.mark.parametrize("every", [1, 3])
def test_stop_at_train_loss_threshold(tmp_path, every):
    """The threshold is tested on the evaluated training loss: with eval_every > 1 the run
    stops after an evaluated epoch, and its summary keeps the evaluation's numbers."""
    summary = run(tiny("epochs=50", "optim.lr=3e-2", "stop_train_loss=0.5",
                       f"eval_every={every}"), tmp_path)
    assert summary["stopped_early"] and summary["epochs"] < 50
    assert summary["epochs"] % every == 0
    assert summary["train_loss"] < 0.5 and summary["test_accuracy"] is not None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("seconds" in row for row in rows)  # evaluated or not, on the time axis


def test_a_time_budget_ends_the_run_at_the_end_of_an_epoch_and_counts_as_finished(tmp_path):
    summary = run(tiny("epochs=50", "max_seconds=1e-9"), tmp_path)
    assert summary["stopped_early"] and summary["epochs"] == 1
    assert summary["seconds"] >= 1e-9 and summary["test_accuracy"] is not None
    again = run(tiny("epochs=50", "max_seconds=1e-9"), tmp_path)  # finished: not trained again
    assert again["epochs"] == 1 and again["seconds"] == summary["seconds"]
    with pytest.raises(ValueError, match="max_seconds=0.0 is invalid: must be a number"):
        tiny("max_seconds=0")


def test_a_time_budget_stops_the_longer_runs_trajectory(tmp_path):
    """With a constant learning rate, a budgeted run is the first part of the run without a budget
    (what the leaderboard's curve column at an equal time relies on): same steps, same losses."""
    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    run(tiny("epochs=3", "optim.schedule=none"), tmp_path / "long")
    run(tiny("epochs=50", "optim.schedule=none", "max_seconds=1e-9"), tmp_path / "budget")
    first = [row for row in rows(tmp_path / "long") if row.get("epoch") == 1]
    budget = [row for row in rows(tmp_path / "budget") if row.get("epoch") == 1]
    keys = [k for k in first[0] if k.endswith("loss") or k in ("step", "train_accuracy")]
    assert len(budget) == 1 and any(k.endswith("loss") for k in keys)
    assert {k: budget[0][k] for k in keys} == {k: first[0][k] for k in keys}


def test_stop_threshold_waits_for_an_evaluated_epoch(tmp_path):
    cfg = tiny("stop_train_loss=0.5")
    trainer = Trainer(cfg, build_task(cfg), tmp_path)
    trainer.history = [{"epoch": 0, "train_loss": 0.9}, {"epoch": 1, "loss": 0.1}]
    assert not trainer._reached_stop()  # the rule's own loss is not the task's training loss
    trainer.history.append({"epoch": 2, "loss": 0.1, "train_loss": 0.4})
    assert trainer._reached_stop()
    trainer.history = [{"epoch": 0, "loss": 0.9}, {"epoch": 1, "loss": 0.1}]
    assert trainer._reached_stop()  # a task without a training loss: the rule's


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["bogus=1"], "unknown config key 'bogus'"),
        (["data.bogus=1"], "unknown config key 'data.bogus'"),
        (["rule.name=nope"], "rule.name='nope' is unknown"),
        (["optim.name=lbfgs"], "optim.name='lbfgs' is invalid"),
        (["epochs=-1"], "epochs=-1 is invalid"),
        (["epochs=ten"], "epochs='ten' is invalid"),
        (["data.train_size=4Q"], "data.train_size='4Q' is invalid"),
        (["data.m=9"], "RHM: m=9 is invalid"),
        (["data.train_size=100000P*"], "n_train + n_test"),
        (["net.width=[8,8]"], "net.widths=[8, 8] is invalid"),
        (["rule.name=layerwise", "rule.view=siblings", "data.L=1", "data.train_size=8",
          "data.test_size=8"], "needs data.L >= 2"),
        (["rule.name=layerwise", "rule.loss=mse"], "rule.options.loss='mse' is unknown"),
        (["net.kind=vgg6"], "does not fit data.name=rhm"),
        (["device=tpu"], "device='tpu' is invalid"),
        (["noequals"], "is not of the form key=value"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    code = main(["run", str(ROOT / "configs/rhm/backprop.yaml"), "--out", str(tmp_path / "o"),
                 "epochs=1", "progress=false"] + args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset",
    ["backprop", "backprop-nomask", "dfa", "drtp", "sign-dfa", "clapp", "infonce", "vicreg",
     "clapp-mask", "clapp-siblings", "clapp-per-block", "vicreg-per-block", "latent-prediction",
     "latent-prediction-cnn",
     "token-last", "token-mask"],
)
def test_presets_load_and_run_one_epoch(tmp_path, preset):
    path = ROOT / "configs" / "rhm" / f"{preset}.yaml"
    cfg = load_config(path, TINY + ["epochs=1"])
    summary = run(cfg, tmp_path)
    assert summary["epochs"] == 1 and summary["test_accuracy"] is not None


def test_cli_run_and_demo(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/rhm/dfa.yaml"), "--out", str(out), "epochs=1"]
                + TINY) == 0
    assert json.loads((out / "summary.json").read_text())["rule"] == "dfa"
    demo = tmp_path / "demo"
    code = main(["demo", "--out", str(demo), "--quiet", "epochs=1"] + TINY)
    assert code == 0
    rows = json.loads((demo / "summary.json").read_text())
    assert [r["name"] for r in rows] == ["backprop", "backprop-nomask", "dfa", "clapp-per-block"]
    assert all({"rule", "test_accuracy", "chance", "epochs", "seconds"} <= set(r) for r in rows)
    assert (demo / "accuracy.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "clapp-per-block" in table and "chance" in table


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimiser_takes_the_same_step(tmp_path, name):
    from locallearn.train import build_optimizer

    steps = {}
    for fused in (False, True):
        cfg = tiny(f"optim.name={name}", f"optim.fused={str(fused).lower()}")
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))]
        opt, _ = build_optimizer(cfg, params)
        assert bool(opt.defaults.get("fused")) == fused
        params[0].grad = torch.linspace(0.5, -0.3, 12).reshape(3, 4)
        opt.step()
        steps[fused] = params[0].detach().clone()
    assert not torch.equal(steps[True], torch.linspace(-1, 1, 12).reshape(3, 4))
    assert torch.allclose(steps[True], steps[False], rtol=1e-6, atol=1e-7)


def test_allocator_tuning_is_optional_and_idempotent():
    import subprocess
    import sys

    code = "from locallearn.runtime import tune_cpu_allocator as t; print(t(), t())"
    env = {k: v for k, v in os.environ.items() if k != "LOCALLEARN_TUNE_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out == [str(glibc)] * 2
    env["LOCALLEARN_TUNE_ALLOCATOR"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["False", "False"]
