"""Strict options: every rule declares its options and settings; keys that a rule or a task does
not read are one-line errors (exit 2); saved configs of earlier versions still load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from locallearn import losses
from locallearn.cli import main
from locallearn.rules import build_rule, registered, rule_class
from locallearn.rules.base import SETTING_KEYS
from locallearn.rules.layerwise import Layerwise
from locallearn.schema import RuleConfig, build_config, load_config, migrate_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_rule_declares_typed_options_and_its_settings():
    for name in registered():
        cls = rule_class(name)
        assert dataclasses.is_dataclass(cls.Options), name
        assert set(cls.settings) <= set(SETTING_KEYS), name
        rule = build_rule(RuleConfig(name=name))
        assert rule.name.startswith(name.split("-")[0]) or name in ("drtp", "sign-dfa")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["rule.name=clapp-image", "rule.loss=infonce", "rule.temperature=-5"],
         "rule.loss='infonce' does not apply to rule.name=clapp-image"),
        (["rule.name=clapp-image", "rule.temperature=0.5"], "rule.temperature=0.5 does not apply"),
        (["rule.name=backprop", "rule.view=mask"], "rule.view='mask' does not apply"),
        (["rule.name=dfa", "rule.options.scale=2"], "rule.options.scale is not an option"),
        (["rule.name=layerwise", "rule.loss=vicreg", "rule.f=softplus"],
         "rule.f='softplus' does not apply to rule.name=layerwise"),
        (["rule.name=layerwise", "rule.loss=clapp", "rule.temperature=0.2"],
         "rule.temperature=0.2 does not apply"),
        (["rule.name=layerwise", "rule.options.pool=global"],
         "unknown config key 'rule.options.pool'"),
        (["rule.name=bp-ssl", "rule.loss=clapp", "rule.temperature=0.2"],
         "rule.temperature=0.2 does not apply"),
        (["rule.name=layerwise", "rule.loss=infonce", "rule.temperature=0"],
         "rule.temperature=0.0 is invalid: must be > 0"),
        (["net.channels_last=false"], "net.channels_last=False does not apply to data.name=rhm"),
        (["probe.epochs=3"], "probe.epochs=3 does not apply to data.name=rhm"),
        (["probe.augment=true"], "probe.augment=True does not apply"),
    ],
)
def test_inapplicable_keys_are_one_line_errors_exit_2(tmp_path, capsys, overrides, fragment):
    code = main(["run", str(ROOT / "configs/rhm/backprop.yaml"), "--out", str(tmp_path / "o"),
                 "epochs=0", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_image_runs_refuse_rhm_only_keys_and_fill_their_defaults():
    with pytest.raises(ValueError, match=r"net\.width=64 does not apply to data\.name=cifar10"):
        build_config({"data": {"name": "cifar10"}, "net": {"kind": "vgg6", "width": 64},
                      "rule": {"name": "clapp-image"}})
    cfg = build_config({"data": {"name": "cifar10"}, "net": {"kind": "vgg6"},
                        "rule": {"name": "clapp-image"}})
    assert cfg.net.channels_last is True and cfg.net.width_mult == 1.0 and cfg.net.width is None
    assert cfg.probe.epochs == 0 and cfg.probe.batch_size == 256
    assert (cfg.rule.f, cfg.rule.negatives, cfg.rule.loss) == ("hinge", "next", None)
    rhm = load_config(None, [])
    assert rhm.net.width == 256 and rhm.net.channels_last is None and rhm.probe.epochs is None


def test_settings_get_the_rules_defaults():
    ff = build_config({"rule": {"name": "ff"}}).rule
    assert ff.f == "softplus"  # the rule's own default, not another rule's
    info = build_config({"rule": {"name": "layerwise", "loss": "infonce"}}).rule
    assert (info.temperature, info.f, info.negatives) == (0.1, None, None)


def test_a_config_saved_by_an_earlier_version_still_loads():
    """Earlier versions wrote every key, also those a run does not read."""
    old = {
        "data": {"name": "rhm", "v": 8, "n_classes": 4, "m": 4, "s": 2, "L": 2},
        "net": {"width": 16, "bias": False, "seed": None, "kind": "hier-cnn",
                "width_mult": 1.0, "channels_last": True},
        "rule": {"name": "backprop", "loss": "clapp", "view": "synonyms", "f": "hinge",
                 "negatives": "next", "temperature": 0.1, "options": {}},
        "probe": {"steps": 100, "weight_decay": 1e-4, "lr": 1e-3, "epochs": 0,
                  "augment": False, "per_block": False, "batch_size": 256, "grid": None},
    }
    with pytest.raises(ValueError, match="does not apply"):
        build_config(old)  # as user input it is refused...
    cfg = build_config(migrate_config(old))  # ...as a saved config it loads
    assert cfg.rule.loss is None and cfg.net.width == 16 and cfg.net.channels_last is None


def test_a_built_config_round_trips():
    """The config a run saves (every key, unused ones null) is valid input again."""
    for rule in ("backprop", "layerwise", "clapp-image"):
        raw = {"rule": {"name": rule}}
        if rule == "clapp-image":
            raw.update(data={"name": "cifar10"}, net={"kind": "vgg6"})
        cfg = build_config(raw)
        assert build_config(dataclasses.asdict(cfg)) == cfg


def test_one_score_convention_for_rhm_and_image_rules():
    """``score_norm=dims`` scales a score by 1/sqrt(D_z D_c) everywhere: 1/C for the RHM rule
    (its default, as before), the same function for the image rules (default: none, the sum)."""
    assert losses.score_scale("dims", 16, 16) == 1 / 16
    assert losses.score_scale("none", 16, 16) == 1.0
    assert losses.score_scale("dims", 4, 9) == pytest.approx(1 / 6)
    c = torch.randn(3, 16, 5)
    dims, none = Layerwise(score_norm="dims"), Layerwise(score_norm="none")
    for rule in (dims, none):
        rule.B.append(torch.nn.Parameter(torch.randn(16, 16)))
    none.B[0].data.copy_(dims.B[0].data)
    torch.testing.assert_close(none.predict(0, c), dims.predict(0, c) * 16)
    before = torch.einsum("dc,nc...->nd...", dims.B[0], c) / 16  # the old RHM formula
    torch.testing.assert_close(dims.predict(0, c), before, rtol=0, atol=0)
    rhm = build_rule(RuleConfig(name="layerwise"))
    image = build_rule(RuleConfig(name="clapp-image", options={"score_norm": "dims"}))
    assert rhm.score_norm == "dims" and image.score_norm == "dims"
    assert image.scale(16, 16) == losses.score_scale("dims", 16, 16)
    with pytest.raises(ValueError, match="score_norm='sum' is invalid"):
        build_rule(RuleConfig(name="layerwise", options={"score_norm": "sum"}))


def test_the_bp_ssl_references_are_named_apart_from_the_bp_ssl_rule():
    names = {build_rule(RuleConfig(name=n)).reference_rule().name
             for n in ("layerwise", "clapp-image", "bp-ssl")}
    assert names == {"top-loss-backprop(layerwise)", "top-loss-backprop(clapp-image)", "bp-ssl"}


def test_bad_rule_values_fail_when_the_config_is_built():
    """Sweeps check every config before starting (--dry-run): values are checked there too."""
    with pytest.raises(ValueError, match=r"rule\.temperature=-5\.0 is invalid"):
        build_config({"rule": {"name": "layerwise", "loss": "infonce", "temperature": -5}})
    with pytest.raises(ValueError, match="rule.options.context='sideways' is invalid"):
        build_config({"data": {"name": "cifar10"}, "net": {"kind": "vgg6"},
                      "rule": {"name": "clapp-image", "options": {"context": "sideways"}}})


def test_an_optional_choice_names_null_not_a_python_type():
    from locallearn.schema import load_config

    with pytest.raises(ValueError, match=r"expected one of paper, same-view or null$"):
        load_config(ROOT / "configs" / "images" / "clapp++-cpu.yaml",
                    ["rule.options.negatives=foo"])


def test_range_checks_name_the_key_the_value_and_the_range():
    from locallearn.rules.base import check_range

    check_range("k", 0.5, 0, 1, low_open=True, high_open=True)  # inside: no error
    for args, kwargs, text in [
        (("rule.options.a", -1, 0), {}, "rule.options.a=-1 is invalid: must be >= 0"),
        (("rule.options.a", 0, 0), {"low_open": True}, "must be > 0"),
        (("rule.options.a", 1, 0, 1), {"high_open": True}, "must be in [0, 1)"),
        (("rule.options.a", 2, None, 1), {}, "must be <= 1"),
        (("rule.options.a", float("nan"), 0), {"note": "why"}, "must be >= 0 (why)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(text)):
            check_range(*args, **kwargs)
