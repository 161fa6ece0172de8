"""The field's local rules (SoftHebb, SCFF, LPL) pipelined across processes: bit-identical to one
process, with their per-block optimiser settings; SoftHebb refuses data parallelism."""

from __future__ import annotations

import pytest
import torch
import yaml
from image_folder import write_dataset
from test_pipeline import _assert_same_run, _start

from locallearn.experiments.runs import run
from locallearn.nets.hebb_cnn import softhebb_cnn
from locallearn.nets.scff_cnn import scff_cnn
from locallearn.nets.vgg import vgg11
from locallearn.schema import load_config

CASES = {
    "softhebb": {
        "net": {"kind": "softhebb", "width_mult": 1 / 16, "bias": False},
        "rule": {"name": "softhebb"},
        "optim": {"name": "sgd", "momentum": 0.0, "block_lr": [0.08, 0.005, 0.01]},
        "probe": {"epochs": 2, "grid": [8, 4, 2]},
    },
    "scff": {  # one AdamW per block, each with its exponential schedule
        "net": {"kind": "scff", "width_mult": 1 / 16, "bias": True},
        "rule": {"name": "scff"},
        "optim": {"name": "adamw", "block_lr": [0.01, 0.002, 0.0002],
                  "block_weight_decay": [1e-4, 1e-4, 3e-4], "schedule": "exponential",
                  "gamma": [0.7, 0.8, 1.0], "period": [2, 1, 3]},
        "probe": {"epochs": 2, "grid": [8, 4, 2], "standardize": "sample"},
    },
    "lpl": {
        "net": {"kind": "vgg11", "width_mult": 1 / 16, "bias": True},
        "rule": {"name": "lpl"},
        "optim": {"name": "adam", "lr": 1e-3, "schedule": "cosine", "warmup_epochs": 0.5},
        "probe": {"epochs": 2, "grid": [1] * 8},
    },
}
SIDES = {"softhebb": 16, "scff": 16, "lpl": 32}
SPLITS = {"softhebb": "[2,1]", "scff": "[1,2]", "lpl": "[3,5]"}


def _config(tmp_path, case: str) -> str:
    write_dataset(tmp_path / "images", {"train": 12, "test": 4}, side=SIDES[case])
    raw = {
        "data": {"name": "folder", "root": str(tmp_path / "images")},
        **CASES[case],
        "epochs": 2, "batch_size": 8, "checkpoint_every": 1, "progress": False, "threads": 1,
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return str(config)


@pytest.mark.parametrize("case", list(CASES))
def test_two_stages_match_one_process(tmp_path, monkeypatch, case):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _config(tmp_path, case)
    run(load_config(config), tmp_path / "one")
    _start(2, config, ["parallel.stages=2", f"parallel.split={SPLITS[case]}"], tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    init = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["net"]
    builds = {"softhebb": softhebb_cnn, "scff": scff_cnn, "lpl": vgg11}
    start = builds[case](1 / 16, seed=0).state_dict()
    assert all(not torch.equal(start[k], init[k]) for k in start if k.endswith("weight"))


def test_softhebb_refuses_data_parallel(tmp_path, monkeypatch):
    from locallearn import distributed

    config = _config(tmp_path, "softhebb")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(ValueError, match="data parallel .* does not fit rule.name=softhebb"):
        run(load_config(config), tmp_path / "dp")
