"""``torchrun -m locallearn run``: two gloo processes match one process with the same batch."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from image_folder import write_dataset

from locallearn.experiments.runs import run
from locallearn.experiments.tasks import build_task
from locallearn.schema import load_config
from locallearn.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=2", "data.train_size=2P*",
        "data.test_size=40", "net.width=16", "batch_size=16", "progress=false", "epochs=2",
        "optim.name=sgd", "optim.lr=0.5", "threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rule", ["backprop", "dfa"])
def test_two_processes_match_one(tmp_path, rule):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    config = str(ROOT / "configs" / "rhm" / f"{rule}.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "locallearn", "run", config,
           "--out", str(tmp_path / "ddp"), *ARGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote") == 1, done.stdout  # rank 0 alone reports the run
    single = run(load_config(config, ARGS), tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["epochs"] == single["epochs"] == 2
    assert ddp["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-6)
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)["net"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    # the parameters moved: the comparison is not between two untouched networks
    cfg = load_config(config, ARGS)
    init = Trainer(cfg, build_task(cfg), tmp_path / "unused").net.state_dict()
    assert any(not torch.allclose(init[k], b[k], atol=1e-3) for k in b)


# ---------------------------------------------------------------------------------------------
# uneven parts: batches that do not split evenly over the ranks


def _uneven_main(rank: int, world: int, port: int, config: str, args: list[str], out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    states: list[torch.Tensor] = []
    epoch = Trainer.train_epoch

    def recorded(self):
        metrics = epoch(self)
        states.append(self.generator.get_state().clone())
        return metrics

    Trainer.train_epoch = recorded
    run(load_config(config, args), out)
    torch.save(states, f"{out}.rank{rank}")


@pytest.mark.parametrize("case", ["rhm", "images"])
def test_uneven_parts_keep_the_ranks_together(tmp_path, monkeypatch, case):
    """Two ranks, batches of odd size and random negatives: every rank keeps the same random
    state (the next epoch's permutation), a part with no sample adds nothing (the RHM's last
    batch of one sample), and an image batch too small for two images per rank is left out."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if case == "rhm":
        config = str(ROOT / "configs" / "rhm" / "clapp-per-block.yaml")
        args = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=3", "data.train_size=61",
                "data.test_size=40", "net.width=12", "batch_size=15", "epochs=3",
                "rule.negatives=random", "progress=false", "threads=1"]
    else:
        write_dataset(tmp_path / "images", {"train": 12, "test": 4})
        config = str(ROOT / "configs" / "images" / "clapp++-cpu.yaml")
        args = ["data.name=folder", f"data.root={tmp_path / 'images'}", "net.width_mult=0.03125",
                "batch_size=7", "epochs=3", "rule.negatives=random",
                "rule.options.negatives=same-view", "probe.epochs=1",
                "probe_every=0", "progress=false", "threads=1"]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_uneven_main, args=(2, free_port(), config, args, str(tmp_path / "run")),
                       nprocs=2, join=True, start_method=method)
    states = [torch.load(f"{tmp_path / 'run'}.rank{r}") for r in (0, 1)]
    assert len(states[0]) == len(states[1]) == 3
    assert all(torch.equal(a, b) for a, b in zip(*states))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary["train_loss"] if case == "rhm" else summary["probe_accuracy"])
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    if case == "images":  # 24 images in batches of 7: the last 3 cannot give each rank 2
        assert rows[-1]["step"] == 3 * 3
