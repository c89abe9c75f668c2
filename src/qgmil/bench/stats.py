"""Paired comparisons, fold by fold, with significance tests: the best QG-MIL variant against each baseline
(`significance`), and each one-component-off variant against full QG-MIL (`ablation_significance`).

All models of a dataset share the prepared data and thus, for the same seed, the same test folds, so their
per-fold scores on the dataset's main metric (its task kind's: macro-F1, C-index, R², macro AUROC; see
qgmil.bench.tables) pair up by (seed, fold). Per pair the difference is QG-MIL minus baseline, signed so that
positive = QG-MIL better (baseline minus QG-MIL for a lower-is-better metric); a tie is an (almost) zero
difference. Two two-sided tests of "no difference": the Wilcoxon signed-rank test (scipy.stats.wilcoxon;
zero differences dropped) and the paired t-test. Neither is corrected for the number of comparisons. A
benchmark of several kinds gets a section per kind in the Markdown; the CSV says each row's task and metric.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .spec import Cell
from .tables import (
    better_sign, higher_is_better, is_qgmil, kinds_of, label, main_metric, main_title, of_kind, short_label,
)

#: below this many non-zero differences the Wilcoxon test is not reported: with 5 the smallest two-sided
#: p-value it can give is 2 / 2^5 = 0.0625, so it could never reject
MIN_WILCOXON = 6
TIE_TOLERANCE = 1e-12
ACROSS = "all datasets"
NOTES = {
    "few": f"fewer than {MIN_WILCOXON} non-zero differences: with 5 the smallest possible two-sided Wilcoxon "
           "p-value is 0.0625",
    "zero": "every difference is zero",
    "constant": "fewer than 2 pairs, or every difference is the same (the t statistic is undefined)",
}
COLUMNS = ["dataset", "task", "metric", "qgmil", "baseline", "pairs", "mean_diff", "wins", "ties", "losses",
           "wilcoxon_p", "ttest_p", "wilcoxon_note", "ttest_note"]


def paired_comparison(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """Compare paired scores: pairs, mean_diff (ours - theirs), wins / ties / losses, wilcoxon_p and
    ttest_p (two-sided; NaN where not reported, with the reason from NOTES in wilcoxon_note / ttest_note)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two equally long 1-D sequences, got shapes {a.shape} and {b.shape}")
    d = a - b
    d[np.abs(d) <= TIE_TOLERANCE] = 0.0  # equal F1 up to float rounding is a tie, for the counts and the tests
    nonzero = int(np.count_nonzero(d))
    out = {"pairs": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan,
           "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum()),
           "wilcoxon_p": math.nan, "ttest_p": math.nan, "wilcoxon_note": "", "ttest_note": ""}
    if d.size and nonzero == 0:
        out["wilcoxon_note"] = NOTES["zero"]
    elif nonzero < MIN_WILCOXON:
        out["wilcoxon_note"] = NOTES["few"]
    else:
        with warnings.catch_warnings():  # scipy warns when zeros or ties force the normal approximation
            warnings.simplefilter("ignore")
            out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
    if d.size < 2 or np.ptp(d) <= TIE_TOLERANCE:  # a constant difference has no variance: t is undefined
        out["ttest_note"] = NOTES["constant"]
    else:
        out["ttest_p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    return out


def _paired(ours: dict, theirs: dict, sign: float) -> dict:
    """paired_comparison over the (seed, fold) keys both have, the scores times `sign` (positive = better)."""
    keys = sorted(set(ours) & set(theirs))
    return paired_comparison([sign * ours[k] for k in keys], [sign * theirs[k] for k in keys])


def significance(cells: list[Cell], results: pd.DataFrame, gains: pd.DataFrame) -> pd.DataFrame:
    """Per dataset with a QG-MIL variant and a baseline: the best QG-MIL variant (as in `gains`) against
    every finished baseline on the dataset's main metric, paired over their common (seed, fold) test folds;
    then, per kind with >= 2 such datasets, rows `all datasets` pairing the per-dataset means of the best
    variants with each baseline finished on all of them."""
    finished = [c for c in cells if c.finished]
    rows = []
    per_dataset = gains[gains["dataset"] != "mean"]
    for best in per_dataset.itertuples():
        metric = main_metric(best.task)
        sign = better_sign(metric, best.task)
        here = {c.model: c for c in finished if c.dataset == best.dataset}
        ours = here[best.best_qgmil].rundir.fold_scores(metric)
        for model, cell in here.items():
            if is_qgmil(cell.model_name):
                continue
            rows.append({"dataset": best.dataset, "task": best.task, "metric": metric, "qgmil": best.best_qgmil,
                         "baseline": model, **_paired(ours, cell.rundir.fold_scores(metric), sign)})
    for kind in kinds_of(per_dataset):
        rows += _across(rows, results, of_kind(per_dataset, kind), kind)
    return pd.DataFrame(rows, columns=COLUMNS)


def _across(rows: list[dict], results: pd.DataFrame, per_dataset: pd.DataFrame, kind: str) -> list[dict]:
    """The `all datasets` rows of one kind (its datasets' means; only a kind's datasets share a metric)."""
    if len(per_dataset) < 2:
        return []
    metric = main_metric(kind)
    sign = better_sign(metric, kind)
    means = of_kind(results, kind).pivot(index="model", columns="dataset", values=f"{metric}_mean")
    datasets = list(per_dataset["dataset"])
    ours = sign * per_dataset[f"qgmil_{metric}"].to_numpy()
    out = []
    for model in dict.fromkeys(r["baseline"] for r in rows if r["task"] == kind):
        theirs = means.loc[model].reindex(datasets)
        if theirs.notna().all():
            out.append({"dataset": ACROSS, "task": kind, "metric": metric, "qgmil": "best per dataset",
                        "baseline": model, **paired_comparison(ours, sign * theirs.to_numpy())})
    return out


def ablation_significance(cells: list[Cell]) -> pd.DataFrame:
    """Per dataset: each finished one-off variant of ABLATION_SET against full qgmil on the dataset's main
    metric, paired over their common (seed, fold) test folds, Δ = variant - full signed so that positive =
    the variant better (removing the component helped). Columns as COLUMNS, with `qgmil` the variant and
    `baseline` the full model. Here nothing is picked on the test folds, so the p-values are not biased the
    way the best-variant ones are (still uncorrected)."""
    from ..models import ABLATION_SET

    full_name, variants = ABLATION_SET[0], ABLATION_SET[1:]
    rows = []
    for dataset in dict.fromkeys(c.dataset for c in cells):
        here = {c.model: c for c in cells if c.finished and c.dataset == dataset}
        if full_name not in here:
            continue
        kind, metric = here[full_name].kind, here[full_name].main_metric
        full = here[full_name].rundir.fold_scores(metric)
        for variant in (v for v in variants if v in here):
            rows.append({"dataset": dataset, "task": kind, "metric": metric, "qgmil": variant, "baseline": full_name,
                         **_paired(here[variant].rundir.fold_scores(metric), full, better_sign(metric, kind))})
    return pd.DataFrame(rows, columns=COLUMNS)


def format_significance(table: pd.DataFrame, ablation: bool = False) -> str:
    """Markdown: a row per comparison, n/a p-values marked with a footnote that says why; with several task
    kinds a section each (its own metric). `ablation`: the table of ablation_significance (variant against
    full QG-MIL) instead of best variant against baselines."""
    if table.empty:
        return ("No dataset with both full QG-MIL and a finished variant yet." if ablation else
                "No dataset with both a finished QG-MIL variant and a finished baseline yet.")
    marks: dict[str, str] = {}  # one footnote list for all sections
    kinds = kinds_of(table)
    parts = []
    for kind in kinds:
        part = of_kind(table, kind)
        metric = part["metric"].iloc[0] if "metric" in part else main_metric(kind)
        text = _significance_section(part, metric, kind, ablation, marks)
        parts.append(f"## {main_title(kind)}\n\n{text}" if len(kinds) > 1 else text)
    lines = ["\n\n".join(parts)]
    if marks:
        lines += [""] + [f"[{mark}] n/a: {note}." for note, mark in marks.items()]
    return "\n".join(lines)


def _delta(metric: str, kind: str, ablation: bool) -> str:
    """What Δ is, in the footer: the plain difference, or its sign spelled out for a lower-is-better metric."""
    ours, theirs = ("variant", "full") if ablation else ("QG-MIL", "baseline")
    if higher_is_better(metric, kind):
        return f"Δ = {ours} - {theirs}"
    return f"Δ = {theirs} - {ours} ({label(metric)}: lower is better, so positive = {ours} better)"


def _significance_section(table: pd.DataFrame, metric: str, kind: str, ablation: bool, marks: dict[str, str]) -> str:
    """format_significance's table and footer for one kind; n/a notes go to `marks` (note -> footnote mark)."""

    def p_cell(p: float, note: str) -> str:
        if note:
            mark = marks.setdefault(note, chr(ord("a") + len(marks)))
            return f"n/a [{mark}]"
        return f"{p:.3g}"

    names = ["variant", "against"] if ablation else ["QG-MIL", "baseline"]
    header = ["dataset", *names, "pairs", f"mean Δ {short_label(metric)}", "wins / ties / losses", "Wilcoxon p",
              "paired t p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        cells = [r.dataset, r.qgmil, r.baseline, str(r.pairs), f"{r.mean_diff:+.3f}",
                 f"{r.wins} / {r.ties} / {r.losses}", p_cell(r.wilcoxon_p, r.wilcoxon_note),
                 p_cell(r.ttest_p, r.ttest_note)]
        lines.append("| " + " | ".join(cells) + " |")
    delta = _delta(metric, kind, ablation)
    if ablation:
        lines += ["", (f"Each variant against full QG-MIL, paired over the same (seed, fold) test folds: {delta} "
                       "(positive: the model did better without that component), wins / ties / losses count "
                       "pairs, p-values are two-sided and not corrected for multiple comparisons.")]
    else:
        lines += ["", ("Best QG-MIL variant per dataset (as in results.md) against each baseline, paired over the "
                       f"same (seed, fold) test folds: {delta}, wins / ties / losses count pairs, "
                       "p-values are two-sided and not corrected for multiple comparisons. The variant is picked on "
                       "these same test folds, which favours it: read the p-values as descriptive.")]
    if (table["dataset"] == ACROSS).any():
        lines.append(f"Rows `{ACROSS}` pair the per-dataset means (the best QG-MIL variant of each dataset).")
    return "\n".join(lines)
