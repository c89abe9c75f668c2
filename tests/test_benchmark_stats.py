"""The benchmark's paired tests, rank and LaTeX tables on hand-made numbers (no training)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from qgmil.bench.plots import average_ranks
from qgmil.bench.stats import ACROSS, MIN_WILCOXON, NOTES, format_significance, paired_comparison
from qgmil.bench.tables import format_metric_tables, format_results_latex, latex_escape, metric_grid

OURS = [0.80, 0.75, 0.90, 0.70, 0.85, 0.60, 0.78, 0.66]
THEIRS = [0.70, 0.75, 0.80, 0.72, 0.80, 0.50, 0.70, 0.60]  # differences: +.1, 0, +.1, -.02, +.05, +.1, +.08, +.06


def test_paired_comparison_counts_and_matches_scipy():
    result = paired_comparison(OURS, THEIRS)
    assert (result["pairs"], result["wins"], result["ties"], result["losses"]) == (8, 6, 1, 1)
    assert result["mean_diff"] == pytest.approx(np.mean(np.subtract(OURS, THEIRS)))
    # 0.75 - 0.75 is exactly 0, so scipy sees the same differences (the zero dropped)
    assert result["wilcoxon_p"] == pytest.approx(stats.wilcoxon(OURS, THEIRS).pvalue, rel=1e-12)
    assert result["ttest_p"] == pytest.approx(stats.ttest_rel(OURS, THEIRS).pvalue, rel=1e-9)
    assert result["wilcoxon_note"] == result["ttest_note"] == ""
    # seven non-zero differences, the only negative one the smallest: exact p = 2 * 2 / 2^7
    assert result["wilcoxon_p"] == pytest.approx(0.03125)


def test_paired_comparison_reports_why_a_test_is_missing():
    few = paired_comparison([0.9, 0.8, 0.7, 0.6, 0.5], [0.8, 0.7, 0.6, 0.5, 0.4 + 1e-15])
    assert few["wins"] == 5 and math.isnan(few["wilcoxon_p"]) and few["wilcoxon_note"] == NOTES["few"]
    # the differences are all 0.1 up to float rounding: no t statistic either
    assert math.isnan(few["ttest_p"]) and few["ttest_note"] == NOTES["constant"]
    same = paired_comparison([0.5] * MIN_WILCOXON, [0.5] * MIN_WILCOXON)
    assert (same["ties"], same["mean_diff"]) == (MIN_WILCOXON, 0.0) and same["wilcoxon_note"] == NOTES["zero"]
    # float noise below the tolerance is a tie
    assert paired_comparison([0.1 + 0.2], [0.3])["ties"] == 1
    with pytest.raises(ValueError, match="equally long"):
        paired_comparison([0.1, 0.2], [0.3])


def test_significance_markdown_footnotes():
    rows = [{"dataset": "a", "qgmil": "qgmil", "baseline": "abmil", **paired_comparison(OURS, THEIRS)},
            {"dataset": "b", "qgmil": "qgmil", "baseline": "abmil", **paired_comparison(OURS[:3], THEIRS[:3])},
            {"dataset": ACROSS, "qgmil": "best per dataset", "baseline": "abmil",
             **paired_comparison([0.8, 0.7], [0.7, 0.7])}]
    rows.append({"dataset": "c", "qgmil": "qgmil", "baseline": "abmil", **paired_comparison([0.5], [0.4])})
    md = format_significance(pd.DataFrame(rows))
    assert "| a | qgmil | abmil | 8 | +0.059 | 6 / 1 / 1 | 0.0312 | 0.00927 |" in md
    assert "| b | qgmil | abmil | 3 | +0.067 | 2 / 1 / 0 | n/a [a] | 0.184 |" in md
    assert "| all datasets | best per dataset | abmil | 2 | +0.050 | 1 / 1 / 0 | n/a [a] | 0.5 |" in md
    assert "| c | qgmil | abmil | 1 | +0.100 | 1 / 0 / 0 | n/a [a] | n/a [b] |" in md
    assert f"[a] n/a: {NOTES['few']}." in md and f"[b] n/a: {NOTES['constant']}." in md
    assert "Rows `all datasets`" in md


def _results(rows):
    return pd.DataFrame([{"model": m, "model_name": m, "dataset": d, "macro_f1_mean": f, "macro_f1_std": 0.01,
                          "ece_mean": e, "ece_std": 0.02} for m, d, f, e in rows])


RESULTS = _results([("qgmil_wo_gate", "a", 0.80, 0.10), ("abmil", "a", 0.70, 0.05), ("mean_pool", "a", 0.70, 0.20),
                    ("qgmil_wo_gate", "b", 0.60, 0.10), ("abmil", "b", 0.90, 0.30), ("mean_pool", "b", 0.50, 0.20),
                    ("dsmil", "a", 0.95, 0.01)])
MODELS, DATASETS = ["qgmil_wo_gate", "abmil", "mean_pool", "dsmil"], ["a", "b"]


def test_average_ranks_over_models_finished_everywhere():
    ranks = average_ranks(RESULTS, MODELS, DATASETS)
    assert list(ranks.index) == ["qgmil_wo_gate", "abmil", "mean_pool"]  # dsmil lacks dataset b
    assert ranks["a"].tolist() == [1.0, 2.5, 2.5] and ranks["b"].tolist() == [2.0, 1.0, 3.0]
    assert ranks["mean"].tolist() == [1.5, 1.75, 2.75]


def test_latex_table_and_lower_is_better():
    assert latex_escape("a_b & 50% #1 {x}") == r"a\_b \& 50\% \#1 \{x\}"
    tex = format_results_latex(RESULTS, MODELS, DATASETS)
    assert "Model & a & b & Mean \\\\" in tex
    assert "qgmil\\_wo\\_gate & 0.800 $\\pm$ 0.010 & 0.600 $\\pm$ 0.010 & 0.700 \\\\" in tex
    assert "abmil & 0.700 $\\pm$ 0.010 & \\textbf{0.900 $\\pm$ 0.010} & \\textbf{0.800} \\\\" in tex
    assert "dsmil & \\textbf{0.950 $\\pm$ 0.010} & -- & -- \\\\" in tex
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    grid = metric_grid(RESULTS, MODELS, DATASETS, "ece")
    assert grid.best.loc["dsmil", "a"] and grid.best.loc["qgmil_wo_gate", "b"] and grid.best_overall["qgmil_wo_gate"]
    md = format_metric_tables(RESULTS, MODELS, DATASETS, ["ece"])
    assert "| qgmil_wo_gate | 0.100 ± 0.020 | **0.100 ± 0.020** | **0.100** |" in md
    assert "lowest per dataset in bold" in md


def test_values_equal_at_the_shown_precision_are_all_bold():
    results = _results([("qgmil", "a", 0.95001, 0.1), ("qgmil_wo_gate", "a", 0.94999, 0.1), ("abmil", "a", 0.9, 0.1)])
    grid = metric_grid(results, ["qgmil", "qgmil_wo_gate", "abmil"], ["a"], "macro_f1")
    assert grid.best["a"].tolist() == [True, True, False] and grid.best_overall.tolist() == [True, True, False]
