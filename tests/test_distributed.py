"""Data-parallel helpers: two gloo ranks on CPU reproduce one process with the same global batch."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from locallearn import distributed as D
from locallearn.data.rhm import RHM
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.rules.backprop import Backprop
from locallearn.rules.base import Batch

N_TRAIN = 36
GLOBAL_BATCH = 9  # shards of 5 and 4 samples: uneven, weighted by average_grads
EPOCHS = 2  # 8 steps; each is one all-reduce, slow when the cores are busy


def test_shard_parts_concatenate():
    x = torch.arange(11)
    parts = [D.shard(x, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat(parts), x)
    assert len(D.shard(torch.arange(1), 1, 2)) == 0
    with pytest.raises(ValueError, match="rank"):
        D.shard(x, 3, 3)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env("cpu") == (0, 1)
    assert D.is_main() and D.world_size() == 1
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    D.average_grads([p], 5)
    D.barrier()
    D.cleanup()
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    """A few SGD steps of backprop on a tiny RHM; the global batches are the same on every rank."""
    torch.manual_seed(0)
    rhm = RHM(v=4, n_classes=2, m=2, s=2, L=3, seed_rules=0)
    data, _ = rhm.sample(N_TRAIN, 0, seed_sample=0)
    x_all = rhm.one_hot(data.tokens)
    net = hier_cnn(4, 2, 3, 16, 2, bias=True, seed=0)
    rule = Backprop()
    params = rule.trained_parameters(net)
    D.broadcast_params(params)
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        perm = torch.randperm(N_TRAIN, generator=gen)
        for start in range(0, N_TRAIN, GLOBAL_BATCH):
            idx = perm[start : start + GLOBAL_BATCH]
            batch = D.shard_batch(Batch(x_all[idx], data.labels[idx], None, gen), rank, world)
            opt.zero_grad(set_to_none=True)
            metrics = rule.compute_grads(net, batch)
            D.average_grads(params, batch.x.shape[0])
            opt.step()
    n_local = int(D.shard(torch.arange(GLOBAL_BATCH), rank, world).numel())
    metrics = D.average_metrics(metrics, n_local)
    loss = F.cross_entropy(net(x_all), data.labels)
    return {**{k: v.detach().clone() for k, v in net.state_dict().items()}, "_loss": loss,
            "_last_batch_loss": torch.tensor(metrics["loss"])}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert D.init_from_env("cpu") == (rank, world)
    try:
        state = _train(rank, world)
        D.barrier()
        if D.is_main():
            torch.save(state, Path(out) / "rank0.pt")
        else:
            torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded machine more threads than free cores slow tiny ops 50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = 2
    single = _train(0, 1)  # first: it also imports what the optimiser imports lazily (seconds)
    # fork where available: the children share the imported modules (spawn re-imports torch)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world,
                       join=True, start_method=method)
    for rank in range(world):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in single.items():
            assert torch.allclose(state[key], value, atol=1e-6, rtol=1e-5), (rank, key)
    # the steps did move the weights: the comparison is not between two initial networks
    init = hier_cnn(4, 2, 3, 16, 2, bias=True, seed=0).state_dict()
    assert not torch.allclose(init["blocks.0.pre.weight"], single["blocks.0.pre.weight"])


def _decide_main(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init_from_env("cpu")
    try:  # the ranks' own flags differ; each takes rank 0's
        decided = [D.decide(rank == 0), D.decide(rank != 0)]
        (Path(out) / f"decide{rank}.json").write_text(json.dumps(decided))
    finally:
        D.cleanup()


def test_a_decision_is_rank_zeros_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.decide(True) is True and D.decide(False) is False  # one process: its own flag
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_decide_main, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method=method)
    for rank in range(2):
        assert json.loads((tmp_path / f"decide{rank}.json").read_text()) == [True, False]


def _frozen_peer_main(rank: int, world: int, port: int, out: str) -> None:
    import os
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init_from_env("cpu", timeout=2.0)
    try:
        if rank == 1:  # a frozen peer
            time.sleep(6)
            return
        t0 = time.perf_counter()
        try:
            D.barrier()
            result = {"raised": False}
        except RuntimeError as err:
            result = {"raised": True, "timeout": D.peer_timeout(err)}
        result["seconds"] = time.perf_counter() - t0
        (Path(out) / "frozen.json").write_text(json.dumps(result))
    finally:
        D.cleanup()


def test_a_frozen_peer_ends_the_wait_at_the_timeout(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_frozen_peer_main, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method=method)
    result = json.loads((tmp_path / "frozen.json").read_text())
    assert result["raised"] and result["timeout"] and result["seconds"] < 5, result
