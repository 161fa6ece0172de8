"""SoftHebb (``rule.name=softhebb``) against its authors' reference code, and its own contracts.

``tests/data/softhebb_golden.json`` holds one training step of the reference single-file code run
in float64 (``tests/data/make_softhebb_golden.py`` says how). Here the preset
``configs/images/softhebb.yaml`` (its network, rule and optimiser, as a run builds them) takes
the same step from the same weights and input: the same per-neuron rates, the same update in
``.grad`` (sign and rate carried by the rule), the same weights after a stock SGD step, the same
batch-norm statistics and the same top-block output in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden import check_stats as _check

from locallearn.nets.hebb_cnn import softhebb_cnn
from locallearn.optim import build_optimizer
from locallearn.rules import build_rule
from locallearn.rules.base import Batch
from locallearn.rules.softhebb import SoftHebb, softhebb_update
from locallearn.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "softhebb_golden.json").read_text())
PRESET = ROOT / "configs" / "images" / "softhebb.yaml"




def _golden_setup():
    cfg = load_config(PRESET)
    net = softhebb_cnn(cfg.net.width_mult, seed=0).double()
    g = torch.Generator().manual_seed(GOLDEN["init_seed"])
    with torch.no_grad():
        for block in net.blocks:
            w = block.pre.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64) * 25
                    / w[0].numel() ** 0.5)
    x = torch.rand(GOLDEN["n_images"], 3, GOLDEN["side"], GOLDEN["side"],
                   generator=torch.Generator().manual_seed(GOLDEN["input_seed"]),
                   dtype=torch.float64)
    rule = build_rule(cfg.rule, 0)
    rule.setup(net, x[:2])
    return cfg, net, rule, x


def test_preset_step_matches_the_reference_code():
    cfg, net, rule, x = _golden_setup()
    for block, ref in zip(net.blocks, GOLDEN["blocks"]):
        _check(ref["initial_weight"], block.pre.weight, "initial weights")
    rates = [rule.neuron_rates(b.pre.weight) for b in net.blocks]
    params = rule.trained_parameters(net)
    blocks = [list(b.parameters()) for b in net.blocks]
    opt, _ = build_optimizer(cfg, params, 1, blocks)
    net.train()
    opt.zero_grad()
    rule.compute_grads(net, Batch(x))
    for k, (block, ref) in enumerate(zip(net.blocks, GOLDEN["blocks"])):
        rate = cfg.optim.block_lr[k] * rates[k]
        _check(ref["rates"], rate,
               f"block {k + 1} rates")
        _check(ref["update"], -block.pre.weight.grad / rates[k].view(-1, 1, 1, 1),
               f"block {k + 1} update")
    opt.step()
    for k, (block, ref) in enumerate(zip(net.blocks, GOLDEN["blocks"])):
        _check(ref["weight_after"], block.pre.weight, f"block {k + 1} weights after the step")
        _check(ref["running_mean"], block.pre.norm.running_mean, f"block {k + 1} running mean")
        _check(ref["running_var"], block.pre.norm.running_var, f"block {k + 1} running var")
    net.eval()
    with torch.no_grad():
        _check(GOLDEN["top_eval"], net.encode(x), "top block in eval mode")


def test_update_is_the_explicit_soft_wta_instar_rule():
    """The update written out sample by sample, location by location (small sizes)."""
    g = torch.Generator().manual_seed(0)
    xp = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    u = torch.nn.functional.conv2d(xp, w)
    t = 0.7
    dw = torch.zeros_like(w)
    for n in range(2):
        for i in range(u.shape[2]):
            for j in range(u.shape[3]):
                col = u[n, :, i, j]
                y = torch.softmax(t * col, 0)
                y = torch.where(torch.arange(4) == col.argmax(), y, -y)
                patch = xp[n, :, i:i + 3, j:j + 3]
                for k in range(4):
                    dw[k] += y[k] * patch - y[k] * col[k] * w[k]
    dw /= dw.abs().max() + 1e-30
    assert torch.allclose(softhebb_update(xp, u, w, t), dw, rtol=1e-12, atol=1e-14)


def test_rates_vanish_at_unit_norm():
    rule = SoftHebb([1.0], 0.5)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    w = w / torch.linalg.vector_norm(w.reshape(3, -1), dim=1).view(-1, 1, 1, 1)
    w[1] *= 4.0
    rates = rule.neuron_rates(w)
    assert rates[0] == pytest.approx(1e-5, rel=1e-3) and rates[2] == pytest.approx(1e-5, rel=1e-3)
    assert rates[1] == pytest.approx(3.0 ** 0.5)


def test_block_ranges_equal_one_pass_and_frozen_blocks_do_not_learn():
    _, net, rule, x = _golden_setup()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rule.compute_grads(net, Batch(x))
    whole = [b.pre.weight.grad.clone() for b in net.blocks]
    net.load_state_dict(state)
    for b in net.blocks:
        b.pre.weight.grad = None
    carry = rule.start_carry(net, Batch(x))
    _, carry = rule.blocks_grads(net, carry, 0, 1)
    _, carry = rule.blocks_grads(net, carry, 1, 3)
    assert all(torch.equal(a, b.pre.weight.grad) for a, b in zip(whole, net.blocks))
    net.load_state_dict(state)
    for b in net.blocks:
        b.pre.weight.grad = None
    carry = rule.frozen_carry(net, rule.start_carry(net, Batch(x)), 0, 2)
    rule.blocks_grads(net, carry, 2, 3)
    assert net.blocks[0].pre.weight.grad is None and net.blocks[1].pre.weight.grad is None
    assert torch.equal(net.blocks[2].pre.weight.grad, whole[2])


def test_not_plastic_leaves_weights_and_gathers_statistics():
    _, net, _, x = _golden_setup()
    rule = SoftHebb(plastic=False)
    rule.setup(net, x[:2])
    rule.compute_grads(net, Batch(x))
    assert all(b.pre.weight.grad is None for b in net.blocks)
    assert float(net.blocks[0].pre.norm.running_mean.abs().sum()) > 0


@pytest.mark.parametrize("override, words", [
    (["rule.options.t_invert=[1,0]"], "t_invert"),
    (["rule.options.t_invert=[1,0.5]"], "one per block"),
    (["net.bias=true"], "net.bias=true is invalid"),
    (["optim.block_lr=[0.1,0.1]"], "one per block"),
    (["rule.options.lr_power=-1"], "lr_power"),
])
def test_bad_settings_are_one_line_errors(override, words, tmp_path):
    from locallearn.experiments.tasks import build_task
    from locallearn.train import Trainer

    def make():
        cfg = load_config(PRESET, override + ["data.name=folder", f"data.root={tmp_path}"])
        net = softhebb_cnn(0.05, bias=cfg.net.bias)
        rule = build_rule(cfg.rule, 0)
        rule.setup(net, torch.zeros(2, 3, 32, 32))
        build_optimizer(cfg, rule.trained_parameters(net), 1,
                        [list(b.parameters()) for b in net.blocks])
    del build_task, Trainer
    with pytest.raises(ValueError, match=words) as err:
        make()
    assert "\n" not in str(err.value)
