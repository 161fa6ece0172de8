"""``locallearn theory``: the interface other tools read (theory.json and the figure)."""

from __future__ import annotations

import functools
import json

from locallearn import theory
from locallearn.cli import main

REQUIRED = {"exact", "random-B", "non-orthogonal", "relu", "shrinking-same", "shrinking-top",
            "conv-global-pool", "conv-pool-1"}


def test_theory_command_writes_json_and_figure(tmp_path, capsys, monkeypatch):
    # fewer pairs than the command's defaults (a tenth of the time); the statements still hold
    # at this size, and test_theory.py checks them at full size
    small = functools.partial(theory.run_all, n_samples=128, n_shrinking=512, n_maps=64,
                              lbfgs=False)
    monkeypatch.setattr(theory, "run_all", small)
    assert main(["theory", "--out", str(tmp_path), "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "theory.json").read_text())
    assert REQUIRED <= {r["case"] for r in rows}
    assert all({"case", "layer", "cosine", "rel_error"} <= set(r) for r in rows)
    for r in rows:
        if r["case"] in ("exact", "conv-pool-1"):
            assert r["cosine"] > 0.9999 and r["rel_error"] < 1e-6
    lowest = {r["case"]: r["cosine"] for r in rows if r["layer"] == 1}
    assert lowest["non-orthogonal"] < 0.9 and lowest["random-B"] < 0.9 and lowest["relu"] < 0.9
    assert lowest["shrinking-top"] > lowest["shrinking-same"]
    assert lowest["conv-pool-1"] > lowest["conv-global-pool"]
    assert (tmp_path / "theory.png").stat().st_size > 1000
    assert "conv-pool-1" in capsys.readouterr().out


def test_theory_cifar_needs_a_root(capsys):
    assert main(["theory", "--data", "cifar"]) == 2
    assert "--data-root" in capsys.readouterr().err
