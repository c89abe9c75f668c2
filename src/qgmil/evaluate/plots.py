"""Evaluation figures (PNG). matplotlib is an optional extra: `pip install 'qgmil[plots]'`.

Figures are drawn on a bare `Figure` with the Agg canvas, never through pyplot, so plotting neither touches
the global backend nor leaks figures, and works in headless training runs and threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..plotting import new_figure, save_figure
from .metrics import calibration_bins


def reliability_diagram(y, probs, path, *, n_bins: int = 15, title: str | None = None) -> Path:
    """Reliability diagram of the top-label confidence: accuracy per confidence bin (bars) against the
    diagonal, with the bin counts below and the ECE in the title.

    y: (n,) int class indices; probs: (n, C) probabilities. Returns `path` (written atomically)."""
    bins = calibration_bins(y, probs, n_bins)
    count, acc, conf, edges = bins["count"], bins["accuracy"], bins["confidence"], bins["edges"]
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / count.sum())

    fig = new_figure(figsize=(5.0, 6.0))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = np.diff(edges)
    ax.bar(edges[:-1][filled], acc[filled], width=width[filled], align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
           facecolor="none", edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    heading = f"ECE = {ece:.3f} (n = {int(count.sum())})"
    ax.set_title(f"{title}\n{heading}" if title else heading)
    ax_hist.bar(edges[:-1], count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    ax_hist.set_xlabel("top-label confidence")
    ax_hist.set_ylabel("bags")
    return save_figure(fig, path)


def kaplan_meier_plot(time, event, high, path, *, p_value: float | None = None, title: str | None = None) -> Path:
    """Kaplan-Meier curves (lifelines' estimator) of the high- and low-risk groups, with 95% bands and the
    log-rank p-value. time, event (n,); high (n,) bool. Returns `path` (written atomically)."""
    from lifelines import KaplanMeierFitter

    time, event, high = np.asarray(time, float), np.asarray(event, bool), np.asarray(high, bool)
    fig = new_figure(figsize=(6.0, 4.5))
    ax = fig.subplots()
    for name, group, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not group.any():
            continue
        km = KaplanMeierFitter().fit(time[group], event[group])
        curve, band = km.survival_function_.iloc[:, 0], km.confidence_interval_
        ax.step(curve.index, curve.values, where="post", color=color, label=f"{name} (n = {int(group.sum())})")
        ax.fill_between(band.index, band.iloc[:, 0], band.iloc[:, 1], step="post", color=color, alpha=0.15)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.legend(loc="lower left", fontsize="small")
    heading = "" if p_value is None or math.isnan(p_value) else f"log-rank p = {p_value:.2g}"
    ax.set_title("\n".join(t for t in (title, heading) if t))
    return save_figure(fig, path)


def metric_bars(summary_by_model: dict[str, dict], path, metrics: Sequence[str] = ("macro_f1", "auroc")) -> Path:
    """Grouped bar chart of mean ± std per model and metric.

    summary_by_model: model name -> output of `summarize_predictions`. Returns `path` (written atomically)."""
    if not summary_by_model:
        raise ValueError("no models to plot")
    metrics = list(metrics)
    models = list(summary_by_model)
    for model, summary in summary_by_model.items():
        missing = [m for m in metrics if m not in summary]
        if missing:
            raise KeyError(f"model {model!r} has no summary for {missing}")

    fig = new_figure(figsize=(max(4.0, 1.2 + 0.6 * len(models) * len(metrics)), 4.0))
    ax = fig.subplots()
    x = np.arange(len(metrics))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        means = np.array([summary_by_model[model][m]["mean"] for m in metrics], dtype=float)
        stds = np.array([summary_by_model[model][m]["std"] for m in metrics], dtype=float)
        ax.bar(x - 0.4 + (i + 0.5) * width, np.nan_to_num(means), width=width,
               yerr=np.where(np.isnan(means), math.nan, stds), capsize=3, label=model)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics)
    ax.set_ylabel("mean ± std over folds")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
