"""The results store: one row per run, dynamic columns, filters, table and CSV output."""

from __future__ import annotations

import argparse
import csv
import io
import sqlite3

import pytest

from locallearn.experiments.results import (
    DB_NAME,
    ResultsStore,
    code_version,
    format_table,
    read_results,
    table_columns,
    to_csv,
)
from locallearn.experiments.sweep_commands import add_report, add_results, add_sweep


def summary(acc: float, size: int, **extra) -> dict:
    return {"rule": "backprop", "rule_config": {"name": "backprop"}, "test_accuracy": acc,
            "best_test_accuracy": acc + 0.01, "chance": 0.125, "epochs": 3, "seconds": 1.5,
            "peak_rss_mib": 300.0, "host": "h", "seed": 0, "train_size": size, "P_star": 512,
            "train_size_over_P_star": size / 512, "stopped_early": False, **extra}


@pytest.fixture
def store(tmp_path):
    with ResultsStore(tmp_path) as s:
        s.set_axes([("variant", "variants"), ("data.train_size", "values")])
        s.record("runs/a", {"variant": "bp", "data.train_size": "1P*", "seed": 0},
                 summary(0.5, 512), "v1")
        s.record("runs/b", {"variant": "bp", "data.train_size": "2P*", "seed": 0},
                 summary(0.75, 1024), "v1")
        s.record("runs/c", {"variant": "dfa", "data.train_size": "2P*", "seed": 1},
                 summary(0.25, 1024, probe_accuracy=0.3), "v1")
        yield s


def test_one_row_per_run_dir(store, tmp_path):
    assert len(store.rows()) == 3
    again = store.record("runs/a", {"variant": "bp", "data.train_size": "1P*", "seed": 0},
                         summary(0.99, 512), "v2")
    assert again is False
    rows = store.rows()
    assert len(rows) == 3 and rows[0]["test_accuracy"] == 0.5
    with sqlite3.connect(tmp_path / DB_NAME) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO runs (run_dir) VALUES ('runs/a')")


def test_columns_and_values(store):
    cols = store.ordered_columns()
    assert cols[:3] == ["variant", "data.train_size", "seed"]
    assert cols[-1] == "run_dir" and "summary_json" not in cols
    row = store.rows({"run_dir": "runs/c"})[0]
    assert row["probe_accuracy"] == 0.3  # a column added when a summary first has it
    assert store.rows({"run_dir": "runs/a"})[0]["probe_accuracy"] is None
    assert row["stopped_early"] == "false" and row["code_version"] == "v1"
    assert row["seed"] == 1 and row["P_star"] == 512


def test_filters(store):
    assert [r["run_dir"] for r in store.rows({"variant": "bp"})] == ["runs/a", "runs/b"]
    assert [r["run_dir"] for r in store.rows({"data.train_size": "2P*", "seed": "1"})] == [
        "runs/c"]
    assert [r["run_dir"] for r in store.rows({"test_accuracy": "0.75"})] == ["runs/b"]
    assert store.rows({"variant": "none"}) == []
    with pytest.raises(ValueError, match="filter key 'nope' is not a column"):
        store.rows({"nope": "1"})


def test_a_number_matches_in_any_spelling(tmp_path):
    """A grid value ``5e-4`` is stored as text (YAML 1.1 reads it so), ``2.5e-4`` as a number;
    a filter finds either however the number is written, and text stays text."""
    with ResultsStore(tmp_path) as s:
        s.set_axes([("optim.lr", "values")])
        for name, lr in (("a", "5e-4"), ("b", 2.5e-4), ("c", "1e-3"), ("d", "fast")):
            s.record(f"runs/{name}", {"optim.lr": lr, "seed": 0}, summary(0.5, 512), "v1")
        found = {q: [r["run_dir"] for r in s.rows({"optim.lr": q})]
                 for q in ("5e-4", "0.0005", "5E-4", "2.5e-4", "0.00025", "0.001", "fast", "0")}
    assert found == {"5e-4": ["runs/a"], "0.0005": ["runs/a"], "5E-4": ["runs/a"],
                     "2.5e-4": ["runs/b"], "0.00025": ["runs/b"], "0.001": ["runs/c"],
                     "fast": ["runs/d"], "0": []}


def test_table_and_csv(store, tmp_path):
    columns, rows, axes = read_results(tmp_path)
    shown = table_columns(columns, rows, axes)
    assert shown[:3] == ["variant", "data.train_size", "seed"] and "test_accuracy" in shown
    text = format_table(shown, rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["variant", "data.train_size", "seed"]
    assert len(lines) == 2 + 3 and "0.75" in text and "runs/c" in text
    parsed = list(csv.DictReader(io.StringIO(to_csv(columns, rows))))
    assert len(parsed) == 3 and parsed[2]["probe_accuracy"] == "0.3"
    assert parsed[0]["probe_accuracy"] == ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locallearn")
    sub = parser.add_subparsers(dest="command")
    for register in (add_sweep, add_results, add_report):
        register(sub)
    return parser


def test_results_command(store, tmp_path, capsys):
    args = _parser().parse_args(["results", str(tmp_path), "--filter", "variant=bp"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "runs/a" in out and "runs/c" not in out and out.strip().endswith("2 runs")
    args = _parser().parse_args(["results", str(tmp_path), "--csv"])
    assert args.func(args) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run_dir"] for r in rows] == ["runs/a", "runs/b", "runs/c"]
    args = _parser().parse_args(["results", str(tmp_path), "--columns", "variant,seed"])
    args.func(args)
    assert capsys.readouterr().out.splitlines()[0].split() == ["variant", "seed"]
    for bad, match in (
        (["--filter", "variant"], "not of the form key=value"),
        (["--columns", "nope"], "column 'nope' is unknown"),
    ):
        args = _parser().parse_args(["results", str(tmp_path), *bad])
        with pytest.raises(ValueError, match=match):
            args.func(args)


def test_missing_store_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="holds no results"):
        read_results(tmp_path / "nowhere")


def test_code_version_names_the_package():
    from locallearn import __version__

    assert code_version().startswith(__version__)


def test_integers_beyond_sqlite_are_stored_as_reals():
    """An RHM's P_max at depth 5 exceeds 64 bits; recording such a summary must not fail."""
    from locallearn.experiments.results import db_value

    assert db_value(8**40) == float(8**40) and db_value(2**63 - 1) == 2**63 - 1
