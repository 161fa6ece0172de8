"""Data parallel for the self-supervised rule families: two gloo ranks against one process.

Under ``torchrun`` every rank takes its contiguous part of each global batch
(:func:`locallearn.distributed.shard_batch`), the rule fills ``.grad`` from that part alone and
:func:`~locallearn.distributed.average_grads` weights each rank's gradient by its share. For these
rules a part's loss uses the part's own images as negatives (and, for VICReg, its own batch
statistics), so two ranks equal one process that takes the same parts as separate sub-batches and
averages their gradients by size; that is what is checked here, for a layer-wise RHM rule (CLAPP
with synonym views, whose ``B`` is learnt by autograd), the layer-wise image rules (CLAPP++ with
both contexts, whose ``B`` gets its explicit gathered update; layer-wise InfoNCE, whose negatives
are the part's other images), SCFF (whose negative shift each part draws), LPL (whose variance
and decorrelation terms read the part's statistics) and the predictor-clusterer rule (whose
prototypes are seeded on rank 0's part and broadcast), through a few optimiser steps.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from locallearn import distributed as D
from locallearn.data.rhm import RHM
from locallearn.nets.clusterer import predictor_clusterer_net
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.nets.scff_cnn import scff_cnn
from locallearn.nets.vgg import vgg6, vgg11
from locallearn.rules.base import Batch
from locallearn.rules.image_infonce import LayerwiseInfoNCE
from locallearn.rules.image_local import LocalImageRule
from locallearn.rules.latent_stacked import LatentStacked, StackedOptions
from locallearn.rules.layerwise import Layerwise
from locallearn.rules.lpl import LPL
from locallearn.rules.scff import SCFF

GLOBAL_BATCH = 7  # parts of 4 and 3: uneven, weighted by the part sizes
STEPS = 3


def _rhm_setup():
    rhm = RHM(v=4, n_classes=2, m=2, s=2, L=3, seed_rules=0)
    data, _ = rhm.sample(GLOBAL_BATCH * STEPS, 0, seed_sample=0)
    g = torch.Generator().manual_seed(1)
    other = rhm.resample_synonyms(data.tokens, rhm.L, g)
    views = (rhm.one_hot(data.tokens), rhm.one_hot(other))
    net = hier_cnn(4, 2, 3, 12, 2, bias=True, seed=0)
    rule = Layerwise("clapp", "synonyms", "hinge", "next")
    rule.setup(net, views[0][:2])
    with torch.no_grad():  # B starts at zero: a random B exercises every term from step one
        for B in rule.B:
            B.copy_(torch.randn(B.shape, generator=g))
    return net, rule, views


def _image_setup(infonce: bool = False):
    g = torch.Generator().manual_seed(2)
    v1 = torch.rand(GLOBAL_BATCH * STEPS, 3, 16, 16, generator=g)
    views = (v1, (v1 + 0.3 * torch.rand(v1.shape, generator=g)).clamp(0, 1))
    net = vgg6(1 / 32, seed=3)
    if infonce:  # its projections start random (seeded), as in a run
        rule = LayerwiseInfoNCE("auto", 0.1, None, "block", seed=4)
        rule.setup(net, v1[:2])
        return net, rule, views
    rule = LocalImageRule("both", [2, 4, 1, 2, 1, 1], "hinge", "next")
    rule.setup(net, v1[:2])
    with torch.no_grad():
        for B in rule.parameters():
            B.copy_(torch.randn(B.shape, generator=g) * 3.0 / B.shape[-1])
    return net, rule, views


def _latent_setup():
    """The predictor-clusterer rule: prototypes are seeded on rank 0's part and broadcast."""
    rhm = RHM(v=4, n_classes=2, m=2, s=2, L=3, seed_rules=0)
    data, _ = rhm.sample(GLOBAL_BATCH * STEPS, 0, seed_sample=0)
    x = rhm.one_hot(data.tokens)
    net = predictor_clusterer_net(4, 2, 3, 12, 2, seed=0)
    # reseeding decides on each part (rank 0 wins under torchrun), so it is off for the comparison
    rule = LatentStacked(StackedOptions(schedule="joint", cluster_start=0.0, reseed=False))
    rule.setup(net, x[:2])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the predictors start at zero: a random one spreads the points
        for block in net.blocks[:-1]:
            block.predictor.copy_(torch.randn(block.predictor.shape, generator=g))
    return net, rule, (x, x)


def _scff_setup():
    """SCFF: each part draws its own negative shift from the batch's generator."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(GLOBAL_BATCH * STEPS, 3, 16, 16, generator=g)
    net = scff_cnn(1 / 16, seed=3)
    rule = SCFF()
    rule.setup(net, x[:2])
    return net, rule, (x, x)


def _lpl_setup():
    """LPL: each part's variances and covariances are its own, as VICReg's."""
    g = torch.Generator().manual_seed(2)
    v1 = torch.rand(GLOBAL_BATCH * STEPS, 3, 32, 32, generator=g)
    views = (v1, (v1 + 0.3 * torch.rand(v1.shape, generator=g)).clamp(0, 1))
    net = vgg11(1 / 16, seed=3)
    rule = LPL()
    rule.setup(net, v1[:2])
    return net, rule, views


SETUPS = {"scff": _scff_setup, "lpl": _lpl_setup, "layerwise-rhm": _rhm_setup,
          "clapp-image": _image_setup, "infonce-image": lambda: _image_setup(infonce=True),
          "latent-stacked": _latent_setup}


def _train(name: str, rank: int, world: int, emulate: int = 1) -> dict[str, torch.Tensor]:
    """``STEPS`` SGD steps. With ``world`` ranks each takes its part; on one rank ``emulate``
    parts are taken one after the other and their gradients weighted by size."""
    net, rule, views = SETUPS[name]()
    params = rule.trained_parameters(net)
    D.broadcast_params(params)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for step in range(STEPS):
        idx = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        gen = torch.Generator().manual_seed(step)  # the same draws on rank 0 and in one process
        batch = Batch(views[0][idx], None, (views[0][idx], views[1][idx]), gen)
        opt.zero_grad(set_to_none=True)
        if world > 1:
            part = D.shard_batch(batch, rank, world)
            rule.compute_grads(net, part)
            D.average_grads(params, part.x.shape[0])
        else:
            total = [torch.zeros_like(p) for p in params]
            for r in range(emulate):
                part = D.shard_batch(batch, r, emulate)
                for p in params:
                    p.grad = None
                rule.compute_grads(net, part)
                for t, p in zip(total, params):
                    t += p.grad * (part.x.shape[0] / GLOBAL_BATCH)
            for t, p in zip(total, params):
                p.grad = t
        opt.step()
    state = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    state.update({f"rule.{k}": v.detach().clone() for k, v in rule.state_dict().items()})
    return state


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert D.init_from_env("cpu") == (rank, world)
    try:
        for name in SETUPS:
            torch.save(_train(name, rank, world), Path(out) / f"{name}-rank{rank}.pt")
    finally:
        D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_for_the_ssl_rule_families(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: _train(name, 0, 1, emulate=2) for name in SETUPS}
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                           join=True, start_method=method)
    finally:
        torch.set_num_threads(before)
    for name in SETUPS:
        net, rule, _ = SETUPS[name]()
        start = {f"net.{k}": v for k, v in net.state_dict().items()}
        start.update({f"rule.{k}": v for k, v in rule.state_dict().items()})
        assert any(not torch.allclose(start[k], v, atol=1e-4) for k, v in single[name].items())
        if name not in ("scff", "lpl"):  # rules without parameters of their own
            assert any(k.startswith("rule.") for k in single[name])  # B is compared too
        for rank in range(2):
            state = torch.load(tmp_path / f"{name}-rank{rank}.pt")
            assert state.keys() == single[name].keys()
            for key, value in single[name].items():
                if key == "rule.step":  # steps counted: one process took every step in 2 parts
                    assert int(state[key]) == STEPS and int(value) == 2 * STEPS
                    continue
                assert torch.allclose(state[key], value, atol=1e-5, rtol=1e-4), (name, rank, key)
