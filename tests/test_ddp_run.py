"""``torchrun -m locallearn run``: two gloo processes match one process with the same batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
