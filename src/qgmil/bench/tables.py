"""The benchmark's tables: per-cell results, gains, metric grids (Markdown and LaTeX), the per-cell summary,
ablation, attention mass.

A benchmark may mix task kinds; a results frame says each row's in its `task` column (a frame without one is
all classification). Every table is built per kind from that kind's metrics (task_specs.TABLE_METRICS) and
their directions (task_specs.HIGHER_IS_BETTER): the best of a lower-is-better metric is its lowest, and a gain
or paired difference on it is signed so that positive means QG-MIL (or the variant) did better. A kind's main
metric (the first of its TABLE_METRICS) is what results.md/.tex, gains.csv, the ablation, the summary's bold
and the figures compare. With one kind the Markdown reads as it always has; with several, a file has a
section per kind ("## Survival: C-index (Harrell)").

What report.build_tables writes from here: results.md/.tex/.csv, gains.csv, summary.md, ablation.md,
attention_mass.md/.csv, tuning.md/.csv, and the per-kind grids of `extra_tables`: auroc.md and
calibration.md (classification), survival.md, regression.md, multilabel.md (a grid per table metric).

Every function here reads finished cells (through their RunDir) or a results frame built from them and
returns text or frames; `report.build_tables` writes the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..task_specs import HIGHER_IS_BETTER, METRIC_LABELS, TABLE_METRICS
from .spec import Cell

#: the kind of the rows of a results frame without a `task` column (hand-made frames, older callers)
DEFAULT_KIND = "classification"
#: the grids written besides results.md, per kind: file -> metrics (kinds not listed: <kind>.md, every
#: table metric of the kind)
EXTRA_TABLES = {"classification": {"auroc.md": ("auroc",), "calibration.md": ("ece", "brier")}}
#: shorter names for the compact tables (summary columns, Δ headers, gains), where METRIC_LABELS' are long
SHORT_LABELS = {"macro_f1": "macro-F1", "balanced_accuracy": "bal. acc.", "brier": "Brier"}
KIND_TITLES = {"multilabel": "Multi-label"}
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def is_qgmil(model_name: str) -> bool:
    """QG-MIL variants are the models tagged as such in the registry; everything else is a baseline."""
    from ..models import is_qgmil as tagged

    return tagged(model_name)


# ------------------------------------------------------------------------------------------ task kinds

def main_metric(kind: str) -> str:
    """The metric a kind's tables compare (gains, tests, ranks, bold in the summary)."""
    return TABLE_METRICS[kind][0]


def higher_is_better(metric: str, kind: str) -> bool:
    return HIGHER_IS_BETTER[kind][metric]


def better_sign(metric: str, kind: str) -> float:
    """+1 or -1: a difference (ours - theirs) times this is positive when ours is better."""
    return 1.0 if higher_is_better(metric, kind) else -1.0


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def short_label(metric: str) -> str:
    return SHORT_LABELS.get(metric, label(metric))


def kind_title(kind: str) -> str:
    return KIND_TITLES.get(kind, kind.capitalize())


def tasks(frame: pd.DataFrame) -> pd.Series:
    """The task kind of each row (DEFAULT_KIND for a frame without a `task` column)."""
    return frame["task"] if "task" in frame else pd.Series(DEFAULT_KIND, index=frame.index, dtype=object)


def kinds_of(frame: pd.DataFrame) -> list[str]:
    """The kinds of a frame's rows, in order of first appearance (the datasets' order)."""
    return list(dict.fromkeys(tasks(frame)))


def of_kind(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    return frame[tasks(frame) == kind]


def table_metrics(kinds: list[str]) -> list[str]:
    """The table metrics of every kind given, each once, in kind order (results.csv's columns)."""
    return list(dict.fromkeys(m for kind in kinds for m in TABLE_METRICS[kind]))


def extra_tables(kind: str) -> dict[str, tuple[str, ...]]:
    """The metric-grid files of a kind besides results.md: file name -> its metrics."""
    return EXTRA_TABLES.get(kind, {f"{kind}.md": TABLE_METRICS[kind]})


def _sections(parts: list[tuple[str, str]], title, headed: bool) -> str:
    """Join per-kind texts [(kind, text)], each under a heading `title(kind)` when `headed` (the benchmark
    mixes kinds; a single kind's file reads as it always has)."""
    return "\n\n".join(f"## {title(kind)}\n\n{text}" if headed else text for kind, text in parts)


def main_title(kind: str) -> str:
    """A kind's section heading: "Survival: C-index (Harrell)"."""
    return f"{kind_title(kind)}: {label(main_metric(kind))}"


# ------------------------------------------------------------------------------------------ results, gains

def collect_results(cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell: model, model_name, dataset, task, folds, <metric>_mean / _std of the table
    metrics of every kind in `cells` (NaN where the metric is not the cell's kind's), and seconds (training
    time summed over its folds)."""
    metrics = table_metrics(list(dict.fromkeys(c.kind for c in cells)))
    rows = []
    for cell in cells:
        if not cell.finished:
            continue
        summary = cell.rundir.read_summary()
        row = {"model": cell.model, "model_name": cell.model_name, "dataset": cell.dataset, "task": cell.kind,
               "folds": summary.get(cell.main_metric, {}).get("n", 0)}
        for metric in metrics:
            # NaN where the metric is not the cell's kind's, even if its summary holds one of that name
            value = summary.get(metric, {}) if metric in TABLE_METRICS[cell.kind] else {}
            row[f"{metric}_mean"] = value.get("mean", math.nan)
            row[f"{metric}_std"] = value.get("std", math.nan)
        row["seconds"] = cell.rundir.training_seconds()
        rows.append(row)
    columns = (["model", "model_name", "dataset", "task", "folds"]
               + [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["seconds"])
    return pd.DataFrame(rows, columns=columns)


def _best(rows: pd.DataFrame, metric: str, kind: str) -> pd.Series:
    column = rows[f"{metric}_mean"]
    return rows.loc[column.idxmax() if higher_is_better(metric, kind) else column.idxmin()]


def compute_gains(results: pd.DataFrame, datasets: list[str], kinds: list[str] | None = None) -> pd.DataFrame:
    """Per dataset: the best QG-MIL variant (registry tag), the best baseline, both on the dataset's main
    metric (columns qgmil_<metric>, baseline_<metric>), and the gain, signed so that positive = QG-MIL better;
    then a row `mean` per kind averaging its datasets where both exist. `kinds`: the kinds whose columns the
    frame has (default: those of `results`)."""
    kinds = kinds_of(results) if kinds is None else kinds
    rows = []
    for dataset in datasets:
        part = results[results["dataset"] == dataset]
        if part.empty:
            continue
        kind = tasks(part).iloc[0]
        metric = main_metric(kind)
        column = f"{metric}_mean"
        part = part[part[column].notna()]  # e.g. a C-index undefined on every fold (no comparable pair)
        ours = part[part["model_name"].map(is_qgmil)]
        theirs = part[~part["model_name"].map(is_qgmil)]
        if ours.empty or theirs.empty:
            continue
        best_ours, best_theirs = _best(ours, metric, kind), _best(theirs, metric, kind)
        rows.append({"dataset": dataset, "task": kind, "best_qgmil": best_ours["model"],
                     f"qgmil_{metric}": best_ours[column], "best_baseline": best_theirs["model"],
                     f"baseline_{metric}": best_theirs[column],
                     "gain": better_sign(metric, kind) * (best_ours[column] - best_theirs[column])})
    metrics = list(dict.fromkeys(main_metric(k) for k in kinds))
    gains = pd.DataFrame(rows, columns=["dataset", "task", "best_qgmil", *[f"qgmil_{m}" for m in metrics],
                                        "best_baseline", *[f"baseline_{m}" for m in metrics], "gain"])
    # a mean per kind: gains in different metrics do not add up
    means = []
    for kind in kinds_of(gains):
        part, metric = of_kind(gains, kind), main_metric(kind)
        means.append({"dataset": "mean", "task": kind, "best_qgmil": "", "best_baseline": "",
                      **{k: part[k].mean() for k in (f"qgmil_{metric}", f"baseline_{metric}", "gain")}})
    if means:
        gains = pd.concat([gains, pd.DataFrame(means)], ignore_index=True)
    return gains


# ------------------------------------------------------------------------------------------ metric grids

@dataclass
class MetricGrid:
    """One metric as a model x dataset grid: mean, std, the mean over datasets (only for models finished
    on all of them) and where the best values are (highest, or lowest for a lower-is-better metric such as
    ECE, Brier, RMSE, IBS; ties at the shown precision all count)."""

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


def metric_grid(results: pd.DataFrame, models: list[str], datasets: list[str], metric: str,
                kind: str = DEFAULT_KIND) -> MetricGrid:
    """The grid of `metric` over the models and datasets of `kind` that have a finished cell, in the given
    order (datasets of other kinds are left out)."""
    part = of_kind(results, kind)
    mean = part.pivot(index="model", columns="dataset", values=f"{metric}_mean")
    std = part.pivot(index="model", columns="dataset", values=f"{metric}_std")
    models = [m for m in models if m in mean.index]
    datasets = [d for d in datasets if d in mean.columns]
    mean, std = mean.reindex(index=models, columns=datasets), std.reindex(index=models, columns=datasets)
    overall = mean.mean(axis=1).where(mean.notna().all(axis=1))
    # best at the shown precision (3 decimals), so that values printed alike are all bold or none is
    shown, shown_overall = mean.round(3), overall.round(3)
    if not higher_is_better(metric, kind):
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


def _footer(metric: str, results: pd.DataFrame, kind: str = DEFAULT_KIND) -> str:
    direction = "best" if higher_is_better(metric, kind) else "lowest"
    return (f"{label(metric)}, mean ± std over {_samples(results)} (seed, fold) test parts of each cell; "
            f"{direction} per dataset in bold.")


def _gains_line(gains: pd.DataFrame, kind: str) -> list[str]:
    """The gains sentence of results.md for one kind (none without a dataset holding both sides)."""
    part = of_kind(gains, kind)
    if part.empty:
        return []
    metric = main_metric(kind)
    per = [f"{r.dataset} {r.gain:+.3f} ({r.best_qgmil} vs {r.best_baseline})"
           for r in part.itertuples() if r.dataset != "mean"]
    mean = part.loc[part["dataset"] == "mean", "gain"].iloc[-1]
    # a plain difference reads as "positive = better" only when higher is better: otherwise say how it is signed
    sign = "" if higher_is_better(metric, kind) else ", baseline - QG-MIL as lower is better: positive = QG-MIL better"
    return ["", (f"Gain of the best QG-MIL variant over the best baseline ({short_label(metric)}{sign}): "
                 f"{'; '.join(per)}; mean {mean:+.3f}.")]


def format_results(results: pd.DataFrame, models: list[str], datasets: list[str], gains: pd.DataFrame) -> str:
    """Markdown, per kind: its main metric's mean ± std, a row per model, a column per dataset and the mean
    over datasets (only for models finished on all of them); the best per column in bold; then the gains.
    With several kinds, a section each ("## Survival: C-index (Harrell)")."""
    if results.empty:
        return "No finished cells yet."
    parts = []
    for kind in kinds_of(results):
        metric, part = main_metric(kind), of_kind(results, kind)
        lines = [grid_markdown(metric_grid(part, models, datasets, metric, kind)), "", _footer(metric, part, kind)]
        parts.append((kind, "\n".join(lines + _gains_line(gains, kind))))
    return _sections(parts, main_title, len(parts) > 1)


def format_results_latex(results: pd.DataFrame, models: list[str], datasets: list[str]) -> str:
    """results.md's tables (a tabular per kind) as LaTeX booktabs tabulars."""
    if results.empty:
        return "% No finished cells yet."
    kinds, tables = kinds_of(results), []
    for kind in kinds:
        metric, part = main_metric(kind), of_kind(results, kind)
        direction = "best" if higher_is_better(metric, kind) else "lowest"
        what = f"{kind_title(kind)}: {label(metric)}" if len(kinds) > 1 else label(metric)
        caption = (f"{what}, mean +- std over {_samples(part)} (seed, fold) test parts of each cell; {direction} "
                   "per dataset in bold.")
        tables.append(grid_latex(metric_grid(part, models, datasets, metric, kind), caption))
    return "\n\n".join(tables)


def format_metric_tables(results: pd.DataFrame, models: list[str], datasets: list[str], metrics: list[str],
                         kind: str = DEFAULT_KIND) -> str:
    """Markdown: one table per metric of `kind` (with a heading when there are several), best per dataset
    in bold."""
    part = of_kind(results, kind)
    if part.empty:
        return "No finished cells yet."
    parts = []
    for metric in metrics:
        heading = [f"## {label(metric)}" + ("" if higher_is_better(metric, kind) else " (lower is better)"), ""]
        parts.append("\n".join((heading if len(metrics) > 1 else [])
                               + [grid_markdown(metric_grid(part, models, datasets, metric, kind)), "",
                                  _footer(metric, part, kind)]))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------ summary, ablation

ON_POSITIVES = "attention_on_positives"


def summary_table(results: pd.DataFrame, mass: pd.DataFrame) -> pd.DataFrame:
    """One row per finished cell, in the results' order: dataset, model, model_name, task, folds, the
    results' <metric>_mean / _std, and attention_on_positives, the cell's mean test attention on positive
    instances (attention_mass's attention_on_positives_mean; NaN where the bags have no instance labels)."""
    metrics = [c for c in results.columns if c not in ("model", "model_name", "dataset", "task", "folds", "seconds")]
    table = results.assign(task=tasks(results))[["dataset", "model", "model_name", "task", "folds", *metrics]]
    table = table.reset_index(drop=True)
    key = f"{ON_POSITIVES}_mean"
    if not mass.empty and key in mass:
        on = mass.set_index(["model", "dataset"])[key]
        table[ON_POSITIVES] = [on.get((m, d), math.nan) for m, d in zip(table["model"], table["dataset"])]
    else:
        table[ON_POSITIVES] = math.nan
    return table


def _summary_section(table: pd.DataFrame, kind: str) -> str:
    """format_summary's table for the cells of one kind."""
    metrics, main = TABLE_METRICS[kind], main_metric(kind)
    header = ["dataset", "model", *map(short_label, metrics)]
    with_positives = bool(table[ON_POSITIVES].notna().any())
    if with_positives:
        header.append("attention on positives")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = table[f"{main}_mean"].round(3)
    best = shown.groupby(table["dataset"]).transform("max" if higher_is_better(main, kind) else "min")
    for (_, row), top, value in zip(table.iterrows(), best, shown):
        cells = [str(row["dataset"]), str(row["model"])]
        for metric in metrics:
            mean = row.get(f"{metric}_mean", math.nan)  # a metric the runs did not report: a dash
            cell = "–" if pd.isna(mean) else f"{mean:.3f} ± {row[f'{metric}_std']:.3f}"
            cells.append(f"**{cell}**" if metric == main and value == top else cell)
        if with_positives:
            cells.append("" if pd.isna(row[ON_POSITIVES]) else f"{row[ON_POSITIVES]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    which = "best" if higher_is_better(main, kind) else "lowest"
    lines += ["", f"Mean ± std over folds x seeds; {which} {short_label(main)} per dataset in bold."
              + (" Attention on positives: mean test pooling attention on a bag's positive instances, over the bags "
                 "that have them (attention_mass.md)." if with_positives else "")]
    return "\n".join(lines)


def format_summary(table: pd.DataFrame) -> str:
    """Markdown: one row per cell, its kind's table metrics as mean ± std over folds x seeds, the best main
    metric per dataset in bold (ties at the shown precision all count); an `attention on positives` column
    when some cell's bags have instance labels (empty for the others). With several kinds, a section each."""
    if table.empty:
        return "No finished cells yet."
    kinds = kinds_of(table)
    return _sections([(kind, _summary_section(of_kind(table, kind), kind)) for kind in kinds], kind_title,
                     len(kinds) > 1)


def _ablation_section(results: pd.DataFrame, datasets: list[str], kind: str) -> str | None:
    """format_ablation's table for the datasets of one kind; None without full qgmil and a variant there."""
    from ..models import ABLATION_SET

    metric = main_metric(kind)
    scores = results.pivot(index="model", columns="dataset", values=f"{metric}_mean")
    variants = [m for m in ABLATION_SET[1:] if m in scores.index]
    if ABLATION_SET[0] not in scores.index or not variants:
        return None
    sign = better_sign(metric, kind)
    full = scores.loc[ABLATION_SET[0]]
    datasets = [d for d in datasets if d in scores.columns]
    lines = ["| variant | " + " | ".join(datasets) + " | mean |", "|---|" + "---|" * (len(datasets) + 1)]
    complete = full[datasets].notna().all()
    full_cells = ["–" if pd.isna(full[d]) else f"{full[d]:.3f}" for d in datasets]
    full_cells.append(f"{full[datasets].mean():.3f}" if complete else "–")
    lines.append(f"| {ABLATION_SET[0]} (full) | " + " | ".join(full_cells) + " |")
    for variant in variants:
        row, cells = scores.loc[variant], []
        for d in datasets:
            change = sign * (row[d] - full[d])
            cells.append("–" if pd.isna(row[d]) or pd.isna(full[d]) else f"{row[d]:.3f} ({change:+.3f})")
        both = complete and row[datasets].notna().all()
        m = row[datasets].mean()
        cells.append(f"{m:.3f} ({sign * (m - full[datasets].mean()):+.3f})" if both else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    signed = "" if sign > 0 else ", signed so that positive = the variant did better (lower is better)"
    lines += ["", f"{label(metric)} (mean over folds x seeds); in brackets the difference from full {ABLATION_SET[0]}"
              f"{signed}."]
    return "\n".join(lines)


def format_ablation(results: pd.DataFrame, datasets: list[str]) -> str | None:
    """Markdown: full qgmil and each one-off variant of ABLATION_SET present (by label); a variant's cell
    is its main metric and the difference from full qgmil. A section per kind when the results hold
    several; None without qgmil and at least one variant on some dataset."""
    if results.empty:
        return None
    kinds = kinds_of(results)
    parts = [(k, text) for k in kinds if (text := _ablation_section(of_kind(results, k), datasets, k)) is not None]
    if not parts:
        return None
    # headed whenever the results mix kinds, even if only one has an ablation: the heading names its metric
    return _sections(parts, main_title, len(kinds) > 1)


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
