"""Layer-parallel training (``parallel.stages``): pipelined runs equal one-process runs bit for
bit on CPU, the split and the speed-up model, refusals, and resume of a killed pipelined run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from image_folder import write_dataset
from pipeline_runs import _assert_same_run, _free_port, _start

from locallearn.cli import main
from locallearn.data.rhm import RHM
from locallearn.data.rhm_views import block_view_pairs, two_views
from locallearn.experiments.runs import run
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.nets.vgg import vgg6
from locallearn.parallel import messages
from locallearn.parallel.checks import check_pipeline
from locallearn.parallel.split import (
    balanced_split,
    check_split,
    measure_data_seconds,
    predicted_speedup,
    stage_times,
    with_data,
)
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.rules.image_infonce import LayerwiseInfoNCE
from locallearn.rules.image_local import FFRule, LocalImageRule
from locallearn.rules.layerwise import Layerwise
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
RHM_CONFIG = str(ROOT / "configs" / "rhm" / "clapp-per-block.yaml")
RHM_ARGS = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=3", "data.train_size=2P*",
            "data.test_size=40", "net.width=12", "batch_size=16", "progress=false", "epochs=2",
            "threads=1", "rule.negatives=random", "checkpoint_every=1"]


# ---------------------------------------------------------------------------------------------
# the rule interface, in one process


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else None for p in params]


def _rhm_case(view: str, loss: str):
    rhm = RHM(v=6, n_classes=3, m=3, s=2, L=3, seed_rules=0)
    data, _ = rhm.sample(24, 0, seed_sample=0)
    tokens = data.tokens[:12]
    x = rhm.one_hot(tokens)
    g = torch.Generator().manual_seed(3)
    views = block_views = None
    if view == "synonyms-per-block":
        block_views = block_view_pairs(rhm, tokens, g)
    elif view != "siblings":
        views = two_views(rhm, tokens, view, g)

    def build():
        net = hier_cnn(6, 2, 3, 10, 3, bias=False, seed=0)
        rule = Layerwise(loss, view, negatives="random", s=2)
        rule.setup(net, x)
        with torch.no_grad():
            for b in rule.B:
                b.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
        return net, rule

    return build, lambda: Batch(x, None, views, torch.Generator().manual_seed(7), block_views)


def _image_case(rule_cls, **options):
    torch.manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    views = (images + 0.1 * torch.randn_like(images), images.flip(3))

    def build():
        net = vgg6(1 / 32, bias=True, seed=0).to(memory_format=torch.channels_last)
        # random negatives, except for InfoNCE (its negatives are the whole batch)
        drawn = {} if rule_cls is LayerwiseInfoNCE else {"negatives": "random"}
        rule = rule_cls(pool="global", **drawn, **options)
        rule.setup(net, images)
        with torch.no_grad():
            for b in rule.parameters():
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        return net, rule

    return build, lambda: Batch(images, None, views, torch.Generator().manual_seed(7))


CASES = {
    "clapp-per-block": lambda: _rhm_case("synonyms-per-block", "clapp"),
    "clapp-siblings": lambda: _rhm_case("siblings", "clapp"),
    "infonce-synonyms": lambda: _rhm_case("synonyms", "infonce"),
    "vicreg-mask": lambda: _rhm_case("mask", "vicreg"),
    "clapp++-micro": lambda: _image_case(LocalImageRule, micro_batches=2),
    "ff-summed": lambda: _image_case(FFRule, step="summed"),
    "infonce-image": lambda: _image_case(LayerwiseInfoNCE, step="block"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cuts", [[1], [1, 2]])
def test_blocks_grads_by_stage_equal_compute_grads(case, cuts):
    """Blocks trained in stages from pickled carries get the gradients of one whole step."""
    build, batch = CASES[case]()
    net, rule = build()
    metrics = rule.compute_grads(net, batch())
    expect = _grads(rule.trained_parameters(net))
    net2, rule2 = build()
    carry = rule2.start_carry(net2, batch())
    bounds = [0, *cuts, len(net2.blocks)]
    got_metrics: dict[str, float] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        sent: list[torch.Tensor] = []
        meta = pickle.loads(pickle.dumps(messages._pack(carry, sent)))  # as sent
        carry = messages._unpack(meta, [t.clone() for t in sent])
        if case.startswith(("clapp++", "ff")) and a > 0:  # maps stay channels-last
            assert carry["parts"][0].is_contiguous(memory_format=torch.channels_last)
            assert not carry["parts"][0].is_contiguous()
        part, carry = rule2.blocks_grads(net2, carry, a, b)
        got_metrics.update(part)
    got = _grads(rule2.trained_parameters(net2))
    assert all(e is not None for e in expect[:1])
    for e, g in zip(expect, got):
        assert (e is None and g is None) or torch.equal(e, g)
    assert got_metrics == metrics  # per-block losses and the running total, exactly
    assert any(e is not None and e.abs().sum() > 0 for e in expect)


# ---------------------------------------------------------------------------------------------
# split, model, refusals


def test_balanced_split_minimises_the_slowest_stage():
    times = [4.0, 1.0, 1.0, 1.0, 1.0, 4.0]
    assert balanced_split(times, 1) == [6]
    assert balanced_split(times, 2) == [3, 3]
    assert balanced_split(times, 3) == [1, 4, 1]
    assert balanced_split(times, 6) == [1] * 6
    assert stage_times(times, [1, 4, 1]) == [4.0, 4.0, 4.0]
    assert predicted_speedup(times, [1, 4, 1]) == pytest.approx(3.0)
    assert predicted_speedup(times, [3, 3]) == pytest.approx(2.0)
    check_split([2, 4], 6)
    with pytest.raises(ValueError, match=r"adds up to 5 blocks but the network has 6"):
        check_split([2, 3], 6)
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3"):
        balanced_split([1.0, 1.0], 3)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["backprop"], "rule backprop sends the error backward through every block"),
        (["dfa"], "rule dfa sends the output error of the top block to every block"),
        (["token-last"], "rule token-prediction backpropagates its token loss through every"),
        (["parallel.stages=4"], "parallel.stages=4 is more than the network's 3 blocks"),
        (["parallel.split=[1,1]"], r"parallel.split=\[1, 1\] adds up to 2 blocks"),
        (["parallel.split=[3]"], r"lists 1 stages but parallel.stages=2"),
        (["align_every=1"], "align_every=1 needs every block in one process"),
        ([], r"parallel.stages=2 needs 2 processes, one per stage, or a multiple of 2"),
    ],
)
def test_bad_pipelines_are_one_line_errors_with_exit_2(tmp_path, capsys, monkeypatch,
                                                       overrides, match):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config, data = RHM_CONFIG, RHM_ARGS
    refused = ("backprop", "dfa", "token-last")
    if overrides and overrides[0] in refused:  # the presets of refused rules
        config = str(ROOT / "configs" / "rhm" / f"{overrides[0]}.yaml")
        data, overrides = [a for a in RHM_ARGS if not a.startswith("rule.")], []
    args = ["run", config, "--out", str(tmp_path / "x"), *data, "parallel.stages=2", *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("locallearn: error: ")
    assert __import__("re").search(match, err), err


def test_a_refused_rule_fails_before_the_data_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    missing = tmp_path / "no-such-folder"
    args = ["run", str(ROOT / "configs" / "images" / "clapp++dfb-cpu.yaml"), "--out",
            str(tmp_path / "x"), f"data.root={missing}", "parallel.stages=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "context=top learns from the top block's output" in err and str(missing) not in err


def test_a_probe_inside_an_epoch_is_refused():
    cfg = load_config(ROOT / "configs" / "images" / "clapp++-cpu.yaml",
                      ["parallel.stages=2", "probe_every=0.5"])
    with pytest.raises(ValueError, match=r"probe_every=0.5 would probe inside an epoch.*"
                                         r"whole epochs \(0, 1, 2, ...\)"):
        check_pipeline(cfg, LocalImageRule(context="same"), 6, 2)
    check_pipeline(load_config(ROOT / "configs" / "images" / "clapp++-cpu.yaml",
                               ["parallel.stages=2", "probe_every=2"]),
                   LocalImageRule(context="same"), 6, 2)


def test_a_time_budget_is_refused_in_a_pipeline():
    cfg = load_config(ROOT / "configs" / "images" / "clapp++-cpu.yaml",
                      ["parallel.stages=2", "probe_every=1", "max_seconds=3600"])
    with pytest.raises(ValueError, match="max_seconds=3600 does not run pipelined"):
        check_pipeline(cfg, LocalImageRule(context="same"), 6, 2)


def test_streamed_data_is_refused_before_it_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    missing = tmp_path / "no-such-folder"
    args = ["run", str(ROOT / "configs" / "images" / "clapp++-cpu.yaml"), "--out",
            str(tmp_path / "x"), "data.name=folder", "data.streaming=true", "probe_every=1",
            f"data.root={missing}", "parallel.stages=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "parallel.stages > 1 cannot stream its data" in err and str(missing) not in err


def test_top_block_context_is_refused():
    cfg = load_config(RHM_CONFIG, [*RHM_ARGS, "parallel.stages=2"])
    for context in ("top", "both"):
        rule = LocalImageRule(context=context)
        with pytest.raises(ValueError, match=f"context={context} learns from the top block"):
            check_pipeline(cfg, rule, 6, 2)
    from locallearn.rules.image_bp import BPSSL

    with pytest.raises(ValueError, match="rule bp-ssl backpropagates its top-block loss"):
        check_pipeline(cfg, BPSSL(), 6, 2)
    check_pipeline(cfg, LocalImageRule(context="same"), 6, 2)
    check_pipeline(cfg, build_rule(cfg.rule, 0), 3, 2)


# ---------------------------------------------------------------------------------------------
# pipelined runs on gloo processes


def _moved(run_dir: Path, init: dict[str, torch.Tensor]) -> bool:
    net = torch.load(run_dir / "checkpoint.pt", weights_only=False)["net"]
    return all(not torch.equal(init[k], net[k]) for k in init if k.startswith("blocks."))


def test_two_stages_match_one_process_rhm(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run(load_config(RHM_CONFIG, RHM_ARGS), tmp_path / "one")
    _start(2, RHM_CONFIG, [*RHM_ARGS, "parallel.stages=2"], tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["parallel"]["stages"] == 2 and sum(summary["parallel"]["split"]) == 3
    info = json.loads((tmp_path / "two" / "pipeline.json").read_text())
    assert len(info["block_seconds"]) == 3 and info["split"] == summary["parallel"]["split"]
    epochs = info["epochs"]  # how each stage spent every epoch: busy seconds, at most the wall
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(len(e["busy_seconds"]) == 2 and 0 < min(e["busy_seconds"])
               and max(e["busy_seconds"]) <= e["seconds"] for e in epochs)
    init = hier_cnn(8, 2, 3, 12, 4, bias=False, seed=0).state_dict()
    assert _moved(tmp_path / "one", init)  # every block learned: not a comparison of inits


def test_three_stages_match_one_process_images(tmp_path, monkeypatch):
    """CLAPP++ (same-block context), micro-batches and random negatives, split 2-1-3, with
    the per-step warm-up cosine schedule, a learning curve probed between evaluations, and
    bf16 autocast."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_dataset(tmp_path / "images", {"train": 12, "test": 4})
    raw = {
        "data": {"name": "folder", "root": str(tmp_path / "images")},
        "net": {"kind": "vgg6", "width_mult": 1 / 32, "bias": True},
        "rule": {"name": "clapp-image", "negatives": "random",
                 "options": {"context": "same", "micro_batches": 2}},
        "optim": {"name": "adamw", "lr": 2e-3, "schedule": "cosine", "warmup_epochs": 0.5},
        "probe": {"epochs": 2, "curve_train": 8, "curve_test": 4, "curve_k": 3},
        "epochs": 3, "batch_size": 8, "checkpoint_every": 1, "progress": False, "threads": 1,
        "eval_every": 2, "probe_every": 1, "precision": "bf16",
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    # the curve's probe reports a fingerprint of the network it is given (the forked stages
    # inherit this): a k-NN accuracy on these easy images would not see stale blocks
    from locallearn.experiments.image_task import ImageTask

    def fingerprint(self, net):
        return {"probe_accuracy": float(sum(p.detach().double().sum() for p in net.parameters()))}

    monkeypatch.setattr(ImageTask, "curve_probe", fingerprint)
    run(load_config(config), tmp_path / "one")
    _start(3, str(config), ["parallel.stages=3", "parallel.split=[2,1,3]"], tmp_path / "three")
    _assert_same_run(tmp_path / "one", tmp_path / "three")
    assert json.loads((tmp_path / "three" / "probe.json").read_text())["accuracy"] is not None
    init = vgg6(1 / 32, bias=True, seed=0).state_dict()
    assert _moved(tmp_path / "one", init)


def test_killed_pipeline_resumes_exactly(tmp_path, monkeypatch):
    """Kill both stages after a checkpoint; resume with another split, and in one process."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = [*RHM_ARGS, "epochs=6"]
    run(load_config(RHM_CONFIG, args), tmp_path / "whole")
    ctx = _start(2, RHM_CONFIG, [*args, "parallel.stages=2", "parallel.split=[1,2]"],
                 tmp_path / "cut", join=False)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    epoch = 0
    while time.time() < deadline and epoch < 2:
        time.sleep(0.05)
        if ckpt.exists():
            epoch = torch.load(ckpt, weights_only=False)["epoch"]
    for p in ctx.processes:
        p.kill()
    for p in ctx.processes:
        p.join()
    killed = torch.load(ckpt, weights_only=False)["epoch"]
    assert 2 <= killed < 6 and not (tmp_path / "cut" / "summary.json").exists()
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-one")
    _start(2, RHM_CONFIG, [*args, "parallel.stages=2", "parallel.split=[2,1]"], tmp_path / "cut")
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")
    run(load_config(RHM_CONFIG, args), tmp_path / "cut-one")  # the same run, in one process
    _assert_same_run(tmp_path / "whole", tmp_path / "cut-one")


def test_torchrun_two_stages_equal_one_process(tmp_path, monkeypatch):
    """The command of the docs: ``torchrun --nproc_per_node=2 -m locallearn run ...``."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "locallearn", "run", RHM_CONFIG,
           "--out", str(tmp_path / "two"), *RHM_ARGS, "parallel.stages=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "locallearn: pipeline: 2 stages, split [" in done.stderr
    run(load_config(RHM_CONFIG, RHM_ARGS), tmp_path / "one")
    _assert_same_run(tmp_path / "one", tmp_path / "two")


LATENT_CONFIG = str(ROOT / "configs" / "rhm" / "latent-prediction.yaml")


def test_latent_prediction_pipelines_exactly(tmp_path, monkeypatch):
    """The stacked latent rule, one module per stage: the modules learn one after the other,
    each stage's module places and reseeds its prototypes from the run's generator (its state
    travels with the carry), and the next epochs' permutations follow those draws. A stage
    with only the untrained top block is refused."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=3", "data.train_size=2P*",
            "data.test_size=40", "batch_size=16", "progress=false", "epochs=6", "threads=1",
            "checkpoint_every=1"]
    run(load_config(LATENT_CONFIG, args), tmp_path / "one")
    _start(2, LATENT_CONFIG, [*args, "parallel.stages=2", "parallel.split=[1,2]"],
           tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    with pytest.raises(Exception, match="nothing to train"):
        _start(3, LATENT_CONFIG, [*args, "parallel.stages=3", "parallel.split=[1,1,1]"],
               tmp_path / "three")
    ckpt = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert bool(ckpt["rule"]["placed"].all())  # both modules clustered, on their own stages
    with pytest.raises(ValueError, match="schedule=joint trains every module at every step"):
        check_pipeline(load_config(LATENT_CONFIG, [*args, "rule.options.schedule=joint",
                                                   "parallel.stages=2"]),
                       build_rule(load_config(LATENT_CONFIG, [*args, "rule.options.schedule=joint"]
                                              ).rule, 0), 3, 2)


def test_replicas_of_stages_equal_data_parallel(tmp_path, monkeypatch):
    """Two replicas of two stages (4 processes) equal data parallel on 2 ranks, which equals
    one process taking the two parts as sub-batches: the parts' gradients are averaged among
    each stage's replicas. Random negatives, drawn by each replica for its part."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _start(2, RHM_CONFIG, RHM_ARGS, tmp_path / "data-parallel")
    _start(4, RHM_CONFIG, [*RHM_ARGS, "parallel.stages=2", "parallel.split=[1,2]"],
           tmp_path / "stages-x-replicas")
    _assert_same_run(tmp_path / "data-parallel", tmp_path / "stages-x-replicas")
    cfg = load_config(RHM_CONFIG, [*RHM_ARGS, "parallel.stages=2"])
    with pytest.raises(ValueError, match="needs 2 processes, one per stage, or a multiple of 2"):
        check_pipeline(cfg, build_rule(cfg.rule, 0), 3, 3)


def test_torchrun_agents_on_two_nodes_run_replicas_of_stages(tmp_path, monkeypatch):
    """Two torchrun agents (nodes) meeting by rendezvous, two processes each: two stages of
    two replicas, equal to data parallel on 2 ranks."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    port = _free_port()
    cmd = [torchrun, "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", "-m", "locallearn", "run",
           RHM_CONFIG, "--out", str(tmp_path / "nodes"), *RHM_ARGS, "parallel.stages=2",
           "parallel.split=[1,2]"]
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outputs = [a.communicate(timeout=300) for a in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-2000:]
    _start(2, RHM_CONFIG, RHM_ARGS, tmp_path / "data-parallel")
    _assert_same_run(tmp_path / "data-parallel", tmp_path / "nodes")


def test_latent_prediction_cnn_pipelines_exactly(tmp_path, monkeypatch):
    """The latent rule on the hierarchical CNN: each block predicts the codes of the level
    below, which travel with the carry."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = str(ROOT / "configs" / "rhm" / "latent-prediction-cnn.yaml")
    args = [a for a in RHM_ARGS if not a.startswith("rule.")]
    run(load_config(config, args), tmp_path / "one")
    _start(3, config, [*args, "parallel.stages=3"], tmp_path / "three")
    _assert_same_run(tmp_path / "one", tmp_path / "three")
    init = hier_cnn(8, 2, 3, 12, 4, bias=False, seed=0).state_dict()
    net = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["net"]
    assert not torch.equal(init["blocks.0.pre.weight"], net["blocks.0.pre.weight"])


def test_stage_zero_makes_the_batches():
    """The model counts stage 0's time to make a batch with block 1's; measuring it leaves the
    run's random numbers alone."""
    assert with_data([1.0, 2.0, 3.0], 0.5) == [1.5, 2.0, 3.0]
    assert balanced_split(with_data([1.0, 1.0, 1.0, 1.0], 2.0), 2) == [1, 3]
    cfg = load_config(RHM_CONFIG, RHM_ARGS)
    from locallearn.experiments.tasks import build_task

    task = build_task(cfg)
    net = task.build_net()
    rule = build_rule(cfg.rule, 0, **task.rule_info)
    rule.setup(net, task.sample_input())
    before = torch.get_rng_state()
    seconds = measure_data_seconds(rule, net, task, 16, 0, torch.device("cpu"))
    assert seconds > 0 and torch.equal(before, torch.get_rng_state())


def test_a_pipeline_mark_lives_with_its_process_group(monkeypatch):
    """A pipeline marks its process group (its ranks are stages: a rule broadcasts nothing
    among them); a group made later in the same process, e.g. by a data-parallel run after a
    refused pipeline, is not marked."""
    import torch.distributed as dist

    from locallearn import distributed as D

    D.mark_pipelined()  # no group yet: as a pipeline refused before its group starts
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert D.data_parallel()
        D.mark_pipelined()
        assert not D.data_parallel()
    finally:
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert D.data_parallel()
    finally:
        dist.destroy_process_group()
