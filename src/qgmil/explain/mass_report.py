"""The attention-mass report of runs on disk (`qgmil explain mass`): its tables and its figures.

  write_mass_report(run_dirs, out)        -> MassReport: OUT/mass_per_bag.csv, mass_summary.csv,
                                             mass_summary.md, lorenz.png, mass_boxplots.png
  lorenz_plot(curves, grid, path)         -> PNG: median and IQR Lorenz curve per run
  mass_boxplots(frame, labels, path)      -> PNG: a box per run for each main metric

The metrics are mass.py's, the runs read by reader.py. matplotlib is optional (`qgmil[plots]`): without
it the tables are still written and `MassReport.note` says why the figures are not. Figures are drawn on
a bare Agg `Figure` (qgmil.plotting, no pyplot) and every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_write, atomic_write_text
from ..plotting import new_figure, save_figure
from .mass import MAIN_METRICS, format_summary, summarize
from .reader import load_run, run_names

LORENZ_GRID = 201  # instance fractions 0, 0.005, ..., 1 of the Lorenz curves


@dataclass
class MassReport:
    """What `write_mass_report` wrote: the markdown summary table, the paths in writing order, the per-bag
    and summary tables, and why the figures are missing (None when they were drawn)."""

    table: str
    written: list[Path]
    per_bag: pd.DataFrame
    summary: pd.DataFrame
    note: str | None = None


def write_mass_report(run_dirs: Sequence, out) -> MassReport:
    """Measure the test attention of each run directory and write the report into `out` (created):
    mass_per_bag.csv (one row per test bag and seed), mass_summary.csv (per model x dataset),
    mass_summary.md (the markdown table), lorenz.png and mass_boxplots.png (one curve / box per run)."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = run_names(runs, with_dataset=True)
    frames = [r.metrics() for r in runs]
    frame = pd.concat(frames, ignore_index=True)
    summary = summarize(frame)
    table = format_summary(summary)
    atomic_write(out / "mass_per_bag.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(out / "mass_summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write_text(out / "mass_summary.md", table + "\n")
    report = MassReport(table, [out / "mass_per_bag.csv", out / "mass_summary.csv", out / "mass_summary.md"],
                        frame, summary)
    try:
        grid = np.linspace(0.0, 1.0, LORENZ_GRID)
        report.written.append(lorenz_plot({n: r.lorenz(grid) for n, r in zip(names, runs)}, grid, out / "lorenz.png"))
        labels = pd.Series(np.repeat(names, [len(f) for f in frames]))
        report.written.append(mass_boxplots(frame, labels, out / "mass_boxplots.png"))
    except ImportError as err:
        report.note = f"no figures: {err}"
    return report


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
