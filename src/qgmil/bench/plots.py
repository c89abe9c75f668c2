"""The benchmark's figures: macro-F1 bars per dataset and the average-rank plot (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plotting import new_figure, save_figure
from .tables import metric_grid


def average_ranks(results: pd.DataFrame, models: list[str], datasets: list[str]) -> pd.DataFrame:
    """Rank of each model per dataset by mean macro-F1 (1 = best, ties share their mean rank), over the
    models finished on every dataset; a row per model, a column per dataset and `mean`, sorted by it."""
    grid = metric_grid(results, models, datasets, "macro_f1")
    complete = grid.mean.dropna()
    ranks = complete.rank(axis=0, ascending=False, method="average")
    ranks["mean"] = ranks.mean(axis=1)
    return ranks.sort_values("mean", kind="stable")


def _colours(n: int) -> list:
    """n distinct colours: the default ten, or tab20 beyond (an ablation grid easily has more than ten models)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def results_bars(results: pd.DataFrame, models: list[str], datasets: list[str], path: str | Path) -> Path:
    """Grouped bars: per dataset one bar per model, macro-F1 mean with a std error bar."""
    grid = metric_grid(results, models, datasets, "macro_f1")
    n_models, n_datasets = len(grid.models), len(grid.datasets)
    fig = new_figure(figsize=(max(5.0, 1.5 + 0.3 * n_models * n_datasets), 4.5))
    ax = fig.subplots()
    x = np.arange(n_datasets)
    width = 0.8 / n_models
    colours = _colours(n_models)
    for i, model in enumerate(grid.models):
        ax.bar(x - 0.4 + (i + 0.5) * width, grid.mean.loc[model].fillna(0.0).to_numpy(), width=width,
               yerr=grid.std.loc[model].to_numpy(), capsize=2, label=model, color=colours[i])
    ax.set_xticks(x)
    ax.set_xticklabels(grid.datasets)
    ax.set_ylabel("macro-F1 (mean ± std over folds)")
    ax.set_ylim(0.0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=max(1, n_models // 6), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def rank_plot(ranks: pd.DataFrame, path: str | Path) -> Path:
    """Average rank per model (a bar, best at the top) with each dataset's rank as a dot; lower is better."""
    if ranks.empty:
        raise ValueError("no model finished on every dataset: nothing to rank")
    datasets = [c for c in ranks.columns if c != "mean"]
    fig = new_figure(figsize=(6.0, max(2.5, 0.8 + 0.35 * len(ranks))))
    ax = fig.subplots()
    y = np.arange(len(ranks))
    ax.barh(y, ranks["mean"].to_numpy(), color="tab:blue", alpha=0.6, label="average rank")
    for i, dataset in enumerate(datasets):
        ax.scatter(ranks[dataset].to_numpy(), y, s=18, marker="os^Dv<>ph*"[i % 10], color="black", zorder=3,
                   label=dataset)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{model} ({value:.2f})" for model, value in ranks["mean"].items()])
    ax.invert_yaxis()  # best (lowest) rank on top
    ax.set_xlim(0.0, len(ranks) + 0.5)
    ax.set_xlabel(f"rank by macro-F1 (1 = best), average over {len(datasets)} dataset(s)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)
