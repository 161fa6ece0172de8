"""``locallearn report``: sample complexity, tables and figures from a results store."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import yaml

from locallearn.experiments.report import write_report
from locallearn.experiments.report_runs import crossing, fmt_complexity
from locallearn.experiments.results import ResultsStore
from locallearn.experiments.sweep_commands import add_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
P_STAR = 512
RHM_CONFIG = {"data": {"name": "rhm", "v": 8, "n_classes": 8, "m": 4, "s": 2, "L": 3},
              "net": {"width": 64}, "epochs": 3}


def test_crossing_interpolates_in_log_p():
    p, censored = crossing([(512, 0.5), (1024, 0.2), (2048, 0.05)], 0.1)
    assert not censored and p == pytest.approx(1024 * 2 ** (2 / 3))
    assert crossing([(2048, 0.1), (1024, 0.3)], 0.1) == (2048, False)  # unsorted input, exact hit
    assert crossing([(256, 0.01), (512, 0.0)], 0.1) == (256, True)  # reached at the smallest P
    assert crossing([(256, 0.5), (512, 0.4)], 0.1) == (None, False)


def test_complexity_text():
    assert fmt_complexity([(None, False), (None, False)], 512) == "not reached"
    assert fmt_complexity([(256, True)], 512) == "≤ 0.5"
    assert fmt_complexity([(1024, False), (None, False)], 512) == "2 (1/2 seeds; 1 not reached)"
    assert fmt_complexity([(512, False), (2048, False)], 512) == "2 [1–4] (2 seeds)"


def _run(out: Path, store: ResultsStore, name: str, values: dict, summary: dict,
         config: dict, curve: list[float]) -> Path:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i, "test_accuracy": a, "loss": 1 - a}) + "\n"
        for i, a in enumerate(curve)))
    store.record(f"runs/{name}", values, summary, "test")
    return run_dir


def make_rhm_sweep(out: Path) -> None:
    errors = {  # rule -> seed -> error at P/P* = 0.5, 1, 2
        "good": {0: [0.5, 0.2, 0.05], 1: [0.5, 0.3, 0.1]},
        "bad": {0: [0.8, 0.8, 0.7], 1: [0.85, 0.8, 0.75]},
        "easy": {0: [0.05, 0.0, 0.0], 1: [0.08, 0.02, 0.0]},
    }
    with ResultsStore(out) as store:
        store.set_axes([("variant", "variants"), ("data.train_size", "variants")])
        for rule, seeds in errors.items():
            for seed, errs in seeds.items():
                for ratio, err in zip((0.5, 1, 2), errs):
                    size = f"{ratio:g}P*"
                    summary = {"rule": rule, "test_accuracy": 1 - err, "chance": 0.125,
                               "train_size": int(ratio * P_STAR), "P_star": P_STAR,
                               "train_size_over_P_star": ratio, "test_size": 2000,
                               "seconds": 2.0, "peak_rss_mib": 300.0, "host": "h"}
                    run = _run(out, store, f"{rule}-{size}-{seed}",
                               {"variant": rule, "data.train_size": size, "seed": seed},
                               summary, RHM_CONFIG, [0.125, 0.5, 1 - err])
                    if rule == "good" and ratio == 2:
                        (run / "alignment.json").write_text(json.dumps([
                            {"block": 1, "cosine_mean": 0.9, "cosine_std": 0.01},
                            {"block": 2, "cosine_mean": 0.7, "cosine_std": 0.02}]))
                    if rule == "good" and ratio == 2 and seed == 0:
                        (run / "analysis.json").write_text("{}")
                        (run / "heatmap.png").write_bytes(PNG_MAGIC + b"stub")
        session = store.start_session("local", 2, 1, 18, 18)
        store.end_session(session, 18, 0, [2.5, 3.5])


def test_rhm_report(tmp_path):
    make_rhm_sweep(tmp_path)
    path = write_report(tmp_path, target_error=0.1)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "| variant | data.train_size | seeds | test acc |" in text
    assert "| good | 2P* | 2 | 0.925 ± 0.035 |" in text
    geo = math.sqrt(2 ** (2 / 3) * 2)
    assert f"| good | {geo:.2g} [1.6–2] (2 seeds) |" in text
    assert "| bad | not reached |" in text and "| easy | ≤ 0.5 (2 seeds) |" in text
    for fig in ("error_vs_P.png", "curves_all.png", "alignment.png"):
        assert (tmp_path / "figures" / fig).read_bytes()[:8] == PNG_MAGIC
        assert f"figures/{fig}" in text
    assert "runs/good-2P*-0/heatmap.png" in text  # an analysis figure, embedded as it is
    assert "| local | 2 | 1 |" in text and "| 3.0 | 3.5 |" in text  # the machine load


def test_rhm_report_draws_unseen_synonym_probes_against_p(tmp_path):
    """Runs with an analysis give the section: a figure and a table of layer x P/P* per rule,
    mean over the analysed seeds."""
    make_rhm_sweep(tmp_path)
    for rule, base in (("good", 0.5), ("bad", 0.1)):
        for seed in (0, 1):
            for ratio in (0.5, 1, 2):
                rows = [{"measure": "probe", "split": "synonyms", "layer": layer,
                         "value": base + 0.1 * ratio + 0.01 * seed + 0.1 * (layer - 1),
                         "input_patch": 0.05} for layer in (1, 2, 3)]
                rows.append({"measure": "probe", "split": "random", "layer": 1, "value": 0.99})
                run = tmp_path / "runs" / f"{rule}-{ratio:g}P*-{seed}"
                (run / "analysis.json").write_text(json.dumps(rows))
    text = write_report(tmp_path, target_error=0.1).read_text()
    assert "## Unseen-synonym probes against the training-set size" in text
    assert (tmp_path / "figures" / "synonyms_vs_P.png").read_bytes()[:8] == PNG_MAGIC
    assert "| rule | layer | 0.5 P* | 1 P* | 2 P* |" in text
    assert "| good | 1 | 0.555 (2) | 0.605 (2) | 0.705 (2) |" in text  # seeds 0 and 1 averaged
    assert "| bad | 2 | 0.255 (2) | 0.305 (2) | 0.405 (2) |" in text
    assert "| good | 3 |" not in text  # layers 1 and 2 only
    assert "| easy |" not in text.split("## Unseen-synonym")[1].split("##")[0]  # not analysed


def test_image_table(tmp_path):
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants"), ("dataset", "variants")])
        for preset, base in (("clapp++", 0.80), ("bp-infonce", 0.81)):
            for dataset, shift in (("cifar10", 0.0), ("stl10", -0.02)):
                for seed, noise in ((0, -0.01), (1, 0.01)):
                    acc = base + shift + noise
                    _run(tmp_path, store, f"{preset}-{dataset}-{seed}",
                         {"preset": preset, "dataset": dataset, "seed": seed},
                         {"rule": preset, "probe_accuracy": acc, "seconds": 5.0},
                         {"data": {"name": dataset}}, [])
    text = write_report(tmp_path, out=tmp_path / "r" / "images.md").read_text()
    assert "| rule | clapp++ | bp-infonce |" not in text
    assert "| rule | cifar10 | stl10 |" in text
    assert "| clapp++ | 80.0 ± 1.4 (n=2) | 78.0 ± 1.4 (n=2) |" in text
    assert "| bp-infonce | 81.0 ± 1.4 (n=2) | 79.0 ± 1.4 (n=2) |" in text


def test_image_table_keeps_the_grid_points_of_other_axes_apart(tmp_path):
    """A learning-rate grid: each rule's row is one rate, its seeds averaged, never the rates."""
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants"), ("optim.lr", "values")])
        for preset, lr, seed, acc in (("clapp++", "5e-4", 0, 0.58), ("clapp++", "5e-4", 1, 0.60),
                                      ("clapp++", "2e-3", 0, 0.50), ("ff", "5e-4", 0, 0.52)):
            _run(tmp_path, store, f"{preset}-{lr}-{seed}",
                 {"preset": preset, "optim.lr": lr, "seed": seed},
                 {"rule": preset, "probe_accuracy": acc, "seconds": 5.0},
                 {"data": {"name": "cifar10"}}, [])
    text = write_report(tmp_path).read_text()
    table = text.split("## Linear-probe accuracy (%), rule x dataset")[1].split("\n## ")[0]
    assert "| clapp++ / optim.lr=5e-4 | 59.0 ± 1.4 (n=2) |" in table
    assert "| clapp++ / optim.lr=2e-3 | 50.0 (n=1) |" in table
    assert "| ff / optim.lr=5e-4 | 52.0 (n=1) |" in table
    assert "(n=3)" not in table
    # the rates in the order of their values, not of their spelling
    assert table.index("clapp++ / optim.lr=5e-4") < table.index("clapp++ / optim.lr=2e-3")


def test_trained_runs_against_the_untrained_encoder_of_their_seed(tmp_path):
    """Each trained run is compared with the epochs=0 run of the same seed and network (not
    another seed's, not another width's); the table gives mean ± std of the differences."""
    net = {"width_mult": 0.125}
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants")])
        runs = [("random", 0, 0.50, 0.40, 0, net), ("random", 1, 0.52, 0.44, 0, net),
                ("clapp++", 0, 0.58, 0.47, 3, net), ("clapp++", 1, 0.61, 0.49, 3, net),
                ("ff", 0, 0.47, None, 3, net),
                ("wide", 0, 0.70, 0.60, 3, {"width_mult": 1.0})]  # no untrained of its width
        for preset, seed, acc, top, epochs, net_cfg in runs:
            summary = {"rule": preset, "probe_accuracy": acc, "seconds": 1.0}
            if top is not None:
                summary["probe_top_accuracy"] = top
            _run(tmp_path, store, f"{preset}-{seed}", {"preset": preset, "seed": seed}, summary,
                 {"epochs": epochs, "net": net_cfg, "data": {"name": "cifar10"}}, [])
    text = write_report(tmp_path).read_text()
    section = text.split("## Against the untrained encoder")[1].split("\n## ")[0]
    assert "| clapp++ | 0, 1 | +8.50 ± 0.71 | +6.00 ± 1.41 |" in section
    assert "| ff | 0 | -3.00 | - |" in section
    assert "| random |" not in section and "| wide |" not in section


def test_report_errors_and_command(tmp_path, capsys):
    with pytest.raises(ValueError, match="holds no results"):
        write_report(tmp_path)
    ResultsStore(tmp_path).close()
    with pytest.raises(ValueError, match="no recorded runs"):
        write_report(tmp_path)
    make_rhm_sweep(tmp_path / "s")
    with pytest.raises(ValueError, match="target error 0 is invalid"):
        write_report(tmp_path / "s", target_error=0)
    parser = argparse.ArgumentParser()
    add_report(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path / "s"), "--target-error", "0.3"])
    assert args.func(args) == 0
    assert "report.md" in capsys.readouterr().out
    assert "test error ≤ 0.3" in (tmp_path / "s" / "report.md").read_text()


def test_axes_of_settings_make_sections(tmp_path):
    """An axis of variants that sets no rule (RHM depth) splits the report into sections."""
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"axes": [
        {"name": "variant", "kind": "variants", "values": ["bp", "dfa"],
         "variants": {"bp": {"rule": {"name": "backprop"}}, "dfa": {"rule": {"name": "dfa"}}}},
        {"name": "rhm", "kind": "variants", "values": ["L3", "L2"],
         "variants": {"L3": {"data": {"L": 3}}, "L2": {"data": {"L": 2}}}},
        {"name": "data.train_size", "kind": "values", "values": ["1P*", "2P*"]},
    ]}))
    with ResultsStore(tmp_path) as store:
        store.set_axes([("variant", "variants"), ("rhm", "variants"),
                        ("data.train_size", "values")])
        for rule, err in (("bp", 0.05), ("dfa", 0.8)):
            for depth in ("L3", "L2"):
                for ratio in (1, 2):
                    _run(tmp_path, store, f"{rule}-{depth}-{ratio}",
                         {"variant": rule, "rhm": depth, "data.train_size": f"{ratio}P*",
                          "seed": 0},
                         {"test_accuracy": 1 - err / ratio, "train_size": 512 * ratio,
                          "P_star": 512, "train_size_over_P_star": ratio, "chance": 0.125},
                         RHM_CONFIG, [0.1, 1 - err])
    text = write_report(tmp_path).read_text()
    assert "### rhm=L2" in text and "### rhm=L3" in text
    assert text.count("| bp | ≤ 1 |") == 2 and text.count("| dfa | not reached |") == 2


def test_sample_complexity_against_depth(tmp_path):
    """Runs at two depths: P at the target per rule and L, with v m^3 and n_c m^L drawn."""
    with ResultsStore(tmp_path) as store:
        store.set_axes([("variant", "variants"), ("rhm", "variants"),
                        ("data.train_size", "values")])
        for depth, p_star in ((3, 512), (4, 2048)):
            config = {"data": {"name": "rhm", "v": 8, "n_classes": 8, "m": 4, "L": depth}}
            for seed in (0, 1):
                for ratio, err_bp in ((1, 0.3), (2, 0.05)):
                    for rule, err in (("bp", err_bp), ("dfa", 0.8)):
                        _run(tmp_path, store, f"{rule}-L{depth}-{ratio}-{seed}",
                             {"variant": rule, "rhm": f"L{depth}",
                              "data.train_size": f"{ratio}P*", "seed": seed},
                             {"test_accuracy": 1 - err, "train_size": p_star * ratio,
                              "P_star": p_star, "train_size_over_P_star": ratio,
                              "chance": 0.125}, config, [0.1, 1 - err])
    text = write_report(tmp_path).read_text()
    assert "## Sample complexity against depth" in text
    # bp: error 0.3 at P*, 0.05 at 2P*: 0.1 is reached at P* 2^(0.2/0.25)
    p3, p4 = (p * 2 ** (0.2 / 0.25) for p in (512, 2048))
    assert f"| bp | {p3:.0f} | {p4:.0f} |" in text
    assert "| dfa | > 1024 | > 4096 |" in text
    assert (tmp_path / "figures" / "complexity_vs_depth.png").read_bytes()[:8] == PNG_MAGIC


def test_one_depth_has_no_depth_section(tmp_path):
    make_rhm_sweep(tmp_path)
    assert "against depth" not in write_report(tmp_path).read_text()


def test_a_pass_that_changes_no_weight_counts_as_untrained(tmp_path):
    from locallearn.experiments.report_leaderboard import untrained as _untrained
    from locallearn.experiments.report_runs import Run

    def make(config):
        return Run({}, 0, {}, {}, tmp_path, config)

    assert _untrained(make({"epochs": 0}))
    assert _untrained(make({"epochs": 1, "rule": {"options": {"plastic": False}}}))
    assert not _untrained(make({"epochs": 1, "rule": {"options": {"plastic": True}}}))
    assert not _untrained(make({"epochs": 3, "rule": {"name": "clapp-image"}}))


def test_leaderboard_ranks_every_rule_with_its_gain_steps_time_and_memory(tmp_path):
    """One row per rule, best probe first; each gain is against the untrained encoder of the
    same network (SoftHebb's own network against its own untrained pass, not VGG-6's); steps
    from metrics.jsonl, minutes from the summary's training seconds."""
    vgg = {"kind": "vgg6", "width_mult": 0.125}
    hebb = {"kind": "vgg6-softhebb", "width_mult": 0.125}
    runs = [  # preset, seed, all, top, epochs, net, options, seconds, rss
        ("random", 0, 0.50, 0.40, 0, vgg, {}, 0.0, 900),
        ("random", 1, 0.52, 0.44, 0, vgg, {}, 0.0, 910),
        ("clapp++", 0, 0.58, 0.47, 3, vgg, {}, 600.0, 1000),
        ("clapp++", 1, 0.61, 0.49, 3, vgg, {}, 660.0, 1020),
        ("softhebb-untrained", 0, 0.53, 0.43, 1, hebb, {"plastic": False}, 30.0, 800),
        ("softhebb", 0, 0.55, 0.45, 3, hebb, {}, 300.0, 820),
    ]
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants")])
        for preset, seed, acc, top, epochs, net, options, seconds, rss in runs:
            run_dir = _run(tmp_path, store, f"{preset}-{seed}", {"preset": preset, "seed": seed},
                           {"rule": preset, "probe_accuracy": acc, "probe_top_accuracy": top,
                            "seconds": seconds, "peak_rss_mib": rss},
                           {"epochs": epochs, "net": net, "data": {"name": "cifar10"},
                            "rule": {"options": options}}, [])
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps({"epoch": e, "step": e * 100, "probe_accuracy": acc}) + "\n"
                for e in range(epochs + 1)))
    text = write_report(tmp_path).read_text()
    board = text.split("## Leaderboard")[1].split("\n## ")[0]
    lines = [line for line in board.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == [
        "clapp++", "softhebb", "softhebb-untrained", "random"]
    assert lines[0] == ("| clapp++ | 0, 1 | 59.5 ± 2.1 | 48.0 ± 1.4 | +8.50 ± 0.71 | "
                        "+6.00 ± 1.41 | 300 ± 0 | 10.5 ± 0.7 | 1010 ± 14 |")
    assert lines[1] == ("| softhebb | 0 | 55.0 | 45.0 | +2.00 | +2.00 | 300 | 5.0 | 820 |")
    assert "| random | 0, 1 | 51.0 ± 1.4 | 42.0 ± 2.8 | untrained | untrained | 0 ± 0 |" \
        in lines[3]


def test_leaderboard_gives_the_curve_at_the_runs_shared_time_budget(tmp_path):
    """Runs sharing ``max_seconds`` get the curve's probe at that time, interpolated between the
    probes around it; a run that ended sooner counts with its last probe; ``at_minutes`` sets
    another time, and a budget that is not a positive number is refused."""
    net = {"kind": "vgg6", "width_mult": 0.125}
    runs = [  # preset, seed, epochs, curve (seconds, accuracy)
        ("random", 0, 0, [(0.0, 0.40)]),
        ("slow", 0, 3, [(0.0, 0.40), (50.0, 0.50), (150.0, 0.70)]),
        ("quick", 0, 3, [(0.0, 0.40), (40.0, 0.60)]),
    ]
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants")])
        for preset, seed, epochs, curve in runs:
            run_dir = _run(tmp_path, store, f"{preset}-{seed}", {"preset": preset, "seed": seed},
                           {"rule": preset, "probe_accuracy": 0.5, "probe_top_accuracy": 0.4,
                            "seconds": curve[-1][0]},
                           {"epochs": epochs, "net": net, "data": {"name": "cifar10"},
                            "max_seconds": 100}, [])
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps({"epoch": i, "step": 10 * i, "seconds": sec, "probe_accuracy": acc})
                + "\n" for i, (sec, acc) in enumerate(curve)))

    def cells(text):
        board = text.split("## Leaderboard")[1].split("\n## ")[0]
        return {line.split(" | ")[0][2:]: line.split(" | ")[6]
                for line in board.splitlines()[1:] if line.startswith("| ") and "---" not in line
                and not line.startswith("| rule")}

    text = write_report(tmp_path).read_text()
    assert "| curve at 1.667 min |" in text
    assert cells(text) == {"slow": "60.0", "quick": "60.0", "random": "40.0"}
    text = write_report(tmp_path, at_minutes=0.5).read_text()
    assert cells(text) == {"slow": "46.0", "quick": "55.0", "random": "40.0"}
    with pytest.raises(ValueError, match="at_minutes=0"):
        write_report(tmp_path, at_minutes=0)
