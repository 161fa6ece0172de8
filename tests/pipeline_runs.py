"""Helpers of the tests that run pipelines on gloo processes and compare run folders."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from locallearn.experiments.runs import run
from locallearn.schema import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_main(rank: int, world: int, port: int, config: str, args: list[str], out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(load_config(config, args), out)


def _start(world: int, config: str, args: list[str], out: Path, join: bool = True):
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.start_processes(_stage_main, args=(world, _free_port(), config, args, str(out)),
                              nprocs=world, join=join, start_method=method)


def _assert_same_run(a: Path, b: Path, close: tuple[str, ...] = ()) -> None:
    """Two run directories hold the same parameters, optimiser state, metrics and summary
    (the metrics named in ``close`` to 1e-12: sums taken in another order)."""
    ca = torch.load(a / "checkpoint.pt", weights_only=False)
    cb = torch.load(b / "checkpoint.pt", weights_only=False)
    for part in ("net", "rule"):
        assert ca[part].keys() == cb[part].keys()
        for key in ca[part]:
            assert torch.equal(ca[part][key], cb[part][key]), (part, key)
    sa, sb = ca["optimizer"], cb["optimizer"]
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)

    def rows(path: Path) -> list[dict]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        timings = ("seconds", "curve_seconds")
        return [{k: v for k, v in json.loads(r).items() if k not in timings} for r in lines]

    ra, rb = rows(a), rows(b)
    for row_a, row_b in zip(ra, rb):
        for key in close:
            if key in row_a:
                assert math.isclose(row_a.pop(key), row_b.pop(key), rel_tol=1e-12), key
    assert ra == rb
    ja = json.loads((a / "summary.json").read_text())
    jb = json.loads((b / "summary.json").read_text())
    for key in ("test_accuracy", "train_loss", "probe_accuracy", "epochs"):
        if key in close and ja.get(key) is not None:
            assert math.isclose(ja[key], jb[key], rel_tol=1e-12), key
        else:
            assert ja.get(key) == jb.get(key), key
