"""The SCFF rule and network against reference numbers from the authors' public code, and
against the rule's loss written out plainly.

``tests/data/scff_golden.json`` holds values from running the public code (commit a6fc0f8) in
float64 on seeded layers and a seeded batch with fixed negative shifts; its ``about`` field says
exactly how (``tests/data/make_scff_golden.py`` made it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from golden import check_stats

from locallearn.config import from_dict
from locallearn.nets.base import BlockNet
from locallearn.nets.scff_cnn import scff_cnn
from locallearn.nets.vgg import vgg6
from locallearn.rules import build_rule, rule_class
from locallearn.rules.base import Batch
from locallearn.rules.scff import SCFF, SCFFOptions, draw_shift

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "scff_golden.json").read_text())
REL = 1e-9


def _check(stats: dict, tensor: torch.Tensor, what: str) -> None:
    check_stats(stats, tensor, what, rel=REL, value_abs=1e-14)


def _golden_net() -> BlockNet:
    """The golden file's layers: this library's network with the weights it describes."""
    net = scff_cnn(GOLDEN["width_mult"], seed=0).double()
    g = torch.Generator().manual_seed(GOLDEN["weight_seed"])
    with torch.no_grad():
        for block, scale in zip(net.blocks, GOLDEN["scales"]):
            w, b = block.pre.conv.weight, block.pre.conv.bias
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5 * scale
            w.copy_((torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) * 2 - 1)
                    / fan_in ** 0.5)
    return net


def _golden_batch() -> torch.Tensor:
    n, side = GOLDEN["n_images"], GOLDEN["side"]
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def _rule(concat: list[bool], frozen_concat: bool = True) -> SCFF:
    return SCFF(SCFFOptions(concat=concat, frozen_concat=frozen_concat))


def _carry(rule: SCFF, net: BlockNet, shifts: list[int | None]) -> dict:
    carry = rule.start_carry(net, Batch(_golden_batch(), generator=torch.Generator()))
    carry["shifts"] = [1 if s is None else s for s in shifts]
    return carry


def _clear(net: BlockNet) -> None:
    for p in net.parameters():
        p.grad = None


def test_defaults_are_the_published_configuration():
    o = SCFFOptions()
    assert o.threshold_pos == GOLDEN["thresholds_pos"]
    assert o.threshold_neg == GOLDEN["thresholds_neg"]
    assert o.lam == GOLDEN["lambdas"]
    assert o.concat == [True, False, True] and o.frozen_concat


@pytest.mark.parametrize("run", ["all_111", "all_101", "all_110"])
def test_every_block_matches_the_reference_code(run):
    ref = GOLDEN["runs"][run]
    net = _golden_net()
    rule = _rule([bool(c) for c in ref["concat"]])
    rule.setup(net, _golden_batch())
    metrics, _ = rule.blocks_grads(net, _carry(rule, net, ref["shifts"]), 0, 3)
    losses = [metrics[f"loss_block{k}"] for k in (1, 2, 3)]
    assert losses == pytest.approx(ref["losses"], rel=REL)
    assert metrics["loss"] == pytest.approx(sum(ref["losses"]), rel=REL)
    for k, block in enumerate(net.blocks):
        grads = ref["grads"][f"layer{k + 1}"]
        _check(grads["weight"], block.pre.conv.weight.grad, f"{run} weight {k + 1}")
        _check(grads["bias"], block.pre.conv.bias.grad, f"{run} bias {k + 1}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_greedy_stages_match_the_published_stages(stage):
    # the default flags (1, 0, 1) with the frozen blocks below pairing: each published stage
    ref = GOLDEN["runs"][f"stage{stage}"]
    net = _golden_net()
    rule = SCFF()
    level = stage - 1
    shifts = list(ref["shifts"]) + [None] * (3 - len(ref["shifts"]))
    carry = rule.frozen_carry(net, _carry(rule, net, shifts), 0, level)
    assert all(p.grad is None for p in net.parameters())
    metrics, _ = rule.blocks_grads(net, carry, level, stage)
    assert metrics[f"loss_block{stage}"] == pytest.approx(ref["losses"][0], rel=REL)
    grads = ref["grads"][f"layer{stage}"]
    conv = net.blocks[level].pre.conv
    _check(grads["weight"], conv.weight.grad, f"stage {stage} weight")
    _check(grads["bias"], conv.bias.grad, f"stage {stage} bias")
    assert all(p.grad is None for b in net.blocks[:level] for p in b.parameters())


def test_frozen_blocks_following_their_flags_give_other_numbers():
    # break-on-purpose: block 2 run unpaired under block 3 changes block 3's loss (by ~1e-6)
    ref = GOLDEN["runs"]["stage3"]
    net = _golden_net()
    rule = _rule([True, False, True], frozen_concat=False)
    carry = rule.frozen_carry(net, _carry(rule, net, ref["shifts"]), 0, 2)
    metrics, _ = rule.blocks_grads(net, carry, 2, 3)
    assert metrics["loss_block3"] != pytest.approx(ref["losses"][0], rel=1e-8)
    assert metrics["loss_block3"] == pytest.approx(GOLDEN["runs"]["all_101"]["losses"][2],
                                                   rel=REL)


def test_probe_features_match_the_reference_evaluation():
    from locallearn.nets.scff_cnn import standardize

    ref = GOLDEN["probe"]
    net = _golden_net()
    with torch.no_grad():
        parts = [standardize(F.avg_pool2d(h, 2, 2, ceil_mode=True)).flatten(1)
                 for h in net.features(_golden_batch())]
    features = torch.cat(parts, 1)
    assert features.shape[1] == ref["dim"]
    _check(ref["features"], features, "probe features")


def test_the_presets_probe_reads_the_reference_features():
    # the image probe as configs/images/scff.yaml sets it (grid 8-4-2, per-image standardisation)
    from locallearn.eval.image_probe import block_features, probe_layout, standardize_samples
    from locallearn.schema import load_config

    ref = GOLDEN["probe"]
    cfg = load_config(ROOT / "configs" / "images" / "scff.yaml")
    assert cfg.probe.standardize == "sample" and cfg.probe.blocks is None
    net = _golden_net()
    layout = probe_layout(net, GOLDEN["side"], tuple(cfg.probe.grid))
    with torch.no_grad():
        feats = standardize_samples(block_features(net, _golden_batch(), layout.pools),
                                    layout.slices).double()
    assert feats.shape[1] == ref["dim"]
    assert feats.pow(3).sum(1).tolist() == pytest.approx(ref["per_image_cubes"], rel=1e-5)
    assert feats.amax(1).tolist() == pytest.approx(ref["per_image_max"], rel=1e-5)


def test_initial_weights_are_the_reference_codes():
    net = scff_cnn(GOLDEN["width_mult"], seed=0)
    for k, block in enumerate(net.blocks):
        ref = GOLDEN["init"][f"layer{k + 1}"]
        _check(ref["weight"], block.pre.conv.weight, f"init weight {k + 1}")
        _check(ref["bias"], block.pre.conv.bias, f"init bias {k + 1}")
    state = torch.random.get_rng_state()
    scff_cnn(0.25, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator untouched


# ---------------------------------------------------------------- the loss written plainly


def _std(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    return x / (1e-10 + x.std(dim=(1, 2, 3), keepdim=True))


def _plain_grads(net: BlockNet, x: torch.Tensor, shifts: list[int], concat: list[bool],
                 rule: SCFF) -> tuple[list[float], list[torch.Tensor]]:
    """Every block's loss and gradient, written out from the rule's definition: cat the pairs,
    standardise, convolve each half, sum; goodness; loss; autograd."""
    grads, losses = [], []
    h, h_neg = x, None
    for k, block in enumerate(net.blocks):
        conv, p = block.pre.conv, block.pre.padding
        pad = (p, p, p, p)
        if concat[k]:
            s = _std(h)
            other = s[(torch.arange(s.shape[0]) + shifts[k]) % s.shape[0]]
            pos = torch.cat([s, s], 1)
            neg = torch.cat([s, other], 1)
            outs = []
            for pair in (pos, neg):
                z = _std(F.pad(pair, pad, mode="reflect"))
                c = z.shape[1] // 2
                outs.append(conv(z[:, :c]) + conv(z[:, c:]))
            out, out_neg = outs
        else:
            out = conv(_std(F.pad(h, pad, mode="reflect")))
            out_neg = conv(_std(F.pad(h_neg, pad, mode="reflect")))
        g_pos = torch.relu(out).pow(2).mean(1)
        g_neg = torch.relu(out_neg).pow(2).mean(1)
        loss = (torch.log(1 + torch.exp(rule.threshold_pos[k] - g_pos)).mean()
                + torch.log(1 + torch.exp(g_neg - rule.threshold_neg[k])).mean()
                + rule.lam[k] * g_pos.pow(2).sum((1, 2)).sqrt().mean())
        params = [conv.weight, conv.bias]
        grads.extend(torch.autograd.grad(loss, params))
        losses.append(float(loss.detach()))
        with torch.no_grad():
            h, h_neg = block.post(out), block.post(out_neg)
    return losses, grads


@pytest.mark.parametrize("concat", [[True, True, True], [True, False, True],
                                    [True, False, False]])
def test_update_equals_autograd_of_the_plain_loss(concat):
    net = scff_cnn(0.125, seed=1).double()
    x = torch.randn(5, 3, 20, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rule = _rule(concat)
    gen = torch.Generator().manual_seed(9)
    metrics = rule.compute_grads(net, Batch(x, generator=gen))
    again = torch.Generator().manual_seed(9)
    shifts = [draw_shift(5, again) for _ in range(3)]
    losses, grads = _plain_grads(net, x, shifts, concat, rule)
    assert [metrics[f"loss_block{k}"] for k in (1, 2, 3)] == pytest.approx(losses, rel=1e-11)
    mine = [g for b in net.blocks for g in (b.pre.conv.weight.grad, b.pre.conv.bias.grad)]
    for a, b in zip(mine, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_pairs_from_one_convolution_equal_the_pairs_written_out():
    net = scff_cnn(0.125, seed=2).double()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pre = net.blocks[0].pre
    pos, neg = pre.contrast(x, 3)
    torch.testing.assert_close(pos, pre.pair(x, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neg, pre.pair(x, x.roll(-3, 0)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre(x), pos, rtol=0, atol=0)
    # the bias counts twice in a pair, once in an unpaired block
    w_only = pre.conv.bias.detach().clone()
    with torch.no_grad():
        pre.conv.bias.add_(1.0)
        assert torch.allclose(pre(x) - pos, torch.full_like(pos, 2.0))
        pre.conv.bias.copy_(w_only)


def test_split_ranges_do_the_same_arithmetic():
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    rule = SCFF()
    ref_net = scff_cnn(0.125, seed=3)
    whole = rule.compute_grads(ref_net, Batch(x, generator=torch.Generator().manual_seed(2)))
    for cuts in ([1], [2], [1, 2]):
        net = scff_cnn(0.125, seed=3)
        carry = rule.start_carry(net, Batch(x, generator=torch.Generator().manual_seed(2)))
        bounds = [0, *cuts, 3]
        metrics: dict[str, float] = {}
        for a, b in zip(bounds[:-1], bounds[1:]):
            part, carry = rule.blocks_grads(net, carry, a, b)
            metrics.update(part)
        assert metrics == whole
        for p, q in zip(net.parameters(), ref_net.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_shifts_come_from_the_runs_generator():
    net = scff_cnn(0.125, seed=0)
    x = torch.randn(7, 3, 8, 8)
    carry = SCFF().start_carry(net, Batch(x, generator=torch.Generator().manual_seed(11)))
    g = torch.Generator().manual_seed(11)
    expected = [int(torch.randperm(6, generator=g)[0]) + 1 for _ in range(3)]
    assert carry["shifts"] == expected
    assert all(1 <= s <= 6 for s in expected)
    with pytest.raises(ValueError, match="no negative pair"):
        SCFF().start_carry(net, Batch(x[:1]))


def test_reference_rule_backprops_the_top_loss_through_every_block():
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(8),
                    dtype=torch.float64)
    rule = SCFF()
    local_net = scff_cnn(0.125, seed=4).double()
    metrics = rule.compute_grads(local_net, Batch(x, generator=torch.Generator().manual_seed(1)))
    ref = rule.reference_rule()
    assert ref.name == "top-loss-backprop(scff)"
    net = scff_cnn(0.125, seed=4).double()
    out = ref.compute_grads(net, Batch(x, generator=torch.Generator().manual_seed(1)))
    assert out["loss"] == pytest.approx(metrics["loss_block3"], rel=1e-12)
    for p, q in zip(net.blocks[2].parameters(), local_net.blocks[2].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
    assert all(float(p.grad.abs().sum()) > 0 for b in net.blocks[:2] for p in b.parameters())


def test_rule_is_registered_and_checks_its_network():
    assert rule_class("scff") is SCFF
    rule = SCFF()
    with pytest.raises(ValueError, match="needs net.kind=scff"):
        rule.setup(vgg6(0.0625), torch.zeros(2, 3, 32, 32))
    two = SCFF(SCFFOptions([0.0, 1.0], [1.0, 2.0], [0.0, 0.0], [True, True]))
    with pytest.raises(ValueError, match="2 values for a network of 3 blocks"):
        two.setup(scff_cnn(0.125), torch.zeros(2, 3, 32, 32))
    net = scff_cnn(0.125)
    assert rule.trained_parameters(net) == list(net.parameters())
    assert rule.pipeline_refusal() is None


@pytest.mark.parametrize("options, message", [
    ({"lam": [1e-3, -1.0, 0.0]}, r"rule.options.lam=\[0.001, -1.0, 0.0\] is invalid"),
    ({"threshold_pos": [0.0, 1.0]}, "lists have different lengths"),
    ({"concat": [False, True, True]}, r"concat\[0\] must be true"),
    ({"threshold_neg": []}, "give one value per block"),
    ({"threshold_pos": [0.0, float("nan"), 1.0]}, "must be finite"),
    ({"concat": [1, 0, 1]}, r"rule.options.concat\[0\]=1 is invalid: expected true or false"),
    ({"slope": 2.0}, "unknown config key 'rule.options.slope'"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as err:
        from_dict(SCFFOptions, options, "rule.options.")
    assert "\n" not in str(err.value)


def test_the_rule_section_builds_from_config():
    from locallearn.schema import RuleConfig

    cfg = RuleConfig(name="scff", options={"concat": [True, True, True]})
    rule = build_rule(cfg, 0)
    assert isinstance(rule, SCFF) and rule.concat == [True, True, True]
    with pytest.raises(ValueError, match="rule.options.f"):
        build_rule(RuleConfig(name="scff", options={"f": "hinge"}), 0)


def test_presets_hold_the_published_settings():
    from locallearn.schema import load_config

    images = ROOT / "configs" / "images"
    greedy, together = (load_config(images / f"{n}.yaml") for n in ("scff", "scff-all"))
    for cfg in (greedy, together):
        assert cfg.net.kind == "scff" and cfg.rule.name == "scff" and cfg.batch_size == 100
        assert cfg.data.views.flip_p == 0.5
    rule = build_rule(greedy.rule, 0)
    assert (rule.threshold_pos, rule.threshold_neg, rule.lam) == (
        GOLDEN["thresholds_pos"], GOLDEN["thresholds_neg"], GOLDEN["lambdas"])
    assert rule.concat == [True, False, True] and rule.frozen_concat
    assert greedy.layerwise.epochs == [6, 4, 21] and greedy.epochs == 31
    assert greedy.layerwise.mode == "greedy" and together.layerwise.mode == "together"
    assert not build_rule(together.rule, 0).frozen_concat
    for name, base in (("scff-cpu", greedy), ("scff-all-cpu", together)):
        cpu = load_config(images / f"{name}.yaml")
        assert cpu.rule == base.rule and cpu.device == "cpu" and cpu.net.width_mult == 0.25
        assert cpu.layerwise.mode == base.layerwise.mode
