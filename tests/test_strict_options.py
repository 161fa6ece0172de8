"""Strict options: every rule declares all it reads in its typed options; keys that a rule or a
task does not read are one-line errors (exit 2); configs of earlier versions (their rule keys
outside the options) still load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from locallearn import losses
from locallearn.cli import main
from locallearn.rules import build_rule, registered, rule_class
from locallearn.rules.layerwise import Layerwise
from locallearn.schema import RuleConfig, build_config, load_config, migrate_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_rule_declares_typed_options():
    for name in registered():
        cls = rule_class(name)
        assert dataclasses.is_dataclass(cls.Options), name
        assert not hasattr(cls, "settings"), name  # one place per rule: its options
        rule = build_rule(RuleConfig(name=name))
        assert rule.name.startswith(name.split("-")[0]) or name in ("drtp", "sign-dfa")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["rule.name=clapp-image", "rule.options.loss=infonce"],
         "unknown config key 'rule.options.loss'"),
        (["rule.name=clapp-image", "rule.temperature=0.5"],  # a key of earlier versions
         "unknown config key 'rule.options.temperature'"),
        (["rule.name=backprop", "rule.options.view=mask"], "rule.options.view is not an option"),
        (["rule.name=dfa", "rule.options.scale=2"], "rule.options.scale is not an option"),
        (["rule.name=layerwise", "rule.options.loss=vicreg", "rule.options.f=softplus"],
         "rule.options.f='softplus' applies to loss=clapp only, not loss=vicreg"),
        (["rule.name=layerwise", "rule.options.loss=clapp", "rule.options.temperature=0.2"],
         "rule.options.temperature=0.2 applies to loss=infonce only"),
        (["rule.name=layerwise", "rule.options.pool=global"],
         "unknown config key 'rule.options.pool'"),
        (["rule.name=bp-ssl", "rule.options.loss=clapp", "rule.options.temperature=0.2"],
         "rule.options.temperature=0.2 applies to loss=infonce only"),
        (["rule.name=layerwise", "rule.options.loss=infonce", "rule.options.temperature=0"],
         "rule.options.temperature=0.0 is invalid: must be > 0"),
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
    o = cfg.rule.options  # every option written down once the config is built
    assert (o["f"], o["negative_image"], o["negative_view"]) == ("hinge", "next", None)
    assert "loss" not in o
    rhm = load_config(None, [])
    assert rhm.net.width == 256 and rhm.net.channels_last is None and rhm.probe.epochs is None


def test_options_get_the_rules_defaults():
    ff = build_config({"rule": {"name": "ff"}}).rule
    assert ff.options["f"] == "softplus"  # the rule's own default, not another rule's
    info = build_config({"rule": {"name": "layerwise", "options": {"loss": "infonce"}}}).rule
    assert (info.options["temperature"], info.options["loss"]) == (0.1, "infonce")


def test_the_rule_keys_of_earlier_versions_are_translated():
    """``rule.loss``, ``view``, ``f``, ``temperature`` move into the options; ``rule.negatives``
    (which image) becomes ``negative_image`` and ``rule.options.negatives`` (which view of it)
    ``negative_view``: presets, sweep files and overrides of earlier versions load unchanged."""
    old = build_config({"data": {"name": "cifar10"}, "net": {"kind": "vgg6"},
                        "rule": {"name": "clapp-image", "f": "softplus", "negatives": "random",
                                 "options": {"negatives": "same-view"}}})
    new = build_config({"data": {"name": "cifar10"}, "net": {"kind": "vgg6"},
                        "rule": {"name": "clapp-image", "options": {
                            "f": "softplus", "negative_image": "random",
                            "negative_view": "same-view"}}})
    assert old == new
    layer = load_config(None, ["rule.name=layerwise", "rule.loss=infonce", "rule.view=mask",
                               "rule.temperature=0.3"]).rule.options
    assert (layer["loss"], layer["view"], layer["temperature"]) == ("infonce", "mask", 0.3)


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
    with pytest.raises(ValueError, match="does not apply|not an option"):
        build_config(old)  # as user input it is refused...
    cfg = build_config(migrate_config(old))  # ...as a saved config it loads
    assert cfg.rule.options == {} and cfg.net.width == 16 and cfg.net.channels_last is None


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
    with pytest.raises(ValueError, match=r"rule\.options\.temperature=-5\.0 is invalid"):
        build_config({"rule": {"name": "layerwise",
                               "options": {"loss": "infonce", "temperature": -5}}})
    with pytest.raises(ValueError, match="rule.options.context='sideways' is invalid"):
        build_config({"data": {"name": "cifar10"}, "net": {"kind": "vgg6"},
                      "rule": {"name": "clapp-image", "options": {"context": "sideways"}}})


def test_an_optional_choice_names_null_not_a_python_type():
    from locallearn.schema import load_config

    with pytest.raises(ValueError, match=r"expected one of paper, same-view or null$"):
        load_config(ROOT / "configs" / "images" / "clapp++-cpu.yaml",
                    ["rule.options.negative_view=foo"])


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


def test_a_run_folder_of_the_earlier_rule_keys_resumes_and_extends(tmp_path, monkeypatch):
    """``tests/data/legacy-run``: a one-epoch image run made by the code before the rule keys
    moved into ``rule.options`` (commit ae55c74: ``rule.f``, ``rule.negatives`` and
    ``rule.options.negatives`` in its config.yaml and checkpoint), from ``preset.yaml`` beside
    it on the image folder that ``tests/image_folder.py`` writes. Today's code continues it from
    its checkpoint, under its old preset and under the preset in today's spelling."""
    import shutil

    import torch
    import yaml
    from image_folder import write_dataset

    from locallearn.experiments.runs import run

    legacy = ROOT / "tests" / "data" / "legacy-run"
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", {"train": 12, "test": 6})
    old_preset = yaml.safe_load((legacy / "preset.yaml").read_text())
    new_preset = yaml.safe_load((legacy / "preset.yaml").read_text())
    rule = new_preset["rule"]
    rule["options"] = {"context": "same", "pool": "global", "f": rule.pop("f"),
                       "negative_image": rule.pop("negatives"),
                       "negative_view": rule["options"]["negatives"]}
    for name, preset in (("old", old_preset), ("new", new_preset)):
        out = tmp_path / name
        shutil.copytree(legacy, out)
        (out / "preset.yaml").unlink()
        before = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
        summary = run(build_config({**preset, "epochs": 2}), out)
        assert before == 1 and summary["epochs"] == 2, name
        rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        assert len(rows) == 3  # epochs 0 and 1 kept from the legacy run, epoch 2 added
    # and a changed option is still refused against the old checkpoint
    out = tmp_path / "changed"
    shutil.copytree(legacy, out)
    changed = {**new_preset, "epochs": 2, "rule": {**new_preset["rule"], "options": {
        **new_preset["rule"]["options"], "f": "softplus"}}}
    with pytest.raises(ValueError, match="rule.options.f"):
        run(build_config(changed), out)
