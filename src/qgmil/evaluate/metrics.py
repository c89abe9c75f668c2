"""Bag-level classification metrics from predicted probabilities, with bootstrap summaries over folds.

Everything is computed in numpy from per-bag quantities, so that one bootstrap replicate of a fold is
just a vector of multiplicities (how often each bag was drawn): confusion matrices, calibration bins,
Brier and NLL become a matrix product with those weights, and AUROC a weighted Mann-Whitney U over runs
of tied scores. `classification_metrics` is the same computation with every weight equal to 1, which
the tests check against scikit-learn.

Conventions (all matching scikit-learn's defaults):
  * macro_f1 averages F1 over the classes present in `y` or in the predictions (a class in neither is
    left out, as `f1_score(average="macro")` does without `labels`); F1 of a class with no true
    positive is 0 (`zero_division=0`).
  * balanced_accuracy averages recall over the classes present in `y`.
  * kappa / kappa_quadratic are NaN when the expected disagreement is 0 (every bag and every prediction
    in one single class), as `cohen_kappa_score` returns (`replace_undefined_by=np.nan`). The quadratic
    weights use class indices, i.e. `cohen_kappa_score(..., labels=range(C), weights="quadratic")`.
  * auroc is NaN when no class has both positives and negatives in `y`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..task_specs import HIGHER_IS_BETTER as TASK_METRICS

METRICS: tuple[str, ...] = ("macro_f1", "balanced_accuracy", "accuracy", "auroc", "kappa", "ece", "brier", "nll")
ORDINAL_METRICS: tuple[str, ...] = ("macro_f1", "balanced_accuracy", "accuracy", "auroc", "kappa", "kappa_quadratic",
                                    "ece", "brier", "nll")
HIGHER_IS_BETTER: dict[str, bool] = TASK_METRICS["classification"]

_PROB_EPS = 1e-12
_SUM_TOL = 1e-3  # loose enough for float32 softmax outputs, tight enough to catch logits passed by mistake
_BOOT_CHUNK_ELEMENTS = 2_000_000  # replicates x bags per chunk, bounds memory for large folds


def metric_names(ordinal: bool = False) -> tuple[str, ...]:
    """The metric names `classification_metrics` returns, in order."""
    return ORDINAL_METRICS if ordinal else METRICS


def _check_inputs(y, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, C) with C >= 2, got {probs.shape}")
    if y.ndim != 1 or y.shape[0] != probs.shape[0]:
        raise ValueError(f"y must have shape ({probs.shape[0]},), got {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("no bags: y and probs are empty")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) or not np.all(y == np.round(y)):
            raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    num_classes = probs.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    row_sums = probs.sum(axis=1)
    if np.abs(row_sums - 1.0).max() > _SUM_TOL:
        raise ValueError(f"rows of probs must sum to 1 (max deviation {np.abs(row_sums - 1.0).max():.3g}); "
                         "pass probabilities (softmax), not logits")
    return y, probs


def confusion(y, pred, num_classes: int) -> np.ndarray:
    """Confusion counts, shape (C, C): rows are true classes, columns predicted classes (sklearn's layout).

    y, pred: (n,) int class indices in [0, num_classes)."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if y.shape != pred.shape or y.ndim != 1:
        raise ValueError(f"y and pred must be 1-D of equal length, got {y.shape} and {pred.shape}")
    if y.size and (min(y.min(), pred.min()) < 0 or max(y.max(), pred.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    return np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _calibration_parts(y: np.ndarray, probs: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label confidence (n,), correctness (n,) and bin index (n,) of each bag.

    Bins are equal-width on [0, 1] and closed on the right: [0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(y)), pred]
    correct = (pred == y).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, conf, side="left")
    return conf, correct, bins


def calibration_bins(y, probs, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin statistics of the top-label confidence (for reliability diagrams).

    Returns arrays of shape (n_bins,): "count", "confidence" (mean, NaN for empty bins), "accuracy" (NaN for
    empty bins), and "edges" of shape (n_bins + 1,). ECE = sum(count * |accuracy - confidence|) / n."""
    y, probs = _check_inputs(y, probs)
    conf, correct, bins = _calibration_parts(y, probs, n_bins)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": accuracy, "edges": np.linspace(0.0, 1.0, n_bins + 1)}


@dataclass(frozen=True)
class _RankRuns:
    """One AUROC problem (score of one class vs the rest), prepared once per fold.

    order: (n,) argsort of the scores; starts: (G,) first sorted position of each run of equal scores;
    positive: (n,) bool, bag is of the class, in sorted order."""

    order: np.ndarray
    starts: np.ndarray
    positive: np.ndarray


def _rank_runs(score: np.ndarray, positive: np.ndarray) -> _RankRuns:
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return _RankRuns(order, starts, positive[order])


def _weighted_auroc(runs: _RankRuns, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC for each row of weights w (B, n): P(s_pos > s_neg) + P(s_pos = s_neg) / 2,
    which is the average-rank formula; NaN where positives or negatives have zero weight. Returns (B,)."""
    ws = w[:, runs.order]
    pos = np.add.reduceat(ws * runs.positive, runs.starts, axis=1)  # (B, G) positive weight per tie run
    neg = np.add.reduceat(ws * ~runs.positive, runs.starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    u = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    denom = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / np.where(denom > 0, denom, 1.0), np.nan)


class _FoldStats:
    """Per-bag quantities of one (y, probs), from which metrics under any bag weighting follow."""

    def __init__(self, y, probs, *, ordinal: bool, n_bins: int):
        y, probs = _check_inputs(y, probs)
        n, num_classes = probs.shape
        self.n, self.num_classes, self.ordinal = n, num_classes, ordinal
        pred = probs.argmax(axis=1)
        conf, correct, bins = _calibration_parts(y, probs, n_bins)
        cells = np.zeros((n, num_classes * num_classes))
        cells[np.arange(n), y * num_classes + pred] = 1.0
        self.cells = cells  # (n, C*C) one-hot confusion cell of each bag
        gaps = np.zeros((n, n_bins))
        gaps[np.arange(n), bins] = correct - conf
        self.gaps = gaps  # (n, n_bins) accuracy-minus-confidence contribution to its bin
        onehot = np.eye(num_classes)[y]
        self.brier = ((probs - onehot) ** 2).sum(axis=1)  # (n,)
        self.nll = -np.log(np.clip(probs[np.arange(n), y], _PROB_EPS, None))  # (n,)
        if num_classes == 2:
            self.auroc_runs = [_rank_runs(probs[:, 1], y == 1)]
        else:
            self.auroc_runs = [_rank_runs(probs[:, c], y == c) for c in range(num_classes)]

    def metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """All metrics for bag weights w (B, n) (bootstrap multiplicities; ones for the plain metric). Returns
        name -> (B,)."""
        c = self.num_classes
        total = w.sum(axis=1)
        cm = (w @ self.cells).reshape(-1, c, c)
        out = _confusion_metrics(cm, total, ordinal=self.ordinal)
        aucs = np.stack([_weighted_auroc(r, w) for r in self.auroc_runs], axis=1)  # (B, 1 or C)
        defined = ~np.isnan(aucs)
        n_defined = defined.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["auroc"] = np.where(n_defined > 0, np.where(defined, aucs, 0.0).sum(axis=1) / n_defined, np.nan)
        out["ece"] = np.abs(w @ self.gaps).sum(axis=1) / total
        out["brier"] = (w @ self.brier) / total
        out["nll"] = (w @ self.nll) / total
        return {k: out[k] for k in metric_names(self.ordinal)}


def _confusion_metrics(cm: np.ndarray, total: np.ndarray, *, ordinal: bool) -> dict[str, np.ndarray]:
    """Argmax-based metrics from confusion matrices cm (B, C, C) with totals (B,)."""
    c = cm.shape[-1]
    diag = np.diagonal(cm, axis1=1, axis2=2)  # (B, C)
    true_count = cm.sum(axis=2)
    pred_count = cm.sum(axis=1)
    out = {"accuracy": diag.sum(axis=1) / total}
    with np.errstate(invalid="ignore", divide="ignore"):
        in_y = true_count > 0
        recall = np.where(in_y, diag / np.where(in_y, true_count, 1.0), 0.0)
        out["balanced_accuracy"] = recall.sum(axis=1) / in_y.sum(axis=1)
        support = true_count + pred_count
        present = support > 0
        f1 = np.where(present, 2.0 * diag / np.where(present, support, 1.0), 0.0)
        out["macro_f1"] = f1.sum(axis=1) / present.sum(axis=1)
    expected = true_count[:, :, None] * pred_count[:, None, :] / total[:, None, None]
    idx = np.arange(c)
    weights = {"kappa": (idx[:, None] != idx[None, :]).astype(np.float64)}
    if ordinal:
        weights["kappa_quadratic"] = (idx[:, None] - idx[None, :]).astype(np.float64) ** 2
    for name, wm in weights.items():
        observed_dis = (cm * wm).sum(axis=(1, 2))
        expected_dis = (expected * wm).sum(axis=(1, 2))
        # expected disagreement is exactly 0 only when y and predictions share one single class
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(expected_dis > 0, 1.0 - observed_dis / np.where(expected_dis > 0, expected_dis, 1.0),
                                 np.nan)
    return out


def classification_metrics(y: np.ndarray, probs: np.ndarray, *, ordinal: bool = False,
                           n_bins: int = 15) -> dict[str, float]:
    """Bag-level metrics of one set of predictions.

    y: (n,) int class indices in [0, C); probs: (n, C) probabilities, rows summing to 1 (C >= 2; binary is 2
    columns). Returns name -> float for `metric_names(ordinal)`:

    * macro_f1, balanced_accuracy, accuracy, kappa (Cohen, unweighted) from argmax predictions (ties -> lowest
      class index); kappa_quadratic (quadratic-weighted Cohen's kappa) only when `ordinal`.
    * auroc: binary -> AUROC of probs[:, 1]; multi-class -> one-vs-rest macro average over the classes that have
      both positives and negatives in y (NaN when none qualifies, e.g. one class only). Ties count one half.
    * ece: expected calibration error of the top-label confidence, `n_bins` equal-width bins on [0, 1].
    * brier: mean over bags of sum_c (p_c - 1[y = c])^2, the multi-class Brier score. For binary problems
      sklearn's `brier_score_loss(y, probs[:, 1])` is half of this.
    * nll: mean of -log p_y, probabilities clipped at 1e-12.

    kappa is NaN when all bags and all predictions are one single class (as sklearn); see the module docstring
    for the class sets macro_f1 and balanced_accuracy average over.
    """
    stats = _FoldStats(y, probs, ordinal=ordinal, n_bins=n_bins)
    values = stats.metrics(np.ones((1, stats.n)))
    return {k: float(v[0]) for k, v in values.items()}


def _bootstrap_weights(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """Multiplicities (n_boot, n) of n bags drawn with replacement, one row per replicate."""
    draws = rng.integers(0, n, size=(n_boot, n))
    flat = (draws + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _bootstrap_fold(stats: _FoldStats, rng: np.random.Generator, n_boot: int) -> dict[str, np.ndarray]:
    """Metric values of n_boot bootstrap resamples of one fold: name -> (n_boot,)."""
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // stats.n)
    parts = [stats.metrics(_bootstrap_weights(rng, min(chunk, n_boot - start), stats.n))
             for start in range(0, n_boot, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (without a warning) where a row has no value."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, values, 0.0).sum(axis=-1) / count, np.nan)


def summarize_predictions(folds: list[tuple[np.ndarray, np.ndarray]], *, ordinal: bool = False, n_boot: int = 1000,
                          seed: int = 0, confidence: float = 0.95,
                          n_bins: int = 15) -> dict[str, dict[str, float]]:
    """Summary of each metric over the test parts of several (seed, fold) runs.

    folds: one (y (n_f,), probs (n_f, C)) per (seed, fold) test part. For each metric returns
    {"mean", "std", "ci_low", "ci_high", "n"}:

    * mean, std (ddof=1; 0 when n == 1) of the per-fold values; NaN values (e.g. AUROC of a one-class fold) are
      left out, and n counts the folds with a defined value (the number of folds unless some are NaN).
    * ci_low, ci_high: percentile bootstrap interval (level `confidence`) of that mean. Each of `n_boot`
      replicates resamples the bags of every fold with replacement (within the fold), recomputes each fold's
      metric and averages over folds (NaN folds left out); replicates where every fold is NaN are dropped.

    Reproducible from `seed`.
    """
    if not folds:
        raise ValueError("no folds to summarize")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    names = metric_names(ordinal)
    point = {k: np.empty(len(folds)) for k in names}
    boot = {k: np.empty((n_boot, len(folds))) for k in names}
    for f, (y, probs) in enumerate(folds):
        stats = _FoldStats(y, probs, ordinal=ordinal, n_bins=n_bins)
        for k, v in stats.metrics(np.ones((1, stats.n))).items():
            point[k][f] = v[0]
        for k, v in _bootstrap_fold(stats, rng, n_boot).items():
            boot[k][:, f] = v
    alpha = 1.0 - confidence
    summary = {}
    for k in names:
        values = point[k][~np.isnan(point[k])]
        n = int(values.size)
        boot_means = _nanmean_rows(boot[k])
        boot_means = boot_means[~np.isnan(boot_means)]
        if boot_means.size:
            lo, hi = np.percentile(boot_means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        else:
            lo = hi = math.nan
        summary[k] = {
            "mean": float(values.mean()) if n else math.nan,
            "std": float(values.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
            "ci_low": float(lo),
            "ci_high": float(hi),
            "n": n,
        }
    return summary


def format_summary(summary: dict, metrics: list[str] | None = None, digits: int = 3, *,
                   confidence: float = 0.95) -> str:
    """Markdown table of a `summarize_predictions` result: metric | mean ± std | CI | n.

    metrics: rows to show (default: every metric in the summary). `confidence` only labels the CI column."""
    names = list(summary) if metrics is None else list(metrics)
    missing = [m for m in names if m not in summary]
    if missing:
        raise KeyError(f"metrics not in the summary: {missing}")

    def num(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    level = f"{100 * confidence:g}%"
    lines = [f"| metric | mean ± std | {level} CI | n |", "|---|---|---|---|"]
    for m in names:
        s = summary[m]
        lines.append(f"| {m} | {num(s['mean'])} ± {num(s['std'])} | [{num(s['ci_low'])}, {num(s['ci_high'])}] "
                     f"| {s['n']} |")
    return "\n".join(lines)
