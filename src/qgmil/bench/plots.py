"""The benchmark's figures (matplotlib, optional): bars of each task kind's main metric per dataset (a panel
per kind: macro-F1, C-index, R² do not share an axis) and the average-rank plot (ranks do: every dataset
ranks its models on its own kind's main metric, 1 = best)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plotting import new_figure, save_figure
from .tables import MetricGrid, higher_is_better, kind_title, kinds_of, main_metric, metric_grid, short_label


def _main_grids(results: pd.DataFrame, models: list[str], datasets: list[str]) -> list[tuple[str, MetricGrid]]:
    """(kind, the grid of its main metric) per kind of the results that has a finished dataset."""
    grids = [(kind, metric_grid(results, models, datasets, main_metric(kind), kind)) for kind in kinds_of(results)]
    return [(kind, grid) for kind, grid in grids if grid.datasets]


def average_ranks(results: pd.DataFrame, models: list[str], datasets: list[str]) -> pd.DataFrame:
    """Rank of each model per dataset by the mean of its kind's main metric (1 = best: the highest, or the
    lowest for a lower-is-better metric; ties share their mean rank), over the models finished on every
    dataset; a row per model, a column per dataset and `mean`, sorted by it."""
    grids = _main_grids(results, models, datasets)
    if not grids:
        return pd.DataFrame(columns=["mean"])
    means = pd.concat([grid.mean for _, grid in grids], axis=1)  # a model missing a kind: NaN there, dropped
    higher = {d: higher_is_better(grid.metric, kind) for kind, grid in grids for d in grid.datasets}
    order = [m for m in models if m in means.index]
    complete = means.reindex(index=order, columns=[d for d in datasets if d in higher]).dropna()
    ranks = pd.DataFrame({d: complete[d].rank(ascending=not higher[d], method="average") for d in complete.columns},
                         index=complete.index)
    ranks["mean"] = ranks.mean(axis=1)
    return ranks.sort_values("mean", kind="stable")


def _colours(n: int) -> list:
    """n distinct colours: the default ten, or tab20 beyond (an ablation grid easily has more than ten models)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _ylim(grid: MetricGrid) -> tuple[float, float]:
    """0 to 1.05 (the scores' range), widened only where a mean lies outside it: a negative R², an
    unbounded lower-is-better metric."""
    mean, std = grid.mean.to_numpy(dtype=float), grid.std.fillna(0.0).to_numpy(dtype=float)
    low = np.nanmin(mean - std, initial=0.0) * 1.05 if (mean < 0).any() else 0.0
    high = np.nanmax(mean + std, initial=0.0) * 1.05 if (mean > 1).any() else 1.05
    return float(low), float(high)


def results_bars(results: pd.DataFrame, models: list[str], datasets: list[str], path: str | Path) -> Path:
    """Grouped bars: per dataset one bar per model, the main metric's mean with a std error bar; a panel per
    task kind (titled when there are several), each model in the same colour in all of them."""
    grids = _main_grids(results, models, datasets)
    present = [m for m in models if any(m in grid.models for _, grid in grids)]
    colours = dict(zip(present, _colours(len(present))))
    widths = [1.5 + 0.3 * len(grid.models) * len(grid.datasets) for _, grid in grids]
    # several panels: constrained layout keeps each panel's y label clear of its left neighbour
    fig = new_figure(figsize=(max(5.0, sum(widths) + 0.6 * (len(grids) - 1)), 4.5),
                     **({"layout": "constrained"} if len(grids) > 1 else {}))
    axes = fig.subplots(1, len(grids), squeeze=False, width_ratios=widths)[0]
    handles = {}
    for ax, (kind, grid) in zip(axes, grids):
        n_models = len(grid.models)
        x = np.arange(len(grid.datasets))
        width = 0.8 / n_models
        for i, model in enumerate(grid.models):
            handles[model] = ax.bar(x - 0.4 + (i + 0.5) * width, grid.mean.loc[model].fillna(0.0).to_numpy(),
                                    width=width, yerr=grid.std.loc[model].to_numpy(), capsize=2, label=model,
                                    color=colours[model])
        ax.set_xticks(x)
        ax.set_xticklabels(grid.datasets)
        ax.set_ylabel(f"{short_label(grid.metric)} (mean ± std over folds)")
        ax.set_ylim(*_ylim(grid))
        ax.grid(axis="y", alpha=0.3)
        if len(grids) > 1:
            ax.set_title(kind_title(kind))
    legend = [m for m in present if m in handles]
    axes[-1].legend([handles[m] for m in legend], legend, fontsize="small", ncol=max(1, len(legend) // 6),
                    loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def rank_plot(ranks: pd.DataFrame, path: str | Path, kinds: list[str] | None = None) -> Path:
    """Average rank per model (a bar, best at the top) with each dataset's rank as a dot; lower is better.
    `kinds`: the task kinds ranked (their main metrics name the axis; default classification's)."""
    if ranks.empty:
        raise ValueError("no model finished on every dataset: nothing to rank")
    datasets = [c for c in ranks.columns if c != "mean"]
    metrics = [short_label(main_metric(k)) for k in (kinds or ["classification"])]
    basis = metrics[0] if len(metrics) == 1 else f"each task's main metric ({', '.join(metrics)})"
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
    ax.set_xlabel(f"rank by {basis} (1 = best), average over {len(datasets)} dataset(s)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)
