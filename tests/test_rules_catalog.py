"""``locallearn rules``: every rule with what it sees and its options, read from the rules' own
classes."""

from __future__ import annotations

import dataclasses

from locallearn.cli import main
from locallearn.rules import registered, rule_class
from locallearn.rules.catalog import RuleInfo, describe


def test_every_option_of_every_rule_is_listed_with_its_default_and_meaning():
    infos = describe({name: rule_class(name) for name in registered()})
    assert [i.name for i in infos] == registered()
    for info in infos:
        cls = rule_class(info.name)
        assert info.summary
        if dataclasses.is_dataclass(cls.Options):
            assert [o.name for o in info.options] == [
                f.name for f in dataclasses.fields(cls.Options)]
            missing = [o.name for o in info.options if not o.meaning]
            assert not missing, (info.name, missing)  # every option says what it does
    softhebb = next(i for i in infos if i.name == "softhebb")
    t_invert = next(o for o in softhebb.options if o.name == "t_invert")
    assert t_invert.default == [1.0, 0.65, 0.25] and "inverse temperature" in t_invert.meaning
    clapp = next(i for i in infos if i.name == "clapp-image")
    context = next(o for o in clapp.options if o.name == "context")  # from a subclass's docs
    pool = next(o for o in clapp.options if o.name == "pool")  # from the base class's docs
    assert "CLAPP" in context.meaning and "global" in pool.meaning
    defaults = {o.name: o.default for o in clapp.options}
    assert (defaults["f"], defaults["negative_image"]) == ("hinge", "next")
    assert "settings" not in RuleInfo.__dataclass_fields__  # one place per rule: its options


def test_the_command_prints_the_chosen_rules(capsys):
    assert main(["rules", "lpl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lpl: ") and "rule.options.decorr = 10.0" in out
    assert "softhebb" not in out
    assert main(["rules", "no-such-rule"]) == 2
    assert "rule.name='no-such-rule' is unknown" in capsys.readouterr().err
