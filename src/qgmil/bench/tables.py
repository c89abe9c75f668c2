"""The benchmark's tables: per-cell results, gains, metric grids (Markdown and LaTeX), the per-cell summary,
ablation, attention mass.

Every function here reads finished cells (through their RunDir) or a results frame built from them and
returns text or frames; `report.build_tables` writes the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..evaluate.metrics import HIGHER_IS_BETTER
from .spec import Cell

TABLE_METRICS = ["macro_f1", "auroc", "balanced_accuracy", "ece", "brier"]
METRIC_NAMES = {"macro_f1": "Macro-F1", "auroc": "AUROC", "balanced_accuracy": "Balanced accuracy", "ece": "ECE",
                "brier": "Brier score"}
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def is_qgmil(model_name: str) -> bool:
    """QG-MIL variants are the models tagged as such in the registry; everything else is a baseline."""
    from ..models import is_qgmil as tagged

    return tagged(model_name)


def collect_results(cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell: model, model_name, dataset, folds, <metric>_mean / _std, and seconds
    (training time summed over its folds)."""
    rows = []
    for cell in cells:
        if not cell.finished:
            continue
        summary = cell.rundir.read_summary()
        row = {"model": cell.model, "model_name": cell.model_name, "dataset": cell.dataset,
               "folds": summary.get("macro_f1", {}).get("n", 0)}
        for metric in TABLE_METRICS:
            row[f"{metric}_mean"] = summary.get(metric, {}).get("mean", math.nan)
            row[f"{metric}_std"] = summary.get(metric, {}).get("std", math.nan)
        row["seconds"] = cell.rundir.training_seconds()
        rows.append(row)
    columns = (["model", "model_name", "dataset", "folds"]
               + [f"{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")] + ["seconds"])
    return pd.DataFrame(rows, columns=columns)


def compute_gains(results: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Per dataset: the best QG-MIL variant (model names starting with qgmil), the best baseline, and
    the macro-F1 gain; a last row `mean` averages the datasets where both exist."""
    rows = []
    for dataset in datasets:
        part = results[results["dataset"] == dataset]
        ours = part[part["model_name"].map(is_qgmil)]
        theirs = part[~part["model_name"].map(is_qgmil)]
        if ours.empty or theirs.empty:
            continue
        best_ours = ours.loc[ours["macro_f1_mean"].idxmax()]
        best_theirs = theirs.loc[theirs["macro_f1_mean"].idxmax()]
        rows.append({"dataset": dataset, "best_qgmil": best_ours["model"], "qgmil_macro_f1": best_ours["macro_f1_mean"],
                     "best_baseline": best_theirs["model"], "baseline_macro_f1": best_theirs["macro_f1_mean"],
                     "gain": best_ours["macro_f1_mean"] - best_theirs["macro_f1_mean"]})
    gains = pd.DataFrame(rows, columns=["dataset", "best_qgmil", "qgmil_macro_f1", "best_baseline",
                                        "baseline_macro_f1", "gain"])
    if not gains.empty:
        mean = {"dataset": "mean", "best_qgmil": "", "best_baseline": "",
                **{k: gains[k].mean() for k in ("qgmil_macro_f1", "baseline_macro_f1", "gain")}}
        gains = pd.concat([gains, pd.DataFrame([mean])], ignore_index=True)
    return gains


# ------------------------------------------------------------------------------------------ metric grids

@dataclass
class MetricGrid:
    """One metric as a model x dataset grid: mean, std, the mean over datasets (only for models finished
    on all of them) and where the best values are (highest, or lowest for ECE and Brier; ties at the shown
    precision all count)."""

    metric: str
    mean: pd.DataFrame
    std: pd.DataFrame
    overall: pd.Series
    best: pd.DataFrame
    best_overall: pd.Series

    @property
    def models(self) -> list[str]:
        return list(self.mean.index)

    @property
    def datasets(self) -> list[str]:
        return list(self.mean.columns)


def metric_grid(results: pd.DataFrame, models: list[str], datasets: list[str], metric: str) -> MetricGrid:
    """The grid of `metric` over the models and datasets that have a finished cell, in the given order."""
    mean = results.pivot(index="model", columns="dataset", values=f"{metric}_mean")
    std = results.pivot(index="model", columns="dataset", values=f"{metric}_std")
    models = [m for m in models if m in mean.index]
    datasets = [d for d in datasets if d in mean.columns]
    mean, std = mean.reindex(index=models, columns=datasets), std.reindex(index=models, columns=datasets)
    overall = mean.mean(axis=1).where(mean.notna().all(axis=1))
    # best at the shown precision (3 decimals), so that values printed alike are all bold or none is
    shown, shown_overall = mean.round(3), overall.round(3)
    if not HIGHER_IS_BETTER[metric]:
        best, best_overall = shown.eq(shown.min()), shown_overall.eq(shown_overall.min())
    else:
        best, best_overall = shown.eq(shown.max()), shown_overall.eq(shown_overall.max())
    return MetricGrid(metric, mean, std, overall, best, best_overall)


def _cells(grid: MetricGrid, model: str, bold, pm: str, dash: str) -> list[str]:
    """One row's cells: 'mean ± std' per dataset (`pm` between them), the overall mean, best ones bold."""
    cells = []
    for dataset in grid.datasets:
        value = grid.mean.loc[model, dataset]
        text = dash if pd.isna(value) else f"{value:.3f}{pm}{grid.std.loc[model, dataset]:.3f}"
        cells.append(bold(text) if grid.best.loc[model, dataset] else text)
    overall = grid.overall[model]
    text = dash if pd.isna(overall) else f"{overall:.3f}"
    cells.append(bold(text) if grid.best_overall[model] else text)
    return cells


def grid_markdown(grid: MetricGrid) -> str:
    """Markdown table: a row per model, a column per dataset and the mean; best per column in bold."""
    lines = ["| model | " + " | ".join(grid.datasets) + " | mean |", "|---|" + "---|" * (len(grid.datasets) + 1)]
    for model in grid.models:
        lines.append(f"| {model} | " + " | ".join(_cells(grid, model, lambda t: f"**{t}**", " ± ", "–")) + " |")
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped (model and dataset names hold underscores)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def grid_latex(grid: MetricGrid, caption: str) -> str:
    """A booktabs tabular of the grid (needs \\usepackage{booktabs}); `caption` goes in a leading comment."""
    lines = [f"% {caption}", "% needs \\usepackage{booktabs}",
             "\\begin{tabular}{l" + "c" * (len(grid.datasets) + 1) + "}", "\\toprule",
             " & ".join(["Model", *map(latex_escape, grid.datasets), "Mean"]) + " \\\\", "\\midrule"]
    for model in grid.models:
        cells = _cells(grid, model, lambda t: f"\\textbf{{{t}}}", " $\\pm$ ", "--")
        lines.append(" & ".join([latex_escape(model), *cells]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def _samples(results: pd.DataFrame) -> str:
    """How many (seed, fold) test parts each cell's mean ± std is over, e.g. "the 15" or "the 10-15" ("the"
    alone for a frame without the count)."""
    if "folds" not in results:
        return "the"
    counts = sorted({int(n) for n in results["folds"]})
    return f"the {counts[0]}" if len(counts) == 1 else f"the {counts[0]}-{counts[-1]}"


def _footer(metric: str, results: pd.DataFrame) -> str:
    direction = "best" if HIGHER_IS_BETTER[metric] else "lowest"
    return (f"{METRIC_NAMES[metric]}, mean ± std over {_samples(results)} (seed, fold) test parts of each cell; "
            f"{direction} per dataset in bold.")


def format_results(results: pd.DataFrame, models: list[str], datasets: list[str], gains: pd.DataFrame) -> str:
    """Markdown: macro-F1 mean ± std, a row per model, a column per dataset and the mean over datasets
    (only for models finished on all of them); the best per column in bold; then the gains."""
    if results.empty:
        return "No finished cells yet."
    lines = [grid_markdown(metric_grid(results, models, datasets, "macro_f1")), "", _footer("macro_f1", results)]
    if not gains.empty:
        per = [f"{r.dataset} {r.gain:+.3f} ({r.best_qgmil} vs {r.best_baseline})"
               for r in gains.itertuples() if r.dataset != "mean"]
        lines += ["", (f"Gain of the best QG-MIL variant over the best baseline (macro-F1): {'; '.join(per)}; "
                       f"mean {gains['gain'].iloc[-1]:+.3f}.")]
    return "\n".join(lines)


def format_results_latex(results: pd.DataFrame, models: list[str], datasets: list[str]) -> str:
    """results.md's macro-F1 table as a LaTeX booktabs tabular."""
    if results.empty:
        return "% No finished cells yet."
    caption = f"Macro-F1, mean +- std over {_samples(results)} (seed, fold) test parts of each cell; best per dataset in bold."
    return grid_latex(metric_grid(results, models, datasets, "macro_f1"), caption)


def format_metric_tables(results: pd.DataFrame, models: list[str], datasets: list[str], metrics: list[str]) -> str:
    """Markdown: one table per metric (with a heading when there are several), best per dataset in bold."""
    if results.empty:
        return "No finished cells yet."
    parts = []
    for metric in metrics:
        heading = [f"## {METRIC_NAMES[metric]}" + ("" if HIGHER_IS_BETTER[metric] else " (lower is better)"), ""]
        parts.append("\n".join((heading if len(metrics) > 1 else [])
                               + [grid_markdown(metric_grid(results, models, datasets, metric)), "", _footer(metric, results)]))
    return "\n\n".join(parts)


SUMMARY_NAMES = {"macro_f1": "macro-F1", "auroc": "AUROC", "balanced_accuracy": "bal. acc.", "ece": "ECE",
                 "brier": "Brier"}
ON_POSITIVES = "attention_on_positives"


def summary_table(results: pd.DataFrame, mass: pd.DataFrame) -> pd.DataFrame:
    """One row per finished cell, in the results' order: dataset, model, model_name, folds, <metric>_mean /
    _std of TABLE_METRICS, and attention_on_positives, the cell's mean test attention on positive instances
    (attention_mass's attention_on_positives_mean; NaN where the bags have no instance labels)."""
    columns = ["dataset", "model", "model_name", "folds"] + [f"{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")]
    table = results[columns].reset_index(drop=True)
    key = f"{ON_POSITIVES}_mean"
    if not mass.empty and key in mass:
        on = mass.set_index(["model", "dataset"])[key]
        table[ON_POSITIVES] = [on.get((m, d), math.nan) for m, d in zip(table["model"], table["dataset"])]
    else:
        table[ON_POSITIVES] = math.nan
    return table


def format_summary(table: pd.DataFrame) -> str:
    """Markdown: one row per cell, mean ± std over folds x seeds, the best macro-F1 per dataset in bold (ties
    at the shown precision all count); an `attention on positives` column when some cell's bags have
    instance labels (empty for the others)."""
    if table.empty:
        return "No finished cells yet."
    header = ["dataset", "model", *SUMMARY_NAMES.values()]
    with_positives = bool(table[ON_POSITIVES].notna().any())
    if with_positives:
        header.append("attention on positives")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = table["macro_f1_mean"].round(3)
    best = shown.groupby(table["dataset"]).transform("max")
    for (_, row), top, f1 in zip(table.iterrows(), best, shown):
        cells = [str(row["dataset"]), str(row["model"])]
        for metric in SUMMARY_NAMES:
            cell = f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_std']:.3f}"
            cells.append(f"**{cell}**" if metric == "macro_f1" and f1 == top else cell)
        if with_positives:
            cells.append("" if pd.isna(row[ON_POSITIVES]) else f"{row[ON_POSITIVES]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± std over folds x seeds; best macro-F1 per dataset in bold."
              + (" Attention on positives: mean test pooling attention on a bag's positive instances, over the bags "
                 "that have them (attention_mass.md)." if with_positives else "")]
    return "\n".join(lines)


def format_ablation(results: pd.DataFrame, datasets: list[str]) -> str | None:
    """Markdown: full qgmil and each one-off variant of ABLATION_SET present (by label); a variant's cell
    is its macro-F1 and the difference from full qgmil. None without qgmil and at least one variant."""
    from ..models import ABLATION_SET

    if results.empty:
        return None
    f1 = results.pivot(index="model", columns="dataset", values="macro_f1_mean")
    variants = [m for m in ABLATION_SET[1:] if m in f1.index]
    if ABLATION_SET[0] not in f1.index or not variants:
        return None
    full = f1.loc[ABLATION_SET[0]]
    datasets = [d for d in datasets if d in f1.columns]
    lines = ["| variant | " + " | ".join(datasets) + " | mean |", "|---|" + "---|" * (len(datasets) + 1)]
    complete = full[datasets].notna().all()
    full_cells = ["–" if pd.isna(full[d]) else f"{full[d]:.3f}" for d in datasets]
    full_cells.append(f"{full[datasets].mean():.3f}" if complete else "–")
    lines.append(f"| {ABLATION_SET[0]} (full) | " + " | ".join(full_cells) + " |")
    for variant in variants:
        row, cells = f1.loc[variant], []
        for d in datasets:
            cells.append("–" if pd.isna(row[d]) or pd.isna(full[d]) else f"{row[d]:.3f} ({row[d] - full[d]:+.3f})")
        both = complete and row[datasets].notna().all()
        m = row[datasets].mean()
        cells.append(f"{m:.3f} ({m - full[datasets].mean():+.3f})" if both else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"Macro-F1 (mean over folds x seeds); in brackets the difference from full {ABLATION_SET[0]}."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ attention mass

def attention_mass(cells: list[Cell]) -> tuple[pd.DataFrame, list[str]]:
    """Per model x dataset summary of the finished cells' test attention (qgmil.explain.mass.summarize:
    bags, <metric>_mean / _std / _median), and one line per finished cell that has no attention to analyse."""
    from ..explain.mass import summarize
    from ..explain.reader import MassError, run_metrics

    frames, skipped = [], []
    for cell in cells:
        if not cell.finished:
            continue
        try:
            frame = run_metrics(cell.run_dir)
        except MassError as err:
            skipped.append(f"{cell.model} on {cell.dataset}: {err}")
            continue
        frame["model"], frame["dataset"] = cell.model, cell.dataset  # the grid's labels, not the registry names
        frames.append(frame)
    return (summarize(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()), skipped


def format_attention_mass(summary: pd.DataFrame, skipped: list[str]) -> str:
    """Markdown: explain.mass's summary table, what its columns mean, and the cells left out."""
    from ..explain.mass import format_summary

    lines = [format_summary(summary) if not summary.empty else "No finished cell with test attention yet.", "",
             ("Test-set pooling attention of every bag (all folds x seeds), mean ± std over bags. Normalised "
              "entropy and effective fraction are 1 for uniform attention; top-10% mass, Gini and max weight grow "
              "as it concentrates. Attention on positives and instance AUROC need instance labels (n/a without).")]
    if skipped:
        lines += ["", "Left out:", *[f"- {line}" for line in skipped]]
    return "\n".join(lines)


def tuning_table(cells: list[Cell]) -> pd.DataFrame:
    """One row per tuned cell with chosen settings: dataset, model, outer folds, trials per fold, complete,
    pruned, failed, trial_epochs (summed over its studies) and settings (most frequent choice or median and
    range over the outer folds)."""
    from ..tune.settings import compact

    rows = []
    for cell in cells:
        chosen = cell.rundir.read_chosen() if cell.tuned else {}
        if not chosen:
            continue
        total = {k: sum(c[k] for c in chosen.values()) for k in ("complete", "pruned", "failed", "trial_epochs")}
        rows.append({"dataset": cell.dataset, "model": cell.model, "outer_folds": len(chosen),
                     "trials": next(iter(chosen.values()))["trials"], **total, "settings": compact(chosen)})
    return pd.DataFrame(rows)


def format_tuning(table: pd.DataFrame) -> str:
    """Markdown of tuning_table: what each model was given (the same trials per outer fold) and chose."""
    if table.empty:
        return "No tuned cells have finished studies yet."
    lines = ["| dataset | model | outer folds | trials each | complete / pruned / failed | trial-epochs | chosen "
             "settings |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.dataset} | {r.model} | {r.outer_folds} | {r.trials} | {r.complete} / {r.pruned} / "
                     f"{r.failed} | {r.trial_epochs} | {r.settings} |")
    lines += ["", "Each outer (seed, fold) was tuned on its training part only (validation score), then its chosen "
              "settings were retrained and tested once. Settings: median [range] of a float, or the most frequent "
              "value (outer folds choosing it)."]
    return "\n".join(lines)
