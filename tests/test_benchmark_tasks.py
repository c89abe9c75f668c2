"""`qgmil benchmark` over datasets of several task kinds: every table per kind on that kind's metrics and
directions (task_specs), gains and tests on its main metric, per-kind grids and figures; `--tune` on the
task's metric. A real small grid (two models, the four digit-bag tasks) and hand-made results frames for the
direction logic."""

import re

import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil import task_specs
from qgmil.bench.plots import average_ranks
from qgmil.bench.stats import format_significance, paired_comparison
from qgmil.bench.tables import (
    compute_gains, format_ablation, format_metric_tables, format_results, format_summary, metric_grid, summary_table,
)
from qgmil.cli import main
from qgmil.rundir import RunDir
from qgmil.task_specs import TABLE_METRICS

#: dataset -> (task kind, main metric); all four main metrics are higher-is-better
DATASETS = {"digit-bags": ("classification", "macro_f1"), "digit-bags-survival": ("survival", "c_index"),
            "digit-bags-regression": ("regression", "r2"), "digit-bags-multilabel": ("multilabel", "macro_auroc")}
HEADINGS = ["Classification: Macro-F1", "Survival: C-index (Harrell)", "Regression: R²", "Multi-label: Macro AUROC"]
BENCH_YAML = "datasets:\n" + "".join(f"  - {{name: {d}, options: {{bags: 40}}}}\n" for d in DATASETS) + """\
models: [qgmil, abmil]
folds: 2
seeds: [0]
train:
  optim.epochs: 2
  optim.batch_size: 8
  optim.lr: 1.0e-3
  eval.bootstrap: 20
  eval.patience: null
  runtime.threads: 1
"""


def invoke(*args):
    return CliRunner().invoke(main, ["benchmark", *map(str, args)], catch_exceptions=False)


def sections(md: str) -> dict[str, str]:
    """'## heading' -> the text under it."""
    return dict(zip(re.findall(r"^## (.+)$", md, re.M), re.split(r"^## .+$", md, flags=re.M)[1:]))


def cell(mean: float, std: float, bold: bool) -> str:
    text = f"{mean:.3f} ± {std:.3f}"
    return f"**{text}**" if bold else text


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    pytest.importorskip("sksurv", reason="survival needs scikit-survival (pip install 'qgmil[survival]')")
    pytest.importorskip("lifelines", reason="survival needs lifelines (pip install 'qgmil[survival]')")
    root = tmp_path_factory.mktemp("mixed")
    (root / "bench.yaml").write_text(BENCH_YAML)
    result = invoke(root / "bench.yaml", "--out", root / "out")
    assert result.exit_code == 0, result.output
    return root / "out", result.output, pd.read_csv(root / "out" / "results.csv")


# --- a real grid of four task kinds ------------------------------------------------------------------------


def test_results_csv_has_each_rows_task_and_only_its_kinds_metrics(mixed):
    out, output, table = mixed
    assert list(zip(table["dataset"], table["task"], table["model"])) == [
        (d, kind, m) for d, (kind, _) in DATASETS.items() for m in ("qgmil", "abmil")]
    metrics = list(dict.fromkeys(m for kind, _ in DATASETS.values() for m in TABLE_METRICS[kind]))
    assert list(table.columns) == (["model", "model_name", "dataset", "task", "folds"]
                                   + [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["seconds"])
    assert (table["folds"] == 2).all()
    for kind, rows in table.groupby("task"):
        for metric in metrics:
            if metric not in TABLE_METRICS[kind]:  # another kind's metric: NaN, not a misread value
                assert rows[f"{metric}_mean"].isna().all(), (kind, metric)
            elif metric != "ibs":  # (the survival task does not compute the integrated Brier score yet)
                assert rows[f"{metric}_mean"].notna().all(), (kind, metric)
    # multilabel rows hold their own macro-F1 (a multilabel metric too); survival rows have none
    survival = table[table["task"] == "survival"]
    assert survival["macro_f1_mean"].isna().all()
    assert table.loc[table["task"] == "multilabel", "macro_f1_mean"].notna().all()
    run = RunDir(out / "runs" / "digit-bags-survival" / "qgmil").read_summary()
    assert survival["c_index_mean"].iloc[0] == pytest.approx(run["c_index"]["mean"])
    # the progress lines name each cell's main metric
    assert re.search(r"qgmil on digit-bags-survival: C-index \(Harrell\) [0-9.]+ ± [0-9.]+ \(2 folds", output)
    assert re.search(r"abmil on digit-bags-regression: R² -?[0-9.]+ ± [0-9.]+ \(2 folds", output)
    assert re.search(r"qgmil on digit-bags: macro-F1 [0-9.]+ ± [0-9.]+ \(2 folds", output)


def test_results_md_has_a_section_per_kind_with_its_best_and_signed_gains(mixed):
    out, _, table = mixed
    md = sections((out / "results.md").read_text())
    assert list(md) == HEADINGS
    gains = pd.read_csv(out / "gains.csv")
    for heading, (dataset, (kind, metric)) in zip(HEADINGS, DATASETS.items()):
        text, part = md[heading], table[table["dataset"] == dataset].set_index("model")
        assert f"| model | {dataset} | mean |" in text
        assert not any(f"| {d} |" in text for d in DATASETS if d != dataset)  # only its kind's datasets
        shown = part[f"{metric}_mean"].round(3)
        for model, row in part.iterrows():  # the highest in bold (ties at 3 decimals: both)
            best = shown[model] == shown.max()
            assert f"| {model} | {cell(row[f'{metric}_mean'], row[f'{metric}_std'], best)} |" in text
        # the gain on the main metric, qgmil (the only QG-MIL variant) over abmil: positive = qgmil better
        gain = gains[(gains["dataset"] == dataset)].iloc[0]
        ours, theirs = part.loc["qgmil", f"{metric}_mean"], part.loc["abmil", f"{metric}_mean"]
        assert (gain["task"], gain["best_qgmil"], gain["best_baseline"]) == (kind, "qgmil", "abmil")
        assert gain[f"qgmil_{metric}"] == pytest.approx(ours) and gain["gain"] == pytest.approx(ours - theirs)
        assert f"{dataset} {gain['gain']:+.3f} (qgmil vs abmil); mean {gain['gain']:+.3f}." in text
    # a mean per kind: gains in different metrics are never averaged together
    means = gains[gains["dataset"] == "mean"]
    assert list(means["task"]) == [kind for kind, _ in DATASETS.values()]
    tex = (out / "results.tex").read_text()
    assert tex.count("\\begin{tabular}") == 4 and "% Survival: C-index (Harrell), mean +- std" in tex


def test_significance_pairs_each_kinds_main_metric(mixed):
    out, _, _ = mixed
    tests = pd.read_csv(out / "significance.csv")
    assert list(zip(tests["dataset"], tests["task"], tests["metric"])) == [
        (d, kind, metric) for d, (kind, metric) in DATASETS.items()]
    row = tests[tests["dataset"] == "digit-bags-survival"].iloc[0]
    ours, theirs = (RunDir(out / "runs" / "digit-bags-survival" / m).fold_scores("c_index") for m in ("qgmil", "abmil"))
    expected = paired_comparison([ours[k] for k in sorted(ours)], [theirs[k] for k in sorted(ours)])
    assert row["pairs"] == 2 and row["mean_diff"] == pytest.approx(expected["mean_diff"])
    md = sections((out / "significance.md").read_text())
    assert list(md) == HEADINGS and "mean Δ C-index (Harrell)" in md["Survival: C-index (Harrell)"]
    assert "mean Δ macro-F1" in md["Classification: Macro-F1"]


def test_each_kind_gets_its_grids_and_summary_section(mixed):
    out, output, table = mixed
    assert "auroc.md, calibration.md, survival.md, regression.md, multilabel.md" in output
    survival = sections((out / "survival.md").read_text())
    assert list(survival) == ["C-index (Harrell)", "C-index (Uno)", "Time-dependent AUC",
                              "Integrated Brier score (lower is better)"]
    assert "lowest per dataset in bold" in survival["Integrated Brier score (lower is better)"]
    regression = sections((out / "regression.md").read_text())
    assert list(regression) == ["R²", "MAE (lower is better)", "RMSE (lower is better)", "Spearman ρ"]
    part = table[table["task"] == "regression"].set_index("model")
    shown = part["rmse_mean"].round(3)
    for model, row in part.iterrows():  # the lowest RMSE is the best
        assert f"| {model} | {cell(row['rmse_mean'], row['rmse_std'], shown[model] == shown.min())} |" in regression[
            "RMSE (lower is better)"]
    assert "| model | digit-bags-multilabel | mean |" in (out / "multilabel.md").read_text()
    # classification keeps its two files, with only its own datasets
    for name in ("auroc.md", "calibration.md"):
        text = (out / name).read_text()
        assert "| model | digit-bags | mean |" in text and "survival" not in text
    summary = sections((out / "summary.md").read_text())
    assert list(summary) == ["Classification", "Survival", "Regression", "Multi-label"]
    assert ("| dataset | model | C-index (Harrell) | C-index (Uno) | Time-dependent AUC | Integrated Brier score |"
            in summary["Survival"] and "best C-index (Harrell) per dataset in bold" in summary["Survival"])
    assert "| dataset | model | macro-F1 | AUROC | bal. acc. | ECE | Brier |" in summary["Classification"]


def test_figures_rank_every_dataset_on_its_kinds_main_metric(mixed):
    out, output, table = mixed
    for name in ("results.png", "ranks.png"):
        assert (out / name).stat().st_size > 5_000 and (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranks = average_ranks(table, ["qgmil", "abmil"], list(DATASETS))
    assert list(ranks.columns) == [*DATASETS, "mean"]
    for dataset, (_, metric) in DATASETS.items():
        part = table[table["dataset"] == dataset].set_index("model")[f"{metric}_mean"]
        assert ranks[dataset].to_dict() == part.rank(ascending=False).to_dict()


# --- hand-made frames: directions -------------------------------------------------------------------------


def frame(rows, kind, metrics):
    """A results frame: rows (model, dataset, value per metric), std 0.01, 4 folds."""
    return pd.DataFrame([{"model": m, "model_name": m, "dataset": d, "task": kind, "folds": 4,
                          **{f"{k}_mean": v for k, v in zip(metrics, values)},
                          **{f"{k}_std": 0.01 for k in metrics}} for m, d, *values in rows])


def test_lower_is_better_grids_bold_the_lowest():
    results = frame([("qgmil", "r1", 1.20, 0.30), ("abmil", "r1", 0.90, 0.20), ("mean_pool", "r1", 1.00, 0.10)],
                    "regression", ["rmse", "ibs"])
    grid = metric_grid(results, ["qgmil", "abmil", "mean_pool"], ["r1"], "rmse", "regression")
    assert grid.best["r1"].tolist() == [False, True, False]
    md = format_metric_tables(results, ["qgmil", "abmil", "mean_pool"], ["r1"], ["rmse"], "regression")
    assert "| abmil | **0.900 ± 0.010** | **0.900** |" in md and "| qgmil | 1.200 ± 0.010 | 1.200 |" in md
    assert "RMSE, mean ± std over the 4 (seed, fold) test parts of each cell; lowest per dataset in bold." in md
    survival = results.assign(task="survival")
    md = format_metric_tables(survival, ["qgmil", "abmil", "mean_pool"], ["r1"], ["ibs"], "survival")
    assert "| mean_pool | **0.100 ± 0.010** | **0.100** |" in md and "| qgmil | 0.300 ± 0.010 | 0.300 |" in md
    # a grid holds only its kind's datasets
    assert metric_grid(results, ["qgmil"], ["r1"], "ibs", "survival").datasets == []


def test_a_lower_is_better_main_metric_is_signed_so_positive_is_better(monkeypatch):
    """Every kind's main metric is higher-is-better today; one that is not must flip best, gains, ranks."""
    monkeypatch.setitem(task_specs.TABLE_METRICS, "regression", ("rmse", "r2"))
    models = ["qgmil", "qgmil_wo_gate", "abmil"]
    results = frame([("qgmil", "a", 0.80, 0.5), ("qgmil_wo_gate", "a", 0.90, 0.4), ("abmil", "a", 1.00, 0.3),
                     ("qgmil", "b", 1.30, 0.5), ("qgmil_wo_gate", "b", 1.40, 0.4), ("abmil", "b", 1.10, 0.3)],
                    "regression", ["rmse", "r2"])
    gains = compute_gains(results, ["a", "b"])
    assert list(gains["best_qgmil"][:2]) == ["qgmil", "qgmil"]  # the lowest RMSE of the variants
    assert gains["gain"].tolist() == pytest.approx([0.20, -0.20, 0.0])  # baseline - QG-MIL
    md = format_results(results, models, ["a", "b"], gains)
    assert "| qgmil | **0.800 ± 0.010** | 1.300 ± 0.010 | **1.050** |" in md
    assert "| abmil | 1.000 ± 0.010 | **1.100 ± 0.010** | **1.050** |" in md
    assert "lowest per dataset in bold" in md and "positive = QG-MIL better" in md
    assert "a +0.200 (qgmil vs abmil); b -0.200 (qgmil vs abmil)" in md
    ablation = format_ablation(results, ["a", "b"])
    assert "| qgmil_wo_gate | 0.900 (-0.100) | 1.400 (-0.100) | 1.150 (-0.100) |" in ablation  # worse: negative
    assert "positive = the variant did better" in ablation
    ranks = average_ranks(results, models, ["a", "b"])
    assert ranks["a"].to_dict() == {"qgmil": 1.0, "qgmil_wo_gate": 2.0, "abmil": 3.0}
    summary = format_summary(summary_table(results, pd.DataFrame()))
    assert "| a | qgmil | **0.800 ± 0.010** | 0.500 ± 0.010 |" in summary and "lowest RMSE per dataset" in summary
    tests = pd.DataFrame([{"dataset": "a", "task": "regression", "metric": "rmse", "qgmil": "qgmil",
                           "baseline": "abmil", **paired_comparison([-0.8, -0.7], [-1.0, -1.0])}])
    assert "Δ = baseline - QG-MIL (RMSE: lower is better, so positive = QG-MIL better)" in format_significance(tests)


def test_mixed_frames_get_a_section_and_a_mean_per_kind():
    classification = frame([("qgmil", "c1", 0.8), ("abmil", "c1", 0.7), ("qgmil", "c2", 0.6), ("abmil", "c2", 0.7)],
                           "classification", ["macro_f1"])
    survival = frame([("qgmil", "s1", 0.65), ("abmil", "s1", 0.60)], "survival", ["c_index"])
    results = pd.concat([classification, survival], ignore_index=True)
    gains = compute_gains(results, ["c1", "c2", "s1"])
    assert list(zip(gains["dataset"], gains["task"])) == [
        ("c1", "classification"), ("c2", "classification"), ("s1", "survival"), ("mean", "classification"),
        ("mean", "survival")]
    assert gains["gain"].tolist() == pytest.approx([0.1, -0.1, 0.05, 0.0, 0.05])
    assert gains["qgmil_c_index"].isna().tolist() == [True, True, False, True, False]
    md = sections(format_results(results, ["qgmil", "abmil"], ["c1", "c2", "s1"], gains))
    assert list(md) == ["Classification: Macro-F1", "Survival: C-index (Harrell)"]
    assert "| qgmil | **0.650 ± 0.010** | **0.650** |" in md["Survival: C-index (Harrell)"]
    assert "(C-index (Harrell)): s1 +0.050 (qgmil vs abmil); mean +0.050." in md["Survival: C-index (Harrell)"]
    assert "c1 +0.100 (qgmil vs abmil); c2 -0.100 (qgmil vs abmil); mean +0.000." in md["Classification: Macro-F1"]
    # a single-kind frame reads as before: no heading
    alone = format_results(classification, ["qgmil", "abmil"], ["c1", "c2"],
                           compute_gains(classification, ["c1", "c2"]))
    assert alone == md["Classification: Macro-F1"].strip()
    summary = sections(format_summary(summary_table(results, pd.DataFrame())))
    assert list(summary) == ["Classification", "Survival"]
    assert "| dataset | model | C-index (Harrell) | C-index (Uno) | Time-dependent AUC | Integrated Brier score |" in (
        summary["Survival"])
    assert "| s1 | qgmil | **0.650 ± 0.010** | – | – | – |" in summary["Survival"]  # what a cell lacks: a dash


# --- tuning ---------------------------------------------------------------------------------------------------


def test_a_tuned_survival_cell_maximises_the_c_index(tmp_path):
    """`--tune` scores trials on the task's eval.monitor (survival: c_index, maximised), its ties broken by the
    task's own validation loss (the Cox loss, not classification's nll)."""
    optuna = pytest.importorskip("optuna", reason="tuning needs optuna (pip install 'qgmil[tune]')")
    pytest.importorskip("sksurv", reason="survival needs scikit-survival (pip install 'qgmil[survival]')")
    spec = tmp_path / "bench.yaml"
    spec.write_text("datasets: [{name: digit-bags-survival, options: {bags: 80}}]\nmodels: [abmil]\n"
                    "train: {optim.epochs: 2, optim.batch_size: 8, eval.bootstrap: 20, runtime.threads: 1}\n")
    out = tmp_path / "out"
    result = invoke(spec, "--folds", "2", "--seeds", "0", "--tune", "2", "--out", out)
    assert result.exit_code == 0, result.output
    run = RunDir(out / "runs" / "digit-bags-survival" / "abmil")
    assert run.read_config().eval.monitor == "c_index"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run.study_journal)))
    chosen = run.read_chosen()
    assert sorted(chosen) == ["seed0-fold0", "seed0-fold1"]
    for fold, choice in chosen.items():
        study = optuna.load_study(study_name=fold, storage=storage)
        assert study.direction == optuna.study.StudyDirection.MAXIMIZE
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(study.trials) == 2 and complete and all(0.0 <= t.value <= 1.0 for t in complete)
        assert choice["metric"] == "c_index" and choice["value"] == max(t.value for t in complete)
        # each epoch reports the C-index minus 1e-4 x the validation Cox loss (> 0): at the best epoch, a
        # little below the trial's value (with classification's nll as the tie-break it would be equal)
        for trial in complete:
            assert any(0.0 < trial.value - v < 0.01 for v in trial.intermediate_values.values()), trial
    assert "| digit-bags-survival | abmil | 2 | 2 |" in (out / "tuning.md").read_text()
    assert "C-index (Harrell), mean ± std over the 2 (seed, fold) test parts" in (out / "results.md").read_text()
