"""Attention-mass analysis: exact metrics on hand-made distributions, and `qgmil explain mass` end to end."""

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.explain import bag_metrics, localisation, lorenz_curve, run_metrics, summarize

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n", [1, 7, 30, 100, 1001])
def test_uniform(n):
    m = bag_metrics(np.full(n, 1.0 / n))
    assert m["n_instances"] == n
    assert m["norm_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert m["effective_n"] == pytest.approx(n, rel=1e-12)
    assert m["effective_fraction"] == pytest.approx(1.0, rel=1e-12)
    assert m["gini"] == pytest.approx(0.0, abs=1e-12)
    assert m["max_weight"] == pytest.approx(1.0 / n, rel=1e-12)
    for p in (1, 5, 10):
        assert m[f"top_{p}pct_mass"] == pytest.approx(max(1, math.ceil(p * n / 100)) / n, rel=1e-12)
    for k in (1, 5, 10):
        assert m[f"top_{k}_mass"] == pytest.approx(min(k, n) / n, rel=1e-12)


def test_top_percent_counts_in_integers():
    assert bag_metrics(np.full(30, 1 / 30))["top_10pct_mass"] == pytest.approx(3 / 30)  # 0.1 * 30 > 3 in floats


@pytest.mark.parametrize("n", [2, 10, 57])
def test_one_hot(n):
    a = np.zeros(n)
    a[n // 2] = 1.0
    m = bag_metrics(a)
    assert m["norm_entropy"] == 0.0
    assert m["effective_n"] == 1.0 and m["effective_fraction"] == pytest.approx(1 / n)
    assert m["gini"] == pytest.approx((n - 1) / n, abs=1e-12)
    assert m["max_weight"] == 1.0
    assert all(m[k] == 1.0 for k in ("top_1pct_mass", "top_5pct_mass", "top_10pct_mass", "top_1_mass", "top_10_mass"))


def test_two_level_by_hand():
    # 2 instances of 0.3 and 8 of 0.05 (N = 10)
    a = np.array([0.3, 0.3] + [0.05] * 8)
    m = bag_metrics(a)
    h = -(2 * 0.3 * math.log(0.3) + 8 * 0.05 * math.log(0.05))
    assert m["norm_entropy"] == pytest.approx(h / math.log(10), rel=1e-12)
    assert m["effective_n"] == pytest.approx(1 / (2 * 0.09 + 8 * 0.0025), rel=1e-12)  # 1 / 0.2 = 5
    assert m["effective_n"] == pytest.approx(5.0, rel=1e-12)
    assert m["effective_fraction"] == pytest.approx(0.5, rel=1e-12)
    assert m["top_1pct_mass"] == m["top_5pct_mass"] == m["top_10pct_mass"] == pytest.approx(0.3)  # ceil -> 1
    assert m["top_5_mass"] == pytest.approx(0.3 + 0.3 + 3 * 0.05)
    assert m["top_10_mass"] == pytest.approx(1.0)
    # pairwise: 2 * 8 pairs (each ordered twice) differ by 0.25 -> sum |ai - aj| = 2 * 16 * 0.25 = 8;
    # G = 8 / (2 N^2 mean) = 8 / (2 * 100 * 0.1) = 0.4
    assert m["gini"] == pytest.approx(0.4, abs=1e-12)
    assert m["max_weight"] == 0.3


def test_permutation_invariance_and_renormalisation():
    rng = np.random.default_rng(0)
    a = rng.random(83)
    a /= a.sum()
    m = bag_metrics(a)
    for _ in range(3):
        assert bag_metrics(rng.permutation(a)) == pytest.approx(m, rel=1e-12)
    assert bag_metrics(a * (1 + 5e-4)) == pytest.approx(m, rel=1e-12)  # within 1e-3: renormalised
    labels = rng.random(83) < 0.2
    perm = rng.permutation(83)
    assert localisation(a[perm], labels[perm]) == pytest.approx(localisation(a, labels), rel=1e-12)


def test_localisation_with_ties():
    a = np.array([0.4, 0.2, 0.2, 0.1, 0.1])
    labels = np.array([1, 1, 0, 0, 1])
    loc = localisation(a, labels)
    assert loc["attention_on_positives"] == pytest.approx(0.7)
    assert loc["positive_share"] == pytest.approx(0.6) and loc["n_positive"] == 3
    # pairs (pos, neg): 0.4 > 0.2, 0.4 > 0.1 | 0.2 = 0.2 (half), 0.2 > 0.1 | 0.1 < 0.2, 0.1 = 0.1 (half)
    assert loc["instance_auroc"] == pytest.approx((2 + 1.5 + 0.5) / 6, abs=1e-12)
    only_neg = localisation(a, np.zeros(5))
    assert math.isnan(only_neg["instance_auroc"]) and math.isnan(only_neg["attention_on_positives"])
    assert math.isnan(localisation(a, np.ones(5))["instance_auroc"])


def test_lorenz_curve():
    grid = np.linspace(0, 1, 11)
    assert lorenz_curve(np.full(4, 0.25), grid) == pytest.approx(grid)
    assert lorenz_curve(np.array([0, 1.0, 0, 0]), grid)[-1] == pytest.approx(1.0)
    assert lorenz_curve(np.array([0, 1.0, 0, 0]), grid)[3] == pytest.approx(1.0)  # 0.3 > 1/4


@pytest.mark.parametrize("bad, match", [
    (np.full((2, 2), 0.25), "1-D"), (np.array([]), "empty"), (np.array([0.5, np.nan]), "NaN"),
    (np.array([1.5, -0.5]), "negative"), (np.array([0.5, 0.4]), "sum to 1"),
])
def test_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        bag_metrics(bad)
    with pytest.raises(ValueError, match=match):
        localisation(bad, np.zeros(bad.shape))


def test_localisation_length_mismatch():
    with pytest.raises(ValueError, match="instance labels"):
        localisation(np.full(4, 0.25), [1, 0, 0])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from qgmil.data import prepare_dataset
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    root = tmp_path_factory.mktemp("mass")
    data = root / "digits"
    prepare_dataset("digit-bags", data, bags=40, progress=False)
    runs = {}
    for model in ("abmil", "mean_pool"):
        config = load_config(None, [], {
            "data.table": data / "labels.csv", "data.features": data / "features", "eval.folds": 2,
            "optim.epochs": 2, "optim.batch_size": 8, "runtime.progress": False, "runtime.tensorboard": False,
            "model.name": model, "eval.bootstrap": 20})
        train_run(config, root / model)
        runs[model] = root / model
    return runs


def test_explain_mass_cli(two_runs, tmp_path):
    out = tmp_path / "mass"
    result = CliRunner().invoke(main, ["explain", "mass", str(two_runs["abmil"]), str(two_runs["mean_pool"]),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("mass_per_bag.csv", "mass_summary.csv", "mass_summary.md", "lorenz.png", "mass_boxplots.png"):
        assert (out / name).is_file(), name
    assert (out / "lorenz.png").read_bytes()[:8] == PNG and (out / "mass_boxplots.png").read_bytes()[:8] == PNG

    frame = pd.read_csv(out / "mass_per_bag.csv", dtype={"bag_id": str})
    n_test = sum(len(pd.read_csv(run / "predictions.csv")) for run in two_runs.values())
    assert len(frame) == n_test == 80  # every bag is a test bag once (2 folds, 1 seed), in both runs
    assert set(frame["model"]) == {"abmil", "mean_pool"} and set(frame["dataset"]) == {"digits"}
    assert {"attention_on_positives", "positive_share", "instance_auroc", "n_positive"} <= set(frame.columns)
    assert frame["n_positive"].notna().all() and frame.loc[frame["label"] == "positive", "n_positive"].gt(0).all()
    mean = frame[frame["model"] == "mean_pool"]
    assert np.allclose(mean["norm_entropy"], 1.0, atol=1e-6) and np.allclose(mean["effective_fraction"], 1.0, atol=1e-6)
    assert np.allclose(mean["gini"], 0.0, atol=1e-6)
    # uniform attention puts exactly the positive share on the positives
    pos = mean[mean["n_positive"] > 0]
    assert np.allclose(pos["attention_on_positives"], pos["positive_share"], atol=1e-6)

    summary = pd.read_csv(out / "mass_summary.csv")
    assert list(summary["model"]) == ["abmil", "mean_pool"] and list(summary["bags"]) == [40, 40]
    md = (out / "mass_summary.md").read_text()
    assert md.splitlines()[0].startswith("| model | dataset | bags | normalised entropy")
    assert "instance AUROC" in md and "| mean_pool | digits | 40 | 1.000 ± 0.000 | 1.000 ± 0.000 |" in md
    assert md.strip() in result.output and str(out / "lorenz.png") in result.output
    assert summarize(run_metrics(two_runs["mean_pool"]))["bags"].tolist() == [40]


def test_explain_mass_bad_run_dirs(two_runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["explain", "mass", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and str(tmp_path) in result.output and "run.json" in result.output
    # a run without attention (eval.save_attention=false): here, its attention files removed
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(two_runs["mean_pool"], run)
    for path in run.glob("folds/*/attention.h5"):
        path.unlink()
    result = runner.invoke(main, ["explain", "mass", str(run), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and str(run) in result.output and "save_attention" in result.output


def test_write_mass_report(two_runs, tmp_path, monkeypatch):
    from qgmil.explain import MassError, write_mass_report
    from qgmil.explain import mass_report

    out = tmp_path / "report"
    report = write_mass_report([two_runs["abmil"], two_runs["mean_pool"]], out)
    names = ["mass_per_bag.csv", "mass_summary.csv", "mass_summary.md", "lorenz.png", "mass_boxplots.png"]
    assert report.written == [out / n for n in names] and report.note is None
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert (out / "lorenz.png").read_bytes()[:8] == PNG and (out / "mass_boxplots.png").read_bytes()[:8] == PNG
    assert (out / "mass_summary.md").read_text() == report.table + "\n"
    lines = report.table.splitlines()
    assert lines[0].startswith("| model | dataset | bags | normalised entropy") and len(lines) == 4
    assert lines[2].startswith("| abmil | digits | 40 |")
    assert lines[3].startswith("| mean_pool | digits | 40 | 1.000 ± 0.000")
    assert len(report.per_bag) == 80 and list(report.summary["model"]) == ["abmil", "mean_pool"]
    frame = pd.read_csv(out / "mass_per_bag.csv", dtype={"bag_id": str})
    assert list(frame.columns) == list(report.per_bag.columns)
    assert frame["bag_id"].tolist() == report.per_bag["bag_id"].tolist()

    # without matplotlib: the tables, and a note saying why there are no figures
    def no_matplotlib(**kwargs):
        raise ImportError("figures need matplotlib: pip install 'qgmil[plots]'")

    monkeypatch.setattr(mass_report, "new_figure", no_matplotlib)
    bare = write_mass_report([two_runs["mean_pool"]], tmp_path / "bare")
    assert bare.written == [tmp_path / "bare" / n for n in names[:3]]
    assert bare.note == "no figures: figures need matplotlib: pip install 'qgmil[plots]'"
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == sorted(names[:3])

    # a directory that is not a run: the error names it, and no report folder is made
    with pytest.raises(MassError, match="run.json"):
        write_mass_report([tmp_path], tmp_path / "none")
    assert not (tmp_path / "none").exists()
