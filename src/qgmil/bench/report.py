"""The benchmark's report: every table and figure of OUT/ (the layout is in qgmil.bench.spec), built from
whatever cells have finished.

`build_tables` is the one writer; the tables come from `tables` (results, gains, metric grids, summary,
ablation, attention mass, tuning), the paired tests from `stats`, the figures from `plots`. Every table is
per task kind, on the kind's main metric (tables' docstring): results.md/.tex, summary.md, significance.md,
ablation.md get a section per kind when the benchmark mixes kinds, and each kind present gets its own grids
of every table metric (tables.extra_tables): auroc.md and calibration.md for classification, survival.md,
regression.md, multilabel.md for the others. The CSVs (results, gains, significance, ablation) say each
row's task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_write, atomic_write_text
from .spec import Cell
from .stats import ablation_significance, format_significance, significance
from .tables import (
    attention_mass, collect_results, compute_gains, extra_tables, format_ablation, format_attention_mass,
    format_metric_tables, format_results, format_results_latex, format_summary, format_tuning, kinds_of, short_label,
    summary_table, tuning_table,
)


def build_tables(out: str | Path, cells: list[Cell], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write every table and figure from the finished cells of `cells` into `out`.

    Returns the frames (results, gains, significance, attention_mass, summary), the Markdown the command
    line prints (results_md, summary_md, ablation_md: None without an ablation), figures (the PNGs
    written), written (every file written, in order), finished and cells (counts).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(c.model for c in cells))
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    kinds = list(dict.fromkeys(c.kind for c in cells))  # of every planned cell: unfinished kinds get files too
    results = collect_results(cells)
    gains = compute_gains(results, datasets, kinds)
    results_md = format_results(results, models, datasets, gains)
    ablation_md = format_ablation(results, datasets)
    tests = significance(cells, results, gains)
    mass, skipped = attention_mass(cells)
    summary = summary_table(results, mass)
    summary_md = format_summary(summary)
    written: list[Path] = []

    def text(name: str, content: str) -> None:
        written.append(atomic_write_text(out / name, content + "\n"))

    def csv(name: str, frame) -> None:
        written.append(atomic_write(out / name, lambda tmp: frame.to_csv(tmp, index=False)))

    text("results.md", results_md)
    csv("results.csv", results)
    text("results.tex", format_results_latex(results, models, datasets))
    text("summary.md", summary_md)
    for kind in kinds:
        for name, metrics in extra_tables(kind).items():
            text(name, format_metric_tables(results, models, datasets, list(metrics), kind))
    csv("gains.csv", gains)
    if ablation_md is not None:
        ablation_tests = ablation_significance(cells)
        text("ablation.md", ablation_md + "\n\n" + format_significance(ablation_tests, ablation=True))
        csv("ablation.csv", ablation_tests)
    text("significance.md", format_significance(tests))
    csv("significance.csv", tests)
    text("attention_mass.md", format_attention_mass(mass, skipped))
    csv("attention_mass.csv", mass)
    tuning = tuning_table(cells)
    if any(c.tuned for c in cells):
        text("tuning.md", format_tuning(tuning))
        csv("tuning.csv", tuning)
    figures = write_figures(out, results, models, datasets, echo) if not results.empty else []
    return {"results": results, "gains": gains, "significance": tests, "attention_mass": mass, "summary": summary,
            "tuning": tuning,
            "results_md": results_md, "summary_md": summary_md, "ablation_md": ablation_md, "figures": figures,
            "written": written + figures, "finished": len(results), "cells": len(cells)}


def cell_score(cell: Cell, summary: dict) -> str:
    """A trained cell's main metric for the progress lines, e.g. "macro-F1 0.812 ± 0.031"."""
    score = summary.get(cell.main_metric, {})
    return f"{short_label(cell.main_metric)} {score.get('mean', math.nan):.3f} ± {score.get('std', math.nan):.3f}"


def write_figures(out: Path, results, models: list[str], datasets: list[str],
                  echo: Callable[[str], None] = print) -> list[Path]:
    """results.png and ranks.png (no ranks.png while no model has finished every dataset); none, with a
    note, without matplotlib (an optional extra)."""
    from . import plots

    try:
        written = [plots.results_bars(results, models, datasets, out / "results.png")]
        ranks = plots.average_ranks(results, models, datasets)
        if not ranks.empty:
            written.append(plots.rank_plot(ranks, out / "ranks.png", kinds_of(results)))
    except ImportError as err:
        echo(f"no figures: {err}")
        return []
    return written
