"""Probes during training (``probe_every``), the k-NN read-out, finished runs, bf16 and compile.

Runs use the tiny image-folder dataset of ``test_image_task`` (16x16 PNGs, two classes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from image_folder import folder_config, write_dataset

from locallearn import cli
from locallearn.eval.knn import knn_accuracy, knn_predict
from locallearn.experiments.image_task import ImageTask
from locallearn.experiments.runs import run
from locallearn.schema import load_config

RHM_CLAPP = str(Path(__file__).resolve().parents[1] / "configs" / "rhm" / "clapp.yaml")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """Two classes of 16x16 PNGs (blue and red with a bright line): 32 train, 12 test."""
    root = tmp_path_factory.mktemp("images")
    write_dataset(root, {"train": 16, "test": 6})
    return root


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_knn_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 7, generator=gen) * torch.linspace(0.5, 3, 7)
    labels = torch.randint(0, 4, (50,), generator=gen)
    query = torch.randn(13, 7, generator=gen)
    k, temp = 5, 0.1
    mean, std = ref.mean(0), ref.std(0, unbiased=False)
    r = (ref - mean) / std
    r = r / r.norm(dim=1, keepdim=True)
    expected = []
    for q in query:
        q = (q - mean) / std
        q = q / q.norm()
        sims = [(float(q @ r[j]), j) for j in range(50)]
        votes = [0.0] * 4
        for sim, j in sorted(sims, reverse=True)[:k]:
            votes[int(labels[j])] += float(torch.tensor(sim / temp).exp())
        expected.append(max(range(4), key=votes.__getitem__))
    got = knn_predict(ref, labels, query, 4, k=k, temperature=temp, chunk=4)
    assert got.tolist() == expected
    # two separated clusters are read out perfectly
    a = torch.randn(20, 3, generator=gen) + torch.tensor([5.0, 0, 0])
    b = torch.randn(20, 3, generator=gen) - torch.tensor([5.0, 0, 0])
    feats, y = torch.cat([a, b]), torch.tensor([0] * 20 + [1] * 20)
    assert knn_accuracy(feats[::2], y[::2], feats[1::2], y[1::2], 2, k=3) == 1.0
    with pytest.raises(ValueError, match="k-NN"):
        knn_predict(ref, labels, query[:, :3], 4)


def test_probe_every_half_epoch_logs_rows_and_leaves_training_unchanged(tmp_path, image_root):
    # 32 images, batch 8: 4 steps per epoch; probes at steps 0, 2, 4, 6, 8
    extra = {"epochs": 2, "probe.curve_train": 10, "probe.curve_test": 8, "probe.curve_k": 3,
             "rule.options": {"context": "same"}}
    plain = run(load_config(folder_config(tmp_path, image_root, **extra)), tmp_path / "plain")
    cfg = load_config(folder_config(tmp_path, image_root, probe_every=0.5, **extra))
    probed = run(cfg, tmp_path / "probed")
    rows = [r for r in _rows(tmp_path / "probed") if "probe_accuracy" in r]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    assert [r["epoch"] for r in rows] == [0, 0.5, 1, 1.5, 2]
    seconds = [r["seconds"] for r in rows]
    assert seconds[0] == 0 and all(b >= a for a, b in zip(seconds, seconds[1:]))
    assert seconds[-1] == pytest.approx(probed["seconds"], abs=1e-3)
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 and r["curve_seconds"] >= 0 for r in rows)
    # the probe reads a fixed subset: the step-0 probe is the random encoder's, the same each run
    again = run(cfg, tmp_path / "again")
    assert _rows(tmp_path / "again")[0]["probe_accuracy"] == rows[0]["probe_accuracy"]
    assert again["probe_accuracy"] == probed["probe_accuracy"]
    # probing draws no random numbers: the trained encoder is the one trained without probes
    assert probed["probe_accuracy"] == plain["probe_accuracy"]
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "probed" / "checkpoint.pt", weights_only=False)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_curve_probe_reads_a_fixed_labelled_subset(tmp_path, image_root):
    cfg = load_config(folder_config(tmp_path, image_root, **{"probe.curve_train": 10,
                                                       "probe.curve_test": 5}))
    task = ImageTask(cfg, torch.device("cpu"))
    net = task.build_net()
    first = task.curve_probe(net)["probe_accuracy"]
    tr_x, tr_y, te_x, te_y = task._curve_data
    assert tr_x.shape[0] == 10 and te_x.shape[0] == 5
    assert first == task.curve_probe(net)["probe_accuracy"]
    assert min(abs(first - i / 5) for i in range(6)) < 1e-6


def test_probe_every_needs_a_task_with_a_probe(tmp_path, capsys):
    code = cli.main(["run", RHM_CLAPP, "probe_every=1", "epochs=1", "data.train_size=64",
                     "data.test_size=8", "progress=false", "--out", str(tmp_path / "rhm")])
    err = capsys.readouterr().err
    assert code == 2 and "probe_every=1" in err and "Traceback" not in err
    code = cli.main(["run", RHM_CLAPP, "probe_every=-1", "--out", str(tmp_path)])
    assert code == 2 and "probe_every" in capsys.readouterr().err


def test_a_finished_run_is_not_probed_again(tmp_path, image_root, capsys, monkeypatch):
    config = folder_config(tmp_path, image_root)
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    before = (out / "summary.json").read_text()
    capsys.readouterr()

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(ImageTask, "final_metrics", no_probe)
    monkeypatch.setattr(ImageTask, "probe", no_probe)
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "finished" in shown and "probe_accuracy" in shown
    assert (out / "summary.json").read_text() == before
    # more epochs extend the finished run (and probe it again)
    monkeypatch.undo()
    assert cli.main(["run", str(config), "epochs=2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_report_plots_probe_curves_with_the_random_encoder_line(tmp_path):
    from locallearn.experiments.probe_curves import curve_points, random_levels
    from locallearn.experiments.report import write_report
    from locallearn.experiments.results import ResultsStore

    curves = {"clapp++": [0.30, 0.40, 0.50], "clapp": [0.30, 0.32, 0.33]}
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants")])
        for preset, accs in curves.items():
            for seed in (0, 1):
                run_dir = tmp_path / "runs" / f"{preset}-{seed}"
                run_dir.mkdir(parents=True)
                (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"name": "x"}}))
                rows = [{"epoch": i / 2, "step": 10 * i, "seconds": 3.0 * i,
                         "probe_accuracy": a + 0.01 * seed} for i, a in enumerate(accs)]
                rows.insert(1, {"epoch": 0.25, "step": 5, "loss": 1.0})  # a row without probe
                (run_dir / "metrics.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows))
                store.record(f"runs/{preset}-{seed}", {"preset": preset, "seed": seed},
                             {"rule": preset, "probe_accuracy": accs[-1]}, "test")
    text = write_report(tmp_path).read_text()
    assert "## Probe accuracy during training" in text
    assert "random encoder: 30.5 %" in text
    png = tmp_path / "figures" / "probe_curves_all.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in
            (tmp_path / "runs" / "clapp-1" / "metrics.jsonl").read_text().splitlines()]
    assert curve_points(rows) == [(0, 0.0, 0.31), (10, 3.0, 0.33), (20, 6.0, 0.34)]
    assert random_levels({"a": [rows]}) == {"": pytest.approx(0.31)}


def test_bf16_run_probes_with_a_bf16_encoder(tmp_path, image_root):
    cfg = load_config(folder_config(tmp_path, image_root, precision="bf16", probe_every=1,
                              **{"probe.curve_train": 10, "probe.curve_test": 8}))
    summary = run(cfg, tmp_path / "bf16")
    assert "bf16 encoder" in summary["probe_protocol"]
    assert 0.0 <= summary["probe_accuracy"] <= 1.0
    rows = [r for r in _rows(tmp_path / "bf16") if "probe_accuracy" in r]
    assert [r["step"] for r in rows] == [0, 4]


def test_probe_curves_draw_one_untrained_level_per_network(tmp_path):
    """Rules on different networks (the own-network table): the figure's note gives each
    network's untrained level, not one mean over networks that describes none of them."""
    from locallearn.experiments.probe_curves import random_levels
    from locallearn.experiments.report import write_report
    from locallearn.experiments.results import ResultsStore

    runs = {"softhebb": ("softhebb", 1.0, [0.60, 0.70]), "lpl": ("vgg11", 0.25, [0.40, 0.45])}
    with ResultsStore(tmp_path) as store:
        store.set_axes([("preset", "variants")])
        for preset, (kind, width, accs) in runs.items():
            run_dir = tmp_path / "runs" / preset
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(
                {"data": {"name": "x"}, "net": {"kind": kind, "width_mult": width}}))
            rows = [{"epoch": i, "step": 10 * i, "seconds": 2.0 * i, "probe_accuracy": a}
                    for i, a in enumerate(accs)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            store.record(f"runs/{preset}", {"preset": preset, "seed": 0},
                         {"rule": preset, "probe_accuracy": accs[-1]}, "test")
    text = write_report(tmp_path).read_text()
    assert "untrained networks: softhebb 60.0 %, vgg11 x0.25 40.0 %" in text
    assert "random encoder" not in text
    curves = {"a": [[{"step": 0, "probe_accuracy": 0.2}]],
              "b": [[{"step": 0, "probe_accuracy": 0.4}]]}
    assert random_levels(curves) == {"": pytest.approx(0.3)}
    assert random_levels(curves, {"a": "n1", "b": "n2"}) == {"n1": 0.2, "n2": 0.4}
