"""Top-down signals that arrive late (``parallel.feedback_delay``): the one-process simulation,
its equality with pipelined runs, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from image_folder import write_dataset
from pipeline_runs import _assert_same_run, _start

from locallearn.cli import main
from locallearn.delay import DelayedSteps, enable_delay
from locallearn.experiments.runs import run
from locallearn.nets.hier_cnn import hier_cnn
from locallearn.nets.vgg import vgg6
from locallearn.rules.base import Batch
from locallearn.rules.feedback import DirectFeedback
from locallearn.rules.image_local import LocalImageRule
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
DFA_CONFIG = str(ROOT / "configs" / "rhm" / "dfa.yaml")
RHM_ARGS = ["data.v=8", "data.n_classes=4", "data.m=4", "data.L=3", "data.train_size=2P*",
            "data.test_size=40", "net.width=12", "batch_size=16", "progress=false", "epochs=2",
            "threads=1", "checkpoint_every=1"]


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def _image_pair(context: str, micro_batches: int = 1):
    """Two identical (network, rule) pairs of CLAPP++ with context from the top, and a batch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 32, 32, generator=gen)
    views = (x + 0.1 * torch.randn(x.shape, generator=gen), x.flip(-1))

    def build():
        net = vgg6(1 / 32, bias=True, seed=0)
        rule = LocalImageRule(context=context, micro_batches=micro_batches)
        rule.setup(net, x[:2])
        with torch.no_grad():
            for B in [*rule.B_same, *rule.B_top]:
                B.normal_(0, 0.1, generator=torch.Generator().manual_seed(B.numel()))
        return net, rule

    return build(), build(), Batch(x=x, views=views, generator=gen)


@pytest.mark.parametrize("context, micro_batches", [("top", 1), ("both", 1), ("both", 2)])
def test_delay_zero_steps_equal_the_rule_step(context, micro_batches):
    """The kept-input mechanism without delay does the arithmetic of the rule's own step."""
    (net_a, rule_a), (net_b, rule_b), batch = _image_pair(context, micro_batches)
    gen_state = batch.generator.get_state()
    metrics_a = rule_a.compute_grads(net_a, batch)
    batch.generator.set_state(gen_state)
    enable_delay(rule_b, 1)
    metrics_b = DelayedSteps(rule_b, len(net_b.blocks), 0).step(net_b, batch)
    params_a = list(net_a.parameters()) + list(rule_a.parameters())
    params_b = list(net_b.parameters()) + list(rule_b.parameters())
    for ga, gb in zip(_grads(params_a), _grads(params_b)):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    for key, value in metrics_a.items():
        assert metrics_b[key] == pytest.approx(value, rel=1e-5), key


def test_dfa_delay_zero_equals_its_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 8, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    nets = [hier_cnn(8, 2, 3, 12, 4, bias=False, seed=0) for _ in range(2)]
    rules = [DirectFeedback("dfa", seed=0) for _ in range(2)]
    for net, rule in zip(nets, rules):
        rule.setup(net, x[:2])
    rules[0].compute_grads(nets[0], Batch(x=x, y=y))
    enable_delay(rules[1], 1)
    DelayedSteps(rules[1], len(nets[1].blocks), 0).step(nets[1], Batch(x=x, y=y))
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a.grad, b.grad)


def test_a_delayed_batch_updates_on_its_kept_input():
    """With delay 2 the blocks learn nothing on the first two steps, then from the first
    batch's kept input and signal; the drain applies the last two; every step updates the
    read-out at once."""
    gen = torch.Generator().manual_seed(0)
    net = hier_cnn(8, 2, 3, 12, 4, bias=False, seed=0)
    rule = DirectFeedback("dfa", seed=0)
    rule.setup(net, torch.zeros(2, 8, 8))
    enable_delay(rule, 2)
    steps = DelayedSteps(rule, len(net.blocks), 2)
    batches = [Batch(x=torch.randn(16, 8, 8, generator=gen),
                     y=torch.randint(0, 4, (16,), generator=gen)) for _ in range(3)]
    blocks = list(net.blocks.parameters())
    for t, batch in enumerate(batches):
        net.zero_grad(set_to_none=True)
        steps.step(net, batch)
        assert net.readout.weight.grad is not None
        assert all(p.grad is None for p in blocks) == (t < 2), t
    # the update of step 2 is the delay-free update of batch 0 (the weights did not move)
    ref_net = hier_cnn(8, 2, 3, 12, 4, bias=False, seed=0)
    ref = DirectFeedback("dfa", seed=0)
    ref.setup(ref_net, torch.zeros(2, 8, 8))
    ref.compute_grads(ref_net, batches[0])
    for p, q in zip(blocks, ref_net.blocks.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert steps.pending() == 2
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        metrics, n = steps.drain(net)
        assert n == 16 and all(p.grad is not None for p in blocks)
        assert net.readout.weight.grad is None
    assert steps.pending() == 0


def test_dfa_pipeline_equals_its_one_process_simulation(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = [*RHM_ARGS, "parallel.feedback_delay=2"]
    run(load_config(DFA_CONFIG, args), tmp_path / "one")
    _start(3, DFA_CONFIG, [*args, "parallel.stages=3"], tmp_path / "three")
    _assert_same_run(tmp_path / "one", tmp_path / "three")
    # delay 2 is another run than delay 0 (its config says so, and its weights differ)
    run(load_config(DFA_CONFIG, RHM_ARGS), tmp_path / "zero")
    a = torch.load(tmp_path / "zero" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert b["step"] == a["step"] + 2 * 2  # D drain steps per epoch
    assert not torch.equal(a["net"]["blocks.0.pre.weight"], b["net"]["blocks.0.pre.weight"])


def test_top_context_pipeline_equals_its_one_process_simulation(tmp_path, monkeypatch):
    """CLAPP++both (context from the block itself and from the top), micro-batches, random
    negatives, split 1-3-2, delay 1 (less than the distance of stage 0 from the top: it
    waits for the signal)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_dataset(tmp_path / "images", {"train": 12, "test": 4})
    raw = {
        "data": {"name": "folder", "root": str(tmp_path / "images")},
        "net": {"kind": "vgg6", "width_mult": 1 / 32, "bias": True},
        "rule": {"name": "clapp-image",
                 "options": {"context": "both", "micro_batches": 2, "negative_image": "random"}},
        "optim": {"name": "adamw", "lr": 2e-3},
        "probe": {"epochs": 2},
        "epochs": 2, "batch_size": 8, "checkpoint_every": 1, "progress": False, "threads": 1,
        "parallel": {"feedback_delay": 1},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    run(load_config(config), tmp_path / "one")
    _start(3, str(config), ["parallel.stages=3", "parallel.split=[1,3,2]"], tmp_path / "three")
    _assert_same_run(tmp_path / "one", tmp_path / "three", close=("loss", "train_loss"))
    init = vgg6(1 / 32, bias=True, seed=0).state_dict()
    net = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["net"]
    assert all(not torch.equal(init[k], net[k]) for k in init if k.startswith("blocks."))


@pytest.mark.parametrize("args, message", [
    (["rule.name=backprop", "parallel.feedback_delay=1"],
     "parallel.feedback_delay=1 does not apply: rule backprop sends its blocks no signal"),
    (["parallel.feedback_delay=-1"], "parallel.feedback_delay=-1 is invalid: must be a number"),
    (["parallel.feedback_delay=1", "align_every=1"],
     "parallel.feedback_delay=1 trains every block on late signals"),
])
def test_bad_delays_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["run", DFA_CONFIG, "--out", str(tmp_path / "r"), *RHM_ARGS, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err
    assert len(err.splitlines()) == 1


def test_a_run_does_not_resume_under_another_delay(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["run", DFA_CONFIG, "--out", out, *RHM_ARGS]) == 0
    capsys.readouterr()
    code = main(["run", DFA_CONFIG, "--out", out, *RHM_ARGS, "parallel.feedback_delay=1"])
    assert code == 2 and "holds a run of another config" in capsys.readouterr().err
    # the other parallel keys may still change: the same run, now with a longer time-out
    assert main(["run", DFA_CONFIG, "--out", out, *RHM_ARGS, "parallel.timeout=900"]) == 0
