"""Attention-mass analysis: how concentrated is a model's pooling attention, and where does it go?

All formulas are exact (numpy, float64) on a bag's attention a = (a_1..a_N), a_i >= 0, sum a_i = 1
(inputs summing to 1 within 1e-3 are renormalised; anything else is an error):

  norm_entropy        H(a) / log N with H(a) = -sum a_i log a_i (0 log 0 = 0): 1 = uniform, 0 = one-hot.
                      N == 1: defined as 1.0 (the only distribution over one instance is the uniform one).
  effective_n         1 / sum a_i^2 (the inverse Simpson index): N when uniform, 1 when one-hot.
  effective_fraction  effective_n / N, in [1/N, 1].
  top_<p>pct_mass     mass of the ceil(p N / 100) largest weights (at least 1), p = 1, 5, 10
                      (uniform: ceil(p N / 100) / N; computed in integers, so ceil(10 * 30 / 100) = 3).
  top_<k>_mass        mass of the min(k, N) largest weights, k = 1, 5, 10.
  gini                the standard Gini coefficient of the weights, sum_ij |a_i - a_j| / (2 N^2 mean(a))
                      = 2 sum_i i a_(i) / N - (N + 1) / N with a_(1) <= ... <= a_(N):
                      0 when uniform, (N - 1) / N when one-hot (so its maximum grows with N).
  max_weight          max a_i.
  n_instances         N.

Localisation against per-instance labels (1 / nonzero = positive, "witness"):

  attention_on_positives  sum of a_i over positive instances; NaN when the bag has no positive instance.
  positive_share          share of positive instances = the mass uniform attention would put on them.
  instance_auroc          P(a_pos > a_neg) + 0.5 P(a_pos == a_neg) over all (positive, negative) pairs
                          (Mann-Whitney U / (n_pos n_neg), ties count half); NaN with one class only.
  n_positive              number of positive instances.

Per run: `summarize` (per model x dataset) and `format_summary` (markdown). Reading runs: reader.py;
the report on disk (tables, figures): mass_report.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

TOP_PERCENT = (1, 5, 10)
TOP_K = (1, 5, 10)
BAG_COLUMNS = ("bag_id", "fold", "seed", "label")
LOCALISATION = ("attention_on_positives", "positive_share", "instance_auroc", "n_positive")
#: the metrics of the summary table and the box plots: column -> display name
MAIN_METRICS = {"norm_entropy": "normalised entropy", "effective_fraction": "effective fraction",
                "top_10pct_mass": "top-10% mass", "gini": "Gini", "max_weight": "max weight"}
LOCALISATION_MAIN = {"attention_on_positives": "attention on positives", "instance_auroc": "instance AUROC"}


def _check_attention(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"attention must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("attention is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention holds NaN or Inf")
    if np.any(a < 0):
        raise ValueError("attention holds negative weights")
    total = a.sum()
    if abs(total - 1.0) > 1e-3:
        raise ValueError(f"attention must sum to 1 (within 1e-3), sums to {total:.6g}")
    return a / total


def bag_metrics(a, top_k: Sequence[int] = TOP_K, top_percent: Sequence[int] = TOP_PERCENT) -> dict:
    """Concentration metrics of one bag's attention (see the module docstring for the formulas)."""
    a = _check_attention(a)
    n = a.size
    nz = a[a > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    desc = np.sort(a)[::-1]
    cum = np.cumsum(desc)
    asc = desc[::-1]
    out = {"n_instances": n,
           "norm_entropy": 1.0 if n == 1 else entropy / math.log(n),
           "effective_n": float(1.0 / np.square(a).sum())}
    out["effective_fraction"] = out["effective_n"] / n
    for p in top_percent:
        k = max(1, -(-int(p) * n // 100))  # ceil(p n / 100) in integers
        out[f"top_{p}pct_mass"] = float(cum[min(k, n) - 1])
    for k in top_k:
        out[f"top_{k}_mass"] = float(cum[min(int(k), n) - 1])
    out["gini"] = float(2.0 * np.dot(np.arange(1, n + 1), asc) / n - (n + 1) / n)
    out["max_weight"] = float(desc[0])
    return out


def localisation(a, instance_labels) -> dict:
    """Where the attention goes relative to per-instance labels (see the module docstring)."""
    a = _check_attention(a)
    labels = np.asarray(instance_labels).reshape(-1)
    if labels.shape != a.shape:
        raise ValueError(f"{labels.size} instance labels for {a.size} attention weights")
    pos = labels != 0
    n_pos = int(pos.sum())
    n_neg = a.size - n_pos
    auroc = float("nan")
    if n_pos and n_neg:
        from scipy.stats import rankdata

        ranks = rankdata(a, method="average")  # ties share the mean of their ranks
        u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
        auroc = float(u / (n_pos * n_neg))
    return {"attention_on_positives": float(a[pos].sum()) if n_pos else float("nan"),
            "positive_share": n_pos / a.size, "instance_auroc": auroc, "n_positive": n_pos}


def lorenz_curve(a, grid: np.ndarray) -> np.ndarray:
    """Cumulative attention of the instances sorted by decreasing weight at instance fractions `grid`
    (piecewise linear through (i / N, mass of the i largest), i = 0..N)."""
    a = _check_attention(a)
    x = np.arange(a.size + 1) / a.size
    y = np.concatenate([[0.0], np.cumsum(np.sort(a)[::-1])])
    return np.interp(grid, x, y)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    skip = {"model", "dataset", "run_dir", *BAG_COLUMNS}
    return [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model x dataset: bags, and <metric>_mean / _std / _median of every metric (NaN skipped)."""
    rows = []
    for (model, dataset), group in frame.groupby(["model", "dataset"], sort=False):
        row = {"model": model, "dataset": dataset, "bags": len(group)}
        for col in metric_columns(frame):
            values = group[col].astype(float).dropna()  # all NaN (e.g. no instance labels): NaN, without a warning
            row[f"{col}_mean"] = values.mean() if len(values) else np.nan
            row[f"{col}_std"] = values.std() if len(values) else np.nan
            row[f"{col}_median"] = values.median() if len(values) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """Markdown table: model, dataset, bags, mean ± std of the main metrics (and localisation if any)."""
    metrics = dict(MAIN_METRICS)
    metrics.update({k: v for k, v in LOCALISATION_MAIN.items() if f"{k}_mean" in summary})
    header = ["model", "dataset", "bags", *metrics.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row["model"]), str(row["dataset"]), str(int(row["bags"]))]
        for key in metrics:
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            cells.append("n/a" if pd.isna(mean) else f"{mean:.3f} ± {0.0 if pd.isna(std) else std:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
