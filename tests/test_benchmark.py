"""`qgmil benchmark`: the grid of cells, the tables, rerun/resume, shards and early errors."""

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil.bench import BenchmarkError, BenchSpec, ModelSpec, expand_models, load_spec, plan_cells
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
  runtime.threads: 1  # as in the workers: torch's float sums may depend on the thread count
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
    from qgmil.bench.tables import compute_gains, format_ablation, format_results

    rows = [("qgmil", "a", 0.80), ("qgmil_wo_gate", "a", 0.75), ("abmil", "a", 0.78),
            ("qgmil", "b", 0.60), ("qgmil_wo_gate", "b", 0.62), ("abmil", "b", 0.65)]
    results = pd.DataFrame([{"model": m, "model_name": m, "dataset": d, "folds": 15, "macro_f1_mean": f,
                             "macro_f1_std": 0.01} for m, d, f in rows])
    gains = compute_gains(results, ["a", "b"])
    assert gains["gain"].tolist() == pytest.approx([0.02, -0.03, -0.005])
    assert list(gains["best_qgmil"][:2]) == ["qgmil", "qgmil_wo_gate"]
    md = format_results(results, ["qgmil", "qgmil_wo_gate", "abmil"], ["a", "b"], gains)
    assert "| qgmil | **0.800 ± 0.010** | 0.600 ± 0.010 | 0.700 |" in md
    assert "| abmil | 0.780 ± 0.010 | **0.650 ± 0.010** | **0.715** |" in md
    assert "a +0.020 (qgmil vs abmil); b -0.030 (qgmil_wo_gate vs abmil); mean -0.005" in md
    assert "mean ± std over the 15 (seed, fold) test parts of each cell" in md
    ablation = format_ablation(results, ["a", "b"])
    assert "| qgmil (full) | 0.800 | 0.600 | 0.700 |" in ablation
    assert "| qgmil_wo_gate | 0.750 (-0.050) | 0.620 (+0.020) | 0.685 (-0.015) |" in ablation
    assert format_ablation(results[results["model"] != "qgmil_wo_gate"], ["a", "b"]) is None


def test_ablation_pairs_each_variant_with_full_qgmil(bench_file, tmp_path):
    from qgmil.bench.stats import paired_comparison
    from qgmil.rundir import RunDir

    out = tmp_path / "out"
    result = invoke(bench_file, "--models", "qgmil,qgmil_wo_gate", "--folds", "2", "--seeds", "0,1", "--epochs", "1",
                    "--out", out)
    assert result.exit_code == 0, result.output
    full = RunDir(out / "runs" / "digit-bags" / "qgmil").fold_scores()
    variant = RunDir(out / "runs" / "digit-bags" / "qgmil_wo_gate").fold_scores()
    assert sorted(full) == sorted(variant) == [(s, f) for s in (0, 1) for f in (0, 1)]
    expected = paired_comparison([variant[k] for k in sorted(full)], [full[k] for k in sorted(full)])
    row = pd.read_csv(out / "ablation.csv").iloc[0]
    assert (row["dataset"], row["qgmil"], row["baseline"], row["pairs"]) == ("digit-bags", "qgmil_wo_gate", "qgmil", 4)
    assert row["mean_diff"] == pytest.approx(expected["mean_diff"])
    assert (row["wins"], row["ties"], row["losses"]) == (expected["wins"], expected["ties"], expected["losses"])
    md = (out / "ablation.md").read_text()
    assert "| dataset | variant | against | pairs |" in md and "| digit-bags | qgmil_wo_gate | qgmil | 4 |" in md


def test_grid_writes_latex_metric_significance_mass_tables_and_plots(grid):
    out, output = grid
    tex = (out / "results.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "qgmil\\_light" in tex and "mean\\_pool" in tex and "\\textbf{" in tex and "$\\pm$" in tex
    table = pd.read_csv(out / "results.csv")
    assert (table["seconds"] > 0).all()
    assert "| model | digit-bags | mean |" in (out / "auroc.md").read_text()
    calibration = (out / "calibration.md").read_text()
    assert "## ECE (lower is better)" in calibration and "## Brier score (lower is better)" in calibration
    lowest = table.loc[table["ece_mean"].idxmin()]
    assert f"**{lowest['ece_mean']:.3f} ± {lowest['ece_std']:.3f}**" in calibration

    tests = pd.read_csv(out / "significance.csv")
    assert list(tests["baseline"]) == ["abmil", "mean_pool"] and set(tests["qgmil"]) == {"qgmil_light"}
    assert (tests["pairs"] == 2).all() and tests["wilcoxon_p"].isna().all()  # 2 folds: too few for Wilcoxon
    assert (tests[["wins", "ties", "losses"]].sum(axis=1) == 2).all()
    assert "n/a [a]" in (out / "significance.md").read_text()

    mass = pd.read_csv(out / "attention_mass.csv")
    assert list(mass["model"]) == ["abmil", "mean_pool", "qgmil_light"]
    assert (mass["bags"] == 40).all() and mass["instance_auroc_mean"].notna().all()  # digit bags have instance labels
    assert mass.loc[mass["model"] == "mean_pool", "norm_entropy_mean"].item() == pytest.approx(1.0)
    assert "instance AUROC" in (out / "attention_mass.md").read_text()
    for name in ("results.png", "ranks.png"):
        assert (out / name).stat().st_size > 5_000 and (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results.png, ranks.png" in output


def test_workers_match_sequential_and_failures_are_reported(grid, bench_file, tmp_path):
    out, _ = grid
    broken = tmp_path / "broken"  # a dataset directory whose feature files are missing: its cells fail in training
    (broken / "features").mkdir(parents=True)
    (broken / "labels.csv").write_text("bag_id,label\n" + "".join(f"b{i},{'ab'[i % 2]}\n" for i in range(6)))
    spec = tmp_path / "two.yaml"
    spec.write_text(BENCH_YAML.replace("train:", f"  - {broken}\ntrain:"))
    parallel = tmp_path / "parallel"
    result = invoke(spec, "--models", "mean_pool,qgmil_light", *FLAGS, "--workers", "2", "--out", parallel)
    assert result.exit_code == 1
    assert "in 2 worker processes" in result.output
    assert result.output.count("FAILED: DataError") == 2 and "qgmil_light on broken: DataError" in result.output
    assert "feature file for bag 'b0' not found" in (parallel / "failures.txt").read_text()
    # the other dataset's cells finished with the same results as in the sequential run
    sequential, table = pd.read_csv(out / "results.csv"), pd.read_csv(parallel / "results.csv")
    assert list(table["dataset"]) == ["digit-bags"] * 2
    columns = [c for c in table.columns if c != "seconds"]
    sequential = sequential[sequential["model"] != "abmil"].reset_index(drop=True)
    pd.testing.assert_frame_equal(table[columns], sequential[columns], rtol=0, atol=1e-6)
    for model in ("mean_pool", "qgmil_light"):  # fold by fold
        runs = [root / "runs" / "digit-bags" / model / "predictions.csv" for root in (out, parallel)]
        pd.testing.assert_frame_equal(*map(pd.read_csv, runs), rtol=0, atol=1e-6)


def test_builtin_preset_resolves_and_flags_override_it(tmp_path):
    from qgmil.bench import builtin_spec_text

    spec = load_spec(builtin=True)
    cells = plan_cells(spec, tmp_path)
    assert [d.name for d in spec.datasets] == ["musk1", "musk2", "elephant", "digit-bags"]
    assert spec.datasets[3].options == {"bags": 200} and spec.folds == 5 and spec.seeds == [0, 1, 2]
    models = list(dict.fromkeys(c.model for c in cells))
    assert models[:len(ABLATION_SET)] == list(ABLATION_SET)
    assert models[len(ABLATION_SET):] == ["transformer_mil", "abmil_gated", "clam_sb", "dsmil", "mean_pool"]
    assert len(cells) == 4 * len(models) and cells[0].config.optim.epochs == 25 and spec.workers == 2
    assert "musk2" in builtin_spec_text()
    spec = load_spec(builtin=True, folds=3, workers=1, train={"optim.epochs": 5})
    assert (spec.folds, spec.workers, spec.train["optim.epochs"], spec.train["optim.lr"]) == (3, 1, 5, 2e-4)
    with pytest.raises(BenchmarkError, match="not both"):
        load_spec(tmp_path / "x.yaml", builtin=True)
    # the command line: the preset; --report-only with nothing finished is an error that names --out and
    # writes nothing there (no empty tables that look like a result); --out is required without --builtin
    (tmp_path / "empty").mkdir()
    for out, problem in ((tmp_path / "b", "does not exist"), (tmp_path / "empty", "has no finished cell")):
        result = CliRunner().invoke(main, ["benchmark", "--builtin", "--report-only", "--out", str(out)])
        assert result.exit_code != 0 and f"{out} {problem}" in result.output, result.output
        assert "nothing to report" in result.output
    assert not (tmp_path / "b").exists() and not list((tmp_path / "empty").iterdir())
    assert "--out" in invoke("--datasets", "musk1", "--models", "abmil").output


def test_tables_without_matplotlib_skip_the_figures_with_a_note(grid, bench_file, tmp_path, monkeypatch):
    import qgmil.bench.plots
    from qgmil.bench import build_tables

    def no_matplotlib(*args, **kwargs):
        raise ImportError("plotting needs matplotlib: pip install 'qgmil[plots]'")

    monkeypatch.setattr(qgmil.bench.plots, "results_bars", no_matplotlib)
    out, _ = grid
    cells = plan_cells(load_spec(bench_file, models=["abmil", "mean_pool", "qgmil_light"], folds=2), out)
    notes = []
    tables = build_tables(tmp_path, cells, echo=notes.append)
    assert tables["finished"] == 3 and tables["figures"] == [] and not list(tmp_path.glob("*.png"))
    assert notes == ["no figures: plotting needs matplotlib: pip install 'qgmil[plots]'"]
    assert (tmp_path / "results.tex").exists() and (tmp_path / "significance.md").exists()


def test_demo_is_the_demo_preset_through_the_runner(tmp_path):
    from qgmil.bench import run_demo
    from qgmil.bench.demo import demo_spec
    from qgmil.rundir.config import load_config

    out = tmp_path.resolve()
    # the preset holds exactly the settings the hand-written demo used, so the README's demo numbers stand
    cells = plan_cells(demo_spec(), out, progress=True)
    assert [(c.dataset, c.model) for c in cells] == [
        (d, m) for d in ("musk1", "elephant", "digit-bags") for m in ("qgmil", "abmil_gated")]
    for cell in cells:
        old = load_config(None, [], {
            "data.builtin": cell.dataset, "data.builtin_options": {"bags": 200} if cell.dataset == "digit-bags" else {},
            "data.builtin_dir": out / "data" / cell.dataset, "model.name": cell.model, "eval.folds": 5,
            "eval.seeds": [0], "optim.epochs": 30, "optim.batch_size": 16, "optim.lr": 2e-4, "eval.patience": 10,
            "eval.min_epochs": 10, "runtime.progress": True, "runtime.tensorboard": False})
        assert cell.config.model_dump() == old.model_dump()
        assert cell.run_dir == out / "runs" / cell.dataset / cell.model
    assert demo_spec().workers == 1

    # a tiny demo: the benchmark's layout and report, with the summary table it prints
    result = run_demo(out, datasets=["musk1", "digit-bags"], models=["qgmil"], folds=2, epochs=1, progress=False)
    assert result["failures"] == [] and result["finished"] == 2
    saved = load_spec(out / "benchmark.yaml")
    assert [(d.name, d.options) for d in saved.datasets] == [("musk1", {}), ("digit-bags", {"bags": 200})]
    assert (saved.folds, saved.seeds, saved.train["optim.epochs"], saved.train["optim.lr"]) == (2, [0], 1, 2e-4)
    summary = result["summary"]
    assert list(zip(summary["dataset"], summary["model"])) == [("musk1", "qgmil"), ("digit-bags", "qgmil")]
    assert summary["attention_on_positives"].isna().tolist() == [True, False]  # only digit bags have instance labels
    mass = pd.read_csv(out / "attention_mass.csv")
    on_digits = mass.loc[mass["dataset"] == "digit-bags", "attention_on_positives_mean"].item()
    assert summary["attention_on_positives"].iloc[1] == pytest.approx(on_digits)
    md = (out / "summary.md").read_text()
    assert md == result["summary_md"] + "\n"
    assert "| dataset | model | macro-F1 | AUROC | bal. acc. | ECE | Brier | attention on positives |" in md
    assert re.search(r"\| musk1 \| qgmil \| \*\*[0-9.]+ ± [0-9.]+\*\* \|.* \|  \|\n", md)
    assert f"| {on_digits:.3f} |" in md.splitlines()[3]
    assert (out / "runs" / "digit-bags" / "qgmil" / "summary.json").is_file()
    assert (out / "data" / "digit-bags" / "labels.csv").is_file()
    assert "| model | musk1 | digit-bags | mean |" in (out / "results.md").read_text()


def test_bench_modules_import_one_way_and_read_runs_through_rundir():
    import qgmil.bench

    root = Path(qgmil.bench.__file__).parent
    allowed = {"spec": set(), "tables": {"spec"}, "stats": {"spec", "tables"}, "plots": {"tables"},
               "report": {"spec", "tables", "stats", "plots"}, "runner": {"spec", "report", "cluster"},
               "cluster": {"spec"}, "demo": {"spec", "runner"}}
    assert {p.stem for p in root.glob("*.py")} == {*allowed, "__init__"}
    for name, ok in allowed.items():
        text = (root / f"{name}.py").read_text()
        relative = [node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom) and node.level == 1]
        imported = {n.module for n in relative if n.module} | {a.name for n in relative if not n.module for a in n.names}
        assert imported <= ok, (name, imported - ok)
        assert "summary.json" not in text and "metrics.json" not in text and "config.yaml" not in text, name
