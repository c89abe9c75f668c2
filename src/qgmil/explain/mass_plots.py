"""Attention-mass figures (PNG): Lorenz curves and box plots. matplotlib is optional (`qgmil[plots]`);
figures are drawn on a bare Agg `Figure` (no pyplot) and written atomically (temp file + os.replace)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plotting import new_figure, save_figure
from .mass import MAIN_METRICS


def lorenz_plot(curves: dict[str, np.ndarray], grid: np.ndarray, path) -> Path:
    """curves: run label -> (bags, len(grid)) cumulative attention of the instances sorted by decreasing
    weight at instance fractions `grid`. Draws the median over bags (line) and the IQR (band) per run,
    and the diagonal of uniform attention."""
    fig = new_figure(figsize=(5.5, 5.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="uniform")
    for label, c in curves.items():
        if len(c) == 0:
            continue
        q1, med, q3 = np.percentile(c, [25, 50, 75], axis=0)
        (line,) = ax.plot(grid, med, linewidth=1.8, label=f"{label} (n={len(c)})")
        ax.fill_between(grid, q1, q3, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="fraction of instances (largest weights first)",
           ylabel="cumulative attention", title="Attention Lorenz curves (median, IQR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def mass_boxplots(frame: pd.DataFrame, labels: pd.Series, path, metrics: dict[str, str] | None = None) -> Path:
    """One panel per metric (default: the main ones), one box per run (`labels`: a run label per row)."""
    metrics = metrics or MAIN_METRICS
    runs = list(dict.fromkeys(labels))
    fig = new_figure(figsize=(max(3.0 * len(metrics), 6.0), 4.0 + 0.15 * max(len(r) for r in runs)))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, (col, name) in zip(axes, metrics.items()):
        data = [frame.loc[(labels == r).to_numpy(), col].dropna().to_numpy(float) for r in runs]
        ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
        ax.set_xticks(range(1, len(runs) + 1), runs, rotation=45, ha="right", fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Attention concentration per bag")
    return save_figure(fig, path)
