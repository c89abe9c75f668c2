"""`qgmil benchmark`: the grid of cells, the tables, rerun/resume, shards and early errors."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil.bench import BenchSpec, ModelSpec, load_spec, plan_cells
from qgmil.bench.runner import BenchmarkError, expand_models
from qgmil.cli import main
from qgmil.models import ABLATION_SET

BENCH_YAML = """\
datasets:
  - name: digit-bags
    options: {bags: 40}
train:
  optim.batch_size: 8
  optim.lr: 1.0e-3
  eval.bootstrap: 20
  eval.patience: null
"""
FLAGS = ["--folds", "2", "--seeds", "0", "--epochs", "2"]


def invoke(*args):
    return CliRunner().invoke(main, ["benchmark", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "bench.yaml"
    path.write_text(BENCH_YAML)
    return path


@pytest.fixture(scope="module")
def grid(bench_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = invoke(bench_file, "--models", "abmil,mean_pool,qgmil_light", *FLAGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def summaries(out):
    return {p: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*/*/summary.json"))}


def test_grid_writes_runs_and_tables(grid):
    out, output = grid
    assert output.count("[") >= 3 and "[3/3] qgmil_light on digit-bags" in output  # a progress line per cell
    table = pd.read_csv(out / "results.csv")
    assert list(table["model"]) == ["abmil", "mean_pool", "qgmil_light"]
    assert set(table["dataset"]) == {"digit-bags"} and (table["folds"] == 2).all()
    for metric in ("macro_f1", "auroc", "balanced_accuracy", "ece", "brier"):
        assert {f"{metric}_mean", f"{metric}_std"} <= set(table.columns)
    # every cell shares the prepared data and thus the splits
    assert (out / "data" / "digit-bags" / "labels.csv").exists()
    splits = {m: json.loads((out / "runs" / "digit-bags" / m / "splits.json").read_text()) for m in table["model"]}
    assert splits["abmil"] == splits["mean_pool"] == splits["qgmil_light"]

    md = (out / "results.md").read_text()
    best = table.loc[table["macro_f1_mean"].idxmax()]
    assert f"**{best['macro_f1_mean']:.3f} ± {best['macro_f1_std']:.3f}**" in md
    assert "| model | digit-bags | mean |" in md
    assert "Gain of the best QG-MIL variant over the best baseline" in md
    gains = pd.read_csv(out / "gains.csv")
    assert list(gains["dataset"]) == ["digit-bags", "mean"]
    baseline = table[table["model"] != "qgmil_light"]["macro_f1_mean"].max()
    ours = table[table["model"] == "qgmil_light"]["macro_f1_mean"].item()
    assert gains["gain"].iloc[0] == pytest.approx(ours - baseline)
    assert not (out / "ablation.md").exists()  # no one-off variants in this grid


def test_rerun_skips_finished_cells_and_resumes_unfinished(grid, bench_file):
    out, _ = grid
    before = summaries(out)
    assert len(before) == 3
    result = invoke(bench_file, "--models", "abmil,mean_pool,qgmil_light", *FLAGS, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, skipped") == 3
    assert summaries(out) == before

    # an unfinished cell (its folds done, the report not written) is resumed, not restarted
    unfinished = out / "runs" / "digit-bags" / "mean_pool"
    (unfinished / "summary.json").unlink()
    metrics = unfinished / "folds" / "seed0-fold0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    result = invoke(bench_file, "--models", "abmil,mean_pool,qgmil_light", *FLAGS, "--out", out)
    assert result.exit_code == 0, result.output
    assert "mean_pool on digit-bags: resuming" in result.output
    assert (unfinished / "summary.json").exists() and metrics.stat().st_mtime_ns == stamp

    # --report-only trains nothing and rebuilds the tables
    (out / "results.md").unlink()
    stamps = summaries(out)
    result = invoke(bench_file, "--models", "abmil,mean_pool,qgmil_light", *FLAGS, "--out", out, "--report-only")
    assert result.exit_code == 0, result.output
    assert (out / "results.md").exists() and summaries(out) == stamps and "3/3 cells finished" in result.output


def test_shards_together_cover_the_grid(bench_file, tmp_path):
    out = tmp_path / "sharded"
    args = [bench_file, "--models", "mean_pool,abmil", *FLAGS, "--epochs", "1", "--out", out]
    result = invoke(*args, "--shard", "0/2")
    assert result.exit_code == 0, result.output
    assert [p.parent.name for p in summaries(out)] == ["mean_pool"]
    assert "1/2 cells finished" in result.output
    result = invoke(*args, "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert sorted(p.parent.name for p in summaries(out)) == ["abmil", "mean_pool"]
    assert len(pd.read_csv(out / "results.csv")) == 2
    assert invoke(*args, "--shard", "2/2").exit_code == 2


@pytest.mark.parametrize("flag, value, message", [
    ("--models", "abmil,nope", "unknown model 'nope'"),
    ("--datasets", "no-such-data", "unknown dataset 'no-such-data'"),
])
def test_bad_names_fail_before_anything_runs(tmp_path, flag, value, message):
    out = tmp_path / "out"
    args = {"--models": "abmil", "--datasets": "digit-bags", flag: value}
    result = invoke("--models", args["--models"], "--datasets", args["--datasets"], "--out", out)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [musk1]\nmodels: [abmil]\nfoldz: 3\n")
    result = invoke(bad, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "foldz" in result.output
    bad.write_text("datasets: [musk1]\nmodels: [{name: abmil, overide: {}}]\n")
    with pytest.raises(BenchmarkError, match=r"models\.0\.overide"):
        load_spec(bad)
    bad.write_text("datasets: [musk1]\nmodels: [abmil]\ntrain: {optim.epoch: 3}\n")
    result = invoke(bad, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "optim.epoch" in result.output and not (tmp_path / "out").exists()
    bad.write_text("datasets: [{name: digit-bags, options: {bagz: 3}}]\nmodels: [abmil]\n")
    result = invoke(bad, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "bagz" in result.output


def test_groups_order_and_yaml_models(tmp_path):
    assert [m.name for m in expand_models([ModelSpec(name="ablation")])] == list(ABLATION_SET)
    baselines = [m.name for m in expand_models([ModelSpec(name="baselines")])]
    assert "abmil" in baselines and not any(n.startswith("qgmil") for n in baselines)
    spec = BenchSpec.model_validate({
        "datasets": ["musk1", {"name": "elephant", "label": "eleph"}],
        "models": ["abmil", {"name": "qgmil", "overrides": {"dropout": 0.0}, "label": "qgmil-d0"}],
        "folds": 3, "train": {"optim.epochs": 4},
    })
    cells = plan_cells(spec, tmp_path)
    assert [(c.index, c.dataset, c.model) for c in cells] == [
        (0, "musk1", "abmil"), (1, "musk1", "qgmil-d0"), (2, "eleph", "abmil"), (3, "eleph", "qgmil-d0")]
    assert cells[1].config.model.overrides == {"dropout": 0.0} and cells[1].config.optim.epochs == 4
    assert cells[3].run_dir == tmp_path / "runs" / "eleph" / "qgmil-d0"
    assert cells[2].config.data.builtin_dir == cells[3].config.data.builtin_dir == tmp_path / "data" / "eleph"
    # flags override the file; a flagged dataset keeps the file's options
    path = tmp_path / "b.yaml"
    path.write_text(BENCH_YAML + "models: [abmil]\nfolds: 4\n")
    spec = load_spec(path, models=["mean_pool"], folds=2, train={"optim.epochs": 1})
    assert [m.name for m in spec.models] == ["mean_pool"] and spec.folds == 2
    assert spec.datasets[0].options == {"bags": 40} and spec.train["optim.batch_size"] == 8
    assert spec.train["optim.epochs"] == 1
    with pytest.raises(BenchmarkError, match="twice"):
        plan_cells(BenchSpec(datasets=["musk1"], models=["abmil", "abmil"]), tmp_path)


def test_ablation_and_gain_tables_from_results():
    from qgmil.bench.runner import compute_gains, format_ablation, format_results

    rows = [("qgmil", "a", 0.80), ("qgmil_wo_gate", "a", 0.75), ("abmil", "a", 0.78),
            ("qgmil", "b", 0.60), ("qgmil_wo_gate", "b", 0.62), ("abmil", "b", 0.65)]
    results = pd.DataFrame([{"model": m, "model_name": m, "dataset": d, "macro_f1_mean": f, "macro_f1_std": 0.01}
                            for m, d, f in rows])
    gains = compute_gains(results, ["a", "b"])
    assert gains["gain"].tolist() == pytest.approx([0.02, -0.03, -0.005])
    assert list(gains["best_qgmil"][:2]) == ["qgmil", "qgmil_wo_gate"]
    md = format_results(results, ["qgmil", "qgmil_wo_gate", "abmil"], ["a", "b"], gains)
    assert "| qgmil | **0.800 ± 0.010** | 0.600 ± 0.010 | 0.700 |" in md
    assert "| abmil | 0.780 ± 0.010 | **0.650 ± 0.010** | **0.715** |" in md
    assert "a +0.020 (qgmil vs abmil); b -0.030 (qgmil_wo_gate vs abmil); mean -0.005" in md
    ablation = format_ablation(results, ["a", "b"])
    assert "| qgmil (full) | 0.800 | 0.600 | 0.700 |" in ablation
    assert "| qgmil_wo_gate | 0.750 (-0.050) | 0.620 (+0.020) | 0.685 (-0.015) |" in ablation
    assert format_ablation(results[results["model"] != "qgmil_wo_gate"], ["a", "b"]) is None
