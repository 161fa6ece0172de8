"""The field's local rules (SoftHebb, SCFF, LPL) pipelined across processes: bit-identical to one
process, with their per-block optimiser settings; SoftHebb refuses data parallelism."""

from __future__ import annotations

import pytest
import yaml
from image_folder import write_dataset
from test_pipeline import _assert_same_run, _moved, _start

from locallearn.experiments.runs import run
from locallearn.nets.hebb_cnn import softhebb_cnn
from locallearn.schema import load_config

CASES = {
    "softhebb": {
        "net": {"kind": "softhebb", "width_mult": 1 / 16, "bias": False},
        "rule": {"name": "softhebb"},
        "optim": {"name": "sgd", "momentum": 0.0, "block_lr": [0.08, 0.005, 0.01]},
    },
}


def _config(tmp_path, case: str) -> str:
    write_dataset(tmp_path / "images", {"train": 12, "test": 4})
    raw = {
        "data": {"name": "folder", "root": str(tmp_path / "images")},
        **CASES[case],
        "probe": {"epochs": 2, "grid": [8, 4, 2]},
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
    _start(2, config, ["parallel.stages=2", "parallel.split=[2,1]"], tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    if case == "softhebb":
        assert _moved(tmp_path / "one", {
            k: v for k, v in softhebb_cnn(1 / 16, seed=0).state_dict().items()
            if k.endswith("weight")})


def test_softhebb_refuses_data_parallel(tmp_path, monkeypatch):
    from locallearn import distributed

    config = _config(tmp_path, "softhebb")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(ValueError, match="data parallel .* does not fit rule.name=softhebb"):
        run(load_config(config), tmp_path / "dp")
